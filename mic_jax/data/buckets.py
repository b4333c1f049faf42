"""Length buckets: batch titles into a few static lengths, not ``max_length``.

Titles fill a fraction of the padded length (fashion, MiniLM tokens,
``max_length=32``: mean 10.2, p95 15), and every layer of the text tower, the
fusion layer and the head pays for the padding. With buckets the pipelines
emit batches whose token arrays are cut to the smallest bucket length that
holds every title in them, so XLA compiles one step per bucket (a handful)
and no batch pays for more padding than its bucket. Masked positions never
mattered to the models and their dropout masks are drawn per title position
(:mod:`mic_jax.layers.dropout`), so results equal the padded path up to
float summation order, in training too.

This module owns the choices, not the reading: which lengths
(:func:`resolve`), which bucket holds a title (:func:`bucket_of`), and the
order in which the training stream visits buckets (:class:`Schedule`), which
is a pure function of (seed, step) and the same on every host, so resume
stays exact and every host emits the same shapes at every step.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence

import numpy as np

# Bucket lengths are multiples of this (TPU sublanes, CPU vector widths).
ALIGN = 8
# 'auto' chooses at most this many lengths (each is one more compile).
MAX_AUTO_BUCKETS = 4


def parse(spec: str, max_length: int) -> tuple[int, ...] | str:
  """``config.data.length_buckets`` -> explicit lengths, ``"auto"`` or ``()``.

  Explicit lengths are sorted; ``max_length`` is appended when missing (a
  title of any length must fit somewhere). ``()`` is the padded path.
  """
  spec = str(spec).strip()
  if spec in ("", "none", "0"):
    return ()
  if spec == "auto":
    return "auto"
  try:
    lengths = sorted({int(x) for x in spec.split(",") if x.strip()})
  except ValueError as e:
    raise ValueError(f"config.data.length_buckets={spec!r}: expected 'auto', "
                     "'' or comma-separated token lengths like '8,16,32'"
                     ) from e
  if not lengths or lengths[0] < 1 or lengths[-1] > max_length:
    raise ValueError(f"config.data.length_buckets={spec!r}: lengths must be "
                     f"in [1, max_length={max_length}]")
  if lengths[-1] != max_length:
    lengths.append(max_length)
  return tuple(lengths)


def choose(counts: np.ndarray, max_length: int,
           max_buckets: int = MAX_AUTO_BUCKETS) -> tuple[int, ...]:
  """The bucket lengths (multiples of :data:`ALIGN`, last ``max_length``)
  that minimise the padded tokens of ``counts`` (titles per token length).

  Exhaustive over at most ``max_buckets - 1`` cut points: ``max_length / 8``
  candidates, so a few hundred combinations at most.
  """
  counts = _as_counts(counts, max_length)
  candidates = [c for c in range(ALIGN, max_length, ALIGN)
                if counts[:c + 1].sum() > 0]
  best, best_cost = (max_length,), padded_tokens(counts, (max_length,))
  for r in range(1, max_buckets):
    for cuts in itertools.combinations(candidates, r):
      lengths = (*cuts, max_length)
      cost = padded_tokens(counts, lengths)
      if cost < best_cost:
        best, best_cost = lengths, cost
  return best


def padded_tokens(counts: np.ndarray, lengths: Sequence[int]) -> int:
  """Tokens computed when each title is padded to its bucket's length."""
  counts = np.asarray(counts, np.int64)
  sizes = np.asarray(lengths)[bucket_of(np.arange(len(counts)), lengths)]
  return int((counts * sizes).sum())


def bucket_of(lengths: np.ndarray | int, buckets: Sequence[int]) -> np.ndarray:
  """Index of the smallest bucket holding each length (``<= buckets[-1]``)."""
  return np.searchsorted(np.asarray(buckets), lengths, side="left")


def per_bucket(counts: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  """Titles per bucket, from titles per token length."""
  counts = _as_counts(counts, buckets[-1])
  return np.bincount(bucket_of(np.arange(len(counts)), buckets),
                     weights=counts, minlength=len(buckets)).astype(np.int64)


def merge_small(buckets: Sequence[int], sizes: np.ndarray, minimum: int
                ) -> tuple[int, ...]:
  """``buckets`` without those holding fewer than ``minimum`` titles: their
  titles go to the next longer bucket, and a last bucket that is still too
  small takes the titles of the bucket before it (it cannot go itself: only
  it holds the longest titles). Every bucket then holds at least
  ``minimum`` titles, unless all of them together hold fewer (one bucket).

  A training bucket with fewer titles than one global batch would take
  many epochs of reading to fill a batch, and that batch would repeat its
  few titles.
  """
  kept, carry = [], 0
  for length, size in zip(buckets[:-1], sizes[:-1]):
    carry += int(size)
    if carry >= minimum:
      kept.append(length)
      carry = 0
  if kept and carry + int(sizes[-1]) < minimum:
    kept.pop()  # It held >= minimum titles: one merge is enough.
  return (*kept, buckets[-1])


def _as_counts(counts: np.ndarray, max_length: int) -> np.ndarray:
  counts = np.asarray(counts, np.int64)
  if counts.ndim != 1 or len(counts) > max_length + 1:
    raise ValueError(f"length counts must be a vector of at most "
                     f"max_length + 1 = {max_length + 1} entries, got shape "
                     f"{counts.shape}")
  return np.pad(counts, (0, max_length + 1 - len(counts)))


class Schedule:
  """Which bucket the training stream takes at each step: the same on every
  host, a pure function of (seed, step).

  Bucket ``k`` holds ``rates[k]`` titles per epoch per host. Its ``j``-th
  batch of ``batch_size`` titles is due at epoch time ``(j + u) *
  batch_size / rates[k]`` with ``u`` uniform in [0, 1) drawn from (seed, k,
  j); steps take batches in order of due time. So every bucket advances at
  the pace of its share of the data, each bucket's titles are consumed in
  stream order (none skipped, none repeated within a pass), and the
  interleaving of lengths is shuffled rather than periodic. Buckets with a
  rate of 0 are never taken.
  """

  _CHUNK = 4096

  def __init__(self, rates: Sequence[float], batch_size: int, seed: int):
    self.rates = np.asarray(rates, np.float64)
    if not np.any(self.rates > 0):
      raise ValueError("length buckets: no bucket holds any title")
    self.batch_size = int(batch_size)
    self.seed = int(seed)

  def _jitter(self, k: int, chunk: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 0xB0C4, k, chunk])
    return rng.random(self._CHUNK)

  def _due(self, k: int) -> Iterator[float]:
    period = self.batch_size / self.rates[k]
    for chunk in itertools.count():
      u = self._jitter(k, chunk)
      base = chunk * self._CHUNK
      for i in range(self._CHUNK):
        yield (base + i + u[i]) * period

  def __iter__(self) -> Iterator[int]:
    """Bucket indices from step 0 on."""
    streams = {k: self._due(k) for k in range(len(self.rates))
               if self.rates[k] > 0}
    heap = [(next(due), k) for k, due in streams.items()]
    heapq.heapify(heap)
    while True:
      _, k = heap[0]
      yield k
      heapq.heapreplace(heap, (next(streams[k]), k))

  def consumed(self, step: int) -> np.ndarray:
    """Batches taken from each bucket by steps ``[0, step)``."""
    taken = np.zeros(len(self.rates), np.int64)
    for k in itertools.islice(iter(self), step):
      taken[k] += 1
    return taken
