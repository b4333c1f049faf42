"""tf.data input pipeline: prepared TFRecords -> per-host numpy batches.

Train stream design (resumable bit-for-bit): the stream is a pure function of
(seed, host, step). Epoch ``e`` orders all files by a shuffle seeded by
(seed, e) -- the same on every host -- and gives each host an equal
contiguous range of that record sequence (``N // hosts`` records: whole
files plus partial ones at the range ends), so an epoch is every example
once across hosts, up to ``N % hosts`` left out. A host interleaves its
slices deterministically and shuffles examples with a buffer seeded by
(host seed, e). Image augmentation uses stateless random ops seeded by
(host seed, absolute example index). To start at step ``s`` we compute
the absolute example index ``s * batch_size``, jump to its epoch and skip the
raw (still encoded) records before it, so nothing is decoded twice and no
iterator state needs checkpointing.

A shard that is missing, truncated or shorter than ``dataset_info.json``
says stops either pipeline with a :class:`DamagedShardError` naming it.

Eval: files are read in a fixed order and records are dealt round-robin to
processes, so each example goes to exactly one process; every process then
pads to the same number of batches (``mask`` 0 on padding) so hosts stay in
lock-step.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
from collections.abc import Iterator
from typing import Any

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from mic_jax.data import buckets as buckets_lib
from mic_jax.data import packing as packing_lib
from mic_jax.data import preprocess
from mic_jax.data import records

AUTOTUNE = tf.data.AUTOTUNE
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a prepared directory holds (from ``dataset_info.json``)."""
  data_dir: str
  labels: tuple[str, ...]
  max_length: int
  shards: dict[str, list[dict[str, Any]]]
  taxonomy: dict[str, Any] | None = None
  # dataset_info.json as read (what the feature cache's key hashes), so a
  # run reads the file once and hands this object on.
  recorded: dict[str, Any] | None = dataclasses.field(
      default=None, compare=False, repr=False)

  @classmethod
  def load(cls, data_dir: str) -> DatasetInfo:
    """Raises FileNotFoundError when ``data_dir`` is not a prepared set."""
    path = pathlib.Path(data_dir)
    info = records.read_info(path)
    labels = records.read_labels(path, info.get("num_classes"))
    taxonomy = None
    if info.get("taxonomy_file"):
      taxonomy = json.loads((path / info["taxonomy_file"]).read_text(
          encoding="utf-8"))
    return cls(str(path), labels, int(info["max_length"]), info["shards"],
               taxonomy, recorded=info)

  @property
  def num_classes(self) -> int:
    return len(self.labels)

  def has_split(self, split: str) -> bool:
    return self.split_size(split) > 0

  def split_size(self, split: str) -> int:
    return sum(s["examples"] for s in self.shards.get(split, []))

  def class_counts(self, split: str) -> np.ndarray:
    """Examples per class in ``split`` (int64 ``[num_classes]``)."""
    total = np.zeros(self.num_classes, np.int64)
    for shard in self.shards.get(split, []):
      total += np.asarray(shard["class_counts"], np.int64)
    return total

  def length_counts(self, split: str) -> np.ndarray | None:
    """Titles per token length in ``split`` (``[max_length + 1]``), or None
    for a set prepared before data_prep recorded them."""
    shards = self.shards.get(split, [])
    if any(records.LENGTH_COUNTS not in s for s in shards):
      return None
    total = np.zeros(self.max_length + 1, np.int64)
    for shard in shards:
      total += np.asarray(shard[records.LENGTH_COUNTS], np.int64)
    return total

  def files(self, split: str) -> list[str]:
    return [str(pathlib.Path(self.data_dir) / s["file"])
            for s in self.shards.get(split, [])]


class DamagedShardError(IOError):
  """A prepared TFRecord shard is missing, truncated, corrupt or short."""


def _process(process_index: int | None, process_count: int | None
             ) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} not in [0, {count})")
  return index, count


def _parse(max_length: int):
  spec = records.feature_spec(max_length)

  def parse(serialized):
    return tf.io.parse_single_example(serialized, spec)
  return parse


def _to_batch_features(ex: dict[str, tf.Tensor], image: tf.Tensor | None,
                       mask: tf.Tensor) -> dict[str, tf.Tensor]:
  """The trainer's batch contract; ``image=None`` gives ``image_key`` instead.

  ``image_key`` (int64) names the photo by content (see
  :func:`preprocess.photo_key`) for models that read cached image-tower
  outputs instead of pixels; such streams skip JPEG decoding altogether.
  """
  features = {
      "input_ids": tf.cast(ex["input_ids"], tf.int32),
      "attention_mask": tf.cast(ex["attention_mask"], tf.int32),
      "token_type_ids": tf.cast(ex["token_type_ids"], tf.int32),
      "image_present": tf.cast(ex["image/present"], tf.int32),
      "label": tf.cast(ex["label"], tf.int32),
      "mask": mask,
  }
  if image is None:
    features["image_key"] = preprocess.photo_key(ex["image/encoded"],
                                                 ex["image/present"])
  else:
    features["image"] = image
  return features


def _split_shards(info: DatasetInfo, split: str
                  ) -> tuple[list[str], list[int]]:
  """The files of ``split`` and their record counts; missing files raise."""
  files = info.files(split)
  for file in files:
    if not pathlib.Path(file).exists():
      raise DamagedShardError(
          f"{file}: shard of {split!r} listed in {records.INFO_FILE} is "
          "missing (re-run data_prep)")
  return files, [int(s["examples"]) for s in info.shards.get(split, [])]


def _host_slices(files: tf.Tensor, sizes: tf.Tensor, epoch: tf.Tensor,
                 seed: int, index: int, per_host: int
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """This host's part of one epoch: (file, records to skip, records to take).

  The epoch is the concatenation of all files in an order shuffled by
  (seed, epoch) -- the same on every host -- cut into equal contiguous
  ranges of ``per_host`` records, one per host; the last
  ``total % process_count`` records of the order are left out. So every
  host reads a disjoint, equal share (whole files plus at most a partial
  file at each end), whatever the file count and file sizes.
  """
  epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
  order = tf.random.experimental.stateless_shuffle(
      tf.range(tf.size(files, out_type=tf.int64)), seed=epoch_seed)
  files = tf.gather(files, order)
  sizes = tf.gather(sizes, order)
  begin = tf.cumsum(sizes, exclusive=True)
  lo = tf.constant(index * per_host, tf.int64)
  hi = lo + per_host
  skip = tf.clip_by_value(lo - begin, 0, sizes)
  take = tf.clip_by_value(hi - begin, 0, sizes) - skip
  mine = take > 0
  return (tf.boolean_mask(files, mine), tf.boolean_mask(skip, mine),
          tf.boolean_mask(take, mine))


def _read_slice(file: tf.Tensor, skip: tf.Tensor, take: tf.Tensor
                ) -> tf.data.Dataset:
  """Records [skip, skip + take) of one file; fewer records is an error."""
  ds = tf.data.TFRecordDataset(file).skip(skip).take(take)
  # A shard cut at a record boundary reads without a DataLossError: insist
  # on the count dataset_info.json promised (checked as the slice ends).
  return ds.apply(tf.data.experimental.assert_cardinality(take))


def _epoch_records(files: list[str], sizes: list[int], epoch: tf.Tensor,
                   order_seed: int, host_seed: int, shuffle_buffer: int,
                   index: int, per_host: int) -> tf.data.Dataset:
  """The raw records of this host's share of one epoch, shuffled.

  The file order (hence which records each host gets) uses ``order_seed``,
  the same on every host; the example shuffle within the share uses
  ``host_seed``.
  """
  parts = _host_slices(tf.constant(files), tf.constant(sizes, tf.int64),
                       epoch, order_seed, index, per_host)
  ds = tf.data.Dataset.from_tensor_slices(parts)
  ds = ds.interleave(_read_slice, cycle_length=min(len(files), 8),
                     block_length=1, num_parallel_calls=AUTOTUNE,
                     deterministic=True)
  if shuffle_buffer > 1:
    ds = ds.shuffle(shuffle_buffer, seed=epoch * 1_000_003 + host_seed,
                    reshuffle_each_iteration=False)
  return ds


def _damaged_shards(info: DatasetInfo, split: str) -> list[str]:
  """Each shard of ``split`` that does not read back whole, with why.

  Reads every record (no parsing); only called after a read failed.
  """
  problems = []
  for file, shard in zip(info.files(split), info.shards.get(split, [])):
    try:
      found = sum(1 for _ in tf.data.TFRecordDataset(file))
    except tf.errors.OpError as e:
      problems.append(f"{file}: {e.message.strip()}")
      continue
    if found != shard["examples"]:
      problems.append(f"{file}: {found} records, {records.INFO_FILE} says "
                      f"{shard['examples']}")
  return problems


def _named_read_errors(batches: Iterator[Batch], info: DatasetInfo,
                       split: str) -> Iterator[Batch]:
  """``batches``, with a read failure re-raised naming the damaged shard.

  tf.data's own errors ("truncated record at 1044") do not say which file.
  Checking every shard up front would read the whole split on every host
  at every start; a failed read is rare, so the shards are checked then.
  """
  try:
    yield from batches
  except GeneratorExit:
    # Closed, also by the garbage collector at interpreter exit, when the
    # module globals (tf) may already be gone: look nothing up.
    raise
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError,
          tf.errors.NotFoundError) as e:
    problems = _damaged_shards(info, split)
    if not problems:
      raise
    raise DamagedShardError(
        f"damaged {split!r} shard(s) in {info.data_dir} (re-run data_prep): "
        + "; ".join(problems)) from e


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _token_length(max_length: int):
  """Serialized record -> its title's token count (parses only the mask)."""
  spec = {"attention_mask": tf.io.FixedLenFeature([max_length], tf.int64)}

  def length(serialized):
    return tf.reduce_sum(
        tf.io.parse_single_example(serialized, spec)["attention_mask"])
  return length


def _in_bucket(max_length: int, lengths: tuple[int, ...], k: int):
  """Predicate on a serialized record: its title falls in bucket ``k``."""
  token_length = _token_length(max_length)
  lo = tf.constant(lengths[k - 1] if k else -1, tf.int64)
  hi = tf.constant(lengths[k], tf.int64)

  def inside(serialized):
    n = token_length(serialized)
    return tf.logical_and(n > lo, n <= hi)
  return inside


def _cut_tokens(length: int):
  """A batch with its token arrays cut to ``length`` positions (the rest is
  padding for every title in the batch)."""
  def cut(batch):
    return {k: v[:, :length] if k in TOKEN_KEYS else v
            for k, v in batch.items()}
  return cut


@functools.lru_cache(maxsize=16)
def _counted_lengths(data_dir: str, split: str, max_length: int,
                     stamp: float) -> tuple[int, ...]:
  del stamp  # Part of the cache key: a re-prepared set is counted again.
  info = DatasetInfo.load(data_dir)
  files, _ = _split_shards(info, split)
  ds = tf.data.TFRecordDataset(files, num_parallel_reads=None)
  ds = ds.map(_token_length(max_length), num_parallel_calls=AUTOTUNE)
  counts = np.zeros(max_length + 1, np.int64)
  for chunk in ds.batch(4096).as_numpy_iterator():
    counts += np.bincount(chunk, minlength=max_length + 1)
  return tuple(int(c) for c in counts)


def split_length_counts(info: DatasetInfo, split: str) -> np.ndarray:
  """Titles per token length in ``split``: from ``dataset_info.json``, or
  (sets prepared before it recorded them) counted from the records once per
  process, with a log line saying so."""
  counts = info.length_counts(split)
  if counts is not None:
    return counts
  logging.info("%s: %s has no %s (prepared before length buckets); counting "
               "the token lengths of %r from its records", info.data_dir,
               records.INFO_FILE, records.LENGTH_COUNTS, split)
  stamp = (pathlib.Path(info.data_dir) / records.INFO_FILE).stat().st_mtime
  return np.asarray(_counted_lengths(info.data_dir, split, info.max_length,
                                     stamp), np.int64)


def resolve_buckets(info: DatasetInfo, spec: str, *, global_batch_size: int
                    ) -> tuple[int, ...]:
  """``config.data.length_buckets`` -> the run's bucket lengths (``()``: pad
  every batch to ``max_length``).

  ``'auto'`` chooses them from the training split's length histogram
  (:func:`buckets.choose`); explicit lengths are kept as given. Either way a
  bucket holding fewer training titles than one global batch is merged into
  the next longer one, so every bucket fills a batch within an epoch.
  """
  lengths = buckets_lib.parse(spec, info.max_length)
  if lengths == ():
    return ()
  if not info.has_split("train"):
    return (info.max_length,) if lengths == "auto" else lengths
  counts = split_length_counts(info, "train")
  if lengths == "auto":
    lengths = buckets_lib.choose(counts, info.max_length)
  merged = buckets_lib.merge_small(
      lengths, buckets_lib.per_bucket(counts, lengths), global_batch_size)
  if merged != lengths:
    logging.info("length buckets %s: merged buckets with fewer than %d "
                 "training titles -> %s", lengths, global_batch_size, merged)
  sizes = buckets_lib.per_bucket(counts, merged)
  logging.info("length buckets %s (training titles per bucket %s; padded "
               "tokens %.0f%% of max_length padding)", merged, sizes.tolist(),
               100 * buckets_lib.padded_tokens(counts, merged)
               / max(1, buckets_lib.padded_tokens(counts, (info.max_length,))))
  return merged


def _bucketed_train(files: list[str], sizes: list[int], info: DatasetInfo,
                    lengths: tuple[int, ...], *, batch_size: int,
                    seed: int, start_step: int, index: int, count: int,
                    per_epoch: int, order_seed: int, host_seed: int,
                    shuffle_buffer: int, decode) -> Iterator[Batch]:
  """The training stream in length buckets (see :func:`train_batches`).

  Bucket ``k``'s stream is this host's usual epoch stream (same file order,
  shuffle and augmentation positions as the padded path) keeping only the
  titles of bucket ``k``; the shared :class:`buckets.Schedule` says which
  bucket's next batch each step takes. To start at ``start_step`` each
  bucket stream skips the titles its earlier batches took.
  """
  totals = buckets_lib.per_bucket(split_length_counts(info, "train"), lengths)
  # Titles of each bucket per epoch on one host: exact on one host (its epoch
  # is the whole split), the hosts' average on several.
  rates = totals * (per_epoch / max(1, sum(sizes)))
  schedule = buckets_lib.Schedule(rates, batch_size, seed)
  taken = schedule.consumed(start_step)

  def epoch_ds(epoch):
    return _epoch_records(files, sizes, epoch, order_seed, host_seed,
                          shuffle_buffer, index, per_epoch)

  iterators: dict[int, Iterator[Batch]] = {}
  for k, length in enumerate(lengths):
    if rates[k] <= 0:
      continue
    skip = int(taken[k]) * batch_size
    first_epoch = 0
    if count == 1:  # Each epoch holds exactly totals[k] titles of bucket k.
      first_epoch, skip = divmod(skip, int(totals[k]))
    inside = _in_bucket(info.max_length, lengths, k)
    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
    ds = ds.flat_map(epoch_ds).enumerate(start=first_epoch * per_epoch)
    ds = ds.filter(lambda position, serialized, inside=inside:
                   inside(serialized)).skip(skip)
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).map(_cut_tokens(length))
    iterators[k] = _with_options(ds.prefetch(2)).as_numpy_iterator()
  for k in itertools.islice(iter(schedule), start_step, None):
    yield next(iterators[k])


@dataclasses.dataclass(frozen=True)
class Packing:
  """How titles are packed (``config.data.pack_titles`` and its fields).

  Attributes:
    length: tokens per packed row (``data.pack_length``).
    slots: products per row at most (``data.pack_slots``).
    rows: rows per batch on this host.
  """
  length: int
  slots: int
  rows: int


def resolve_packing(info: DatasetInfo, *, pack_length: int, slots: int,
                    global_batch_size: int, row_multiple: int,
                    process_count: int = 1) -> Packing:
  """``config.data.pack_*`` -> this run's :class:`Packing` (per host rows).

  ``pack_length`` 0 takes ``4 * max_length`` (a row holds a few titles
  whatever their lengths, and the attention over a row stays a small
  square). ``slots`` 0 takes 1.5 times the titles of mean length a row
  holds, capped by ``pack_length`` over the shortest title: some room for
  runs of short titles, while every slot, empty or not, costs a photo
  (the photo tower runs per slot; a feature cache makes that a lookup)
  and an unpacked title of ``max_length`` in the fusion. The rows per step hold about
  ``global_batch_size`` titles of the training split's mean length, in a
  multiple of ``row_multiple`` (the data-parallel devices of the mesh times
  the gradient-accumulation steps a batch is split into) and of
  ``process_count``, so a packed
  step does about the work of ``global_batch_size`` products and
  ``optim`` settings keep their meaning.
  """
  pack_length = int(pack_length) or 4 * info.max_length
  counts = (split_length_counts(info, "train") if info.has_split("train")
            else None)
  if counts is None or counts.sum() == 0:
    mean, shortest = float(info.max_length), 1
  else:
    present = np.nonzero(counts)[0]
    mean = float((counts * np.arange(len(counts))).sum() / counts.sum())
    shortest = max(1, int(present[0]))
  if not slots:
    slots = min(pack_length // shortest,
                max(1, int(np.ceil(1.5 * pack_length / max(mean, 1.0)))))
  packing_lib.check(pack_length, int(slots), info.max_length)
  # Greedy rows are not full: the next title often does not fit the rest.
  per_row = max(1.0, min(float(slots), 0.9 * pack_length / max(mean, 1.0)))
  # row_multiple counts devices of the whole mesh; each host reads a share.
  multiple = math.lcm(max(1, int(row_multiple)), process_count)
  rows = int(np.ceil(global_batch_size / per_row / multiple)) * multiple
  logging.info("packing titles: %d rows of %d tokens per step, up to %d "
               "titles each (mean title %.1f tokens; about %.0f titles per "
               "step)", rows, pack_length, slots, mean, rows * per_row)
  return Packing(length=pack_length, slots=int(slots),
                 rows=rows // process_count)


def _packed_epoch_plan(files: list[str], sizes: list[int], epoch: int, *,
                       max_length: int, packing: Packing, order_seed: int,
                       host_seed: int, shuffle_buffer: int, index: int,
                       per_epoch: int) -> list[int]:
  """Titles per packed batch in one epoch of this host: the epoch's record
  stream read for its title lengths only (no photo is decoded)."""
  ds = _epoch_records(files, sizes, tf.constant(epoch, tf.int64), order_seed,
                      host_seed, shuffle_buffer, index, per_epoch)
  ds = ds.map(_token_length(max_length), num_parallel_calls=AUTOTUNE,
              deterministic=True).batch(4096)
  lengths = np.concatenate([np.zeros(0, np.int64), *ds.as_numpy_iterator()])
  return packing_lib.plan_batches(lengths, packing.length, packing.slots,
                                  packing.rows)


def _packed_train(files: list[str], sizes: list[int], info: DatasetInfo,
                  packing: Packing, *, start_step: int, index: int,
                  per_epoch: int, order_seed: int, host_seed: int,
                  shuffle_buffer: int, decode, empty_slot: Batch
                  ) -> Iterator[Batch]:
  """The training stream in packed rows (see :func:`train_batches`).

  Each epoch is this host's usual epoch stream (file order, shuffle and
  augmentation positions of the padded path), packed greedily in order
  (:func:`packing.plan_rows`); batches take ``packing.rows`` rows, and the
  epoch's last batch is completed with empty rows rather than borrowing
  from the next epoch, so every epoch is every example of the host's share
  exactly once, and the batches of an epoch are a function of its title
  lengths alone. Resuming at ``start_step`` replays the plans of the
  epochs before it from their title lengths (records read, no photo
  decoded), then skips the raw records of the batches already taken.
  """
  plan = functools.partial(
      _packed_epoch_plan, files, sizes, max_length=info.max_length,
      packing=packing, order_seed=order_seed, host_seed=host_seed,
      shuffle_buffer=shuffle_buffer, index=index, per_epoch=per_epoch)
  epoch, skip, done = 0, 0, 0
  while True:
    batches = plan(epoch)
    if start_step < done + len(batches):
      skip = sum(batches[:start_step - done])
      break
    done += len(batches)
    epoch += 1
  for epoch in itertools.count(epoch):
    ds = _epoch_records(files, sizes, tf.constant(epoch, tf.int64),
                        order_seed, host_seed, shuffle_buffer, index,
                        per_epoch)
    ds = ds.enumerate(start=epoch * per_epoch).skip(skip)
    skip = 0
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    yield from _pack_stream(
        _with_options(ds.prefetch(AUTOTUNE)).as_numpy_iterator(), packing,
        empty_slot)


def _pack_stream(examples: Iterator[Batch], packing: Packing,
                 empty_slot: Batch | None) -> Iterator[Batch]:
  """Packed batches of ``examples`` in order, as :func:`packing.
  plan_batches` cuts them (the last one partial), built as they arrive."""
  rows, length, slots = packing.rows, packing.length, packing.slots
  pending: list[Batch] = []
  opened, used, count = 0, 0, 0
  for example in examples:
    n = packing_lib.title_length(example)
    if not count or used + n > length or count == slots:
      if opened == rows:  # The next title opens row rows + 1: emit.
        yield packing_lib.pack(pending, pack_length=length, slots=slots,
                               rows=rows, empty_slot=empty_slot)
        pending, opened = [], 0
      opened, used, count = opened + 1, 0, 0
    used, count = used + n, count + 1
    pending.append(example)
  if pending:
    yield packing_lib.pack(pending, pack_length=length, slots=slots,
                           rows=rows, empty_slot=empty_slot)


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options)


def train_batches(data_dir: str, *, batch_size: int, image_size: int,
                  seed: int, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  shuffle_buffer: int = 10_000,
                  image_keys: bool = False,
                  length_buckets: tuple[int, ...] = (),
                  packing: Packing | None = None,
                  info: DatasetInfo | None = None) -> Iterator[Batch]:
  """Endless training batches for this host, resumable at ``start_step``.

  Across hosts, each epoch is every training example once, minus at most
  ``process_count - 1`` (see :func:`_host_slices`); every host has the
  same number of examples per epoch.

  Args:
    data_dir: a prepared directory (see :mod:`mic_jax.data.records`).
    batch_size: examples per batch on this host.
    image_size: output image height = width.
    seed: the stream (file order, shuffle, augmentation) is a function of it.
    start_step: yield exactly what an uninterrupted stream yields from here.
    process_index, process_count: default to JAX's; pass them to simulate.
    shuffle_buffer: example shuffle buffer (per host).
    image_keys: yield ``image_key`` (the photo's content key) instead of
      decoded, augmented pixels, for a frozen image tower whose outputs are
      cached (:mod:`mic_jax.features.image_features`).
    length_buckets: bucket lengths from :func:`resolve_buckets` (``()``:
      every batch padded to ``max_length``). Each batch then holds titles of
      one bucket, its token arrays cut to that bucket's length; the bucket
      of each step is the same on every host (:class:`buckets.Schedule`),
      each bucket's titles are taken in stream order, so on one host every
      epoch is still every example once (to within one batch per bucket at
      the epoch's ends). On several hosts the schedule takes each bucket at
      the hosts' average rate: a host whose share of an epoch holds more
      (fewer) titles of a bucket than the average carries them into (takes
      them early from) its next epoch -- nothing is dropped or repeated.
    packing: pack titles into rows (:mod:`mic_jax.data.packing`) instead;
      ``batch_size`` is then unused (``packing.rows`` rows per batch, up to
      ``packing.slots`` products each). Every epoch is every example of the
      host's share exactly once (its last batch completed with empty
      slots), all shapes are static, and hosts whose shares pack into
      different numbers of batches simply move on to their next epoch at
      different steps.
    info: ``data_dir``'s :class:`DatasetInfo` when the caller has it (a
      run reads ``dataset_info.json`` once); else it is read here.

  Yields:
    The batch dict of the trainer contract (``mask`` all ones; packed,
    ``mask`` 0 on empty slots).
  """
  index, count = _process(process_index, process_count)
  info = DatasetInfo.load(data_dir) if info is None else info
  if not info.has_split("train"):
    raise ValueError(f"{data_dir} has no train split")
  files, sizes = _split_shards(info, "train")
  per_epoch = sum(sizes) // count
  if per_epoch == 0:
    raise ValueError(f"{data_dir}: {sum(sizes)} training examples cannot be "
                     f"shared by {count} hosts")
  # Hosts with different seeds would sample the same augmentation noise
  # pattern otherwise; the host index is part of the stream's identity.
  host_seed = seed * 7919 + index
  # The file order must be the same on every host: host 0's seed (so a
  # single-host stream is the same as before hosts shared the order).
  order_seed = seed * 7919
  parse = _parse(info.max_length)

  def decode(position, serialized):
    ex = parse(serialized)
    if image_keys:
      return _to_batch_features(ex, None, tf.constant(1.0))
    image_seed = tf.stack([tf.constant(host_seed, tf.int64), position])
    image = preprocess.train_image(ex["image/encoded"], ex["image/present"],
                                   image_size, image_seed)
    return _to_batch_features(ex, image, tf.constant(1.0))

  if packing is not None:
    if length_buckets:
      raise ValueError("data.pack_titles and data.length_buckets are "
                       "exclusive: packed rows have one static length")
    packing_lib.check(packing.length, packing.slots, info.max_length)
    empty_slot = {"image_key": preprocess.no_photo_key()} if image_keys else None
    yield from _named_read_errors(_packed_train(
        files, sizes, info, packing, start_step=start_step, index=index,
        per_epoch=per_epoch, order_seed=order_seed, host_seed=host_seed,
        shuffle_buffer=shuffle_buffer, decode=decode, empty_slot=empty_slot),
                                  info, "train")
    return
  if length_buckets:
    yield from _named_read_errors(_bucketed_train(
        files, sizes, info, tuple(length_buckets), batch_size=batch_size,
        seed=seed, start_step=start_step, index=index, count=count,
        per_epoch=per_epoch, order_seed=order_seed, host_seed=host_seed,
        shuffle_buffer=shuffle_buffer, decode=decode), info, "train")
    return
  first = start_step * batch_size
  first_epoch, offset = divmod(first, per_epoch)

  def epoch_ds(epoch):
    ds = _epoch_records(files, sizes, epoch, order_seed, host_seed,
                        shuffle_buffer, index, per_epoch)
    return ds.skip(tf.where(epoch == first_epoch, tf.constant(offset, tf.int64),
                            tf.constant(0, tf.int64)))

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
  ds = ds.flat_map(epoch_ds)
  ds = ds.enumerate(start=first)
  ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  ds = _with_options(ds)
  yield from _named_read_errors(ds.as_numpy_iterator(), info, "train")


def _packed_eval(files: list[str], total: int, info: DatasetInfo,
                 packing: Packing, *, index: int, count: int, decode,
                 pad: Batch, image_keys: bool) -> Iterator[Batch]:
  """The packed evaluation stream of one process (see :func:`eval_batches`)."""
  records_ds = tf.data.TFRecordDataset(files, num_parallel_reads=None).apply(
      tf.data.experimental.assert_cardinality(total))
  lengths = np.concatenate([np.zeros(0, np.int64), *records_ds.map(
      _token_length(info.max_length), num_parallel_calls=AUTOTUNE,
      deterministic=True).batch(4096).as_numpy_iterator()])
  num_batches = max(len(packing_lib.plan_batches(
      lengths[p::count], packing.length, packing.slots, packing.rows))
                    for p in range(count))
  empty_slot = {"image_key": preprocess.no_photo_key()} if image_keys else None
  ds = records_ds.shard(count, index).map(decode, num_parallel_calls=AUTOTUNE,
                                          deterministic=True)
  made = 0
  for batch in _pack_stream(ds.prefetch(AUTOTUNE).as_numpy_iterator(),
                            packing, empty_slot):
    made += 1
    yield batch
  empty = packing_lib.pack([pad], pack_length=packing.length,
                           slots=packing.slots, rows=packing.rows,
                           empty_slot=empty_slot)
  for _ in range(num_batches - made):
    yield empty


def eval_batches(data_dir: str, split: str, *, batch_size: int,
                 image_size: int, process_index: int | None = None,
                 process_count: int | None = None,
                 image_keys: bool = False,
                 length_buckets: tuple[int, ...] = (),
                 packing: Packing | None = None,
                 info: DatasetInfo | None = None) -> Iterator[Batch]:
  """Every example of ``split`` exactly once across processes, padded.

  All processes yield the same number of batches,
  ``ceil(ceil(N / process_count) / batch_size)``; padding rows have
  ``mask`` 0 (and zero features, label 0; with ``image_keys``, the key of
  "no photo"). ``image_keys`` and ``info`` are as in :func:`train_batches`.

  With ``length_buckets`` the split is read once per bucket, keeping that
  bucket's titles (in file order), and each bucket is dealt and padded as
  above with its token arrays cut to the bucket's length: every process
  yields the same number of batches of each bucket, in bucket order, from
  the split's length counts. The order of examples is then bucket by
  bucket, the same for every model that uses the same buckets.

  With ``packing`` each process packs its dealt examples in order
  (:func:`packing.plan_batches`); the split's title lengths are read once
  (no photo decoded) to find the process with the most batches, and the
  others follow with empty batches (``mask`` 0 on every slot), so all
  yield the same number of batches of the same shapes.
  """
  index, count = _process(process_index, process_count)
  info = DatasetInfo.load(data_dir) if info is None else info
  total = info.split_size(split)
  if total == 0:
    return
  files, _ = _split_shards(info, split)
  parse = _parse(info.max_length)

  def decode(serialized):
    ex = parse(serialized)
    if image_keys:
      return _to_batch_features(ex, None, tf.constant(1.0))
    image = preprocess.eval_image(ex["image/encoded"], ex["image/present"],
                                  image_size)
    return _to_batch_features(ex, image, tf.constant(1.0))

  length = info.max_length
  pad = {
      "input_ids": tf.zeros([length], tf.int32),
      "attention_mask": tf.zeros([length], tf.int32),
      "token_type_ids": tf.zeros([length], tf.int32),
      "image_present": tf.constant(0, tf.int32),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0),
  }
  if image_keys:
    pad["image_key"] = preprocess.photo_key(tf.constant(b""),
                                            tf.constant(0, tf.int64))
  else:
    pad["image"] = tf.zeros([image_size, image_size, 3])

  def dealt(keep, examples: int) -> tf.data.Dataset:
    """Records passing ``keep`` (``examples`` of them), dealt and padded."""
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=None)
    # Short shards would otherwise be padded over in silence.
    ds = ds.apply(tf.data.experimental.assert_cardinality(total))
    if keep is not None:
      ds = ds.filter(keep)
    ds = ds.shard(count, index)
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    num_batches = -(-(-(-examples // count)) // batch_size)
    return ds.take(num_batches * batch_size).batch(batch_size)

  if packing is not None:
    if length_buckets:
      raise ValueError("data.pack_titles and data.length_buckets are "
                       "exclusive: packed rows have one static length")
    packing_lib.check(packing.length, packing.slots, info.max_length)
    yield from _named_read_errors(_packed_eval(
        files, total, info, packing, index=index, count=count,
        decode=decode, pad={k: v.numpy() for k, v in pad.items()},
        image_keys=image_keys), info, split)
    return
  if not length_buckets:
    parts = [dealt(None, total)]
  else:
    lengths = tuple(length_buckets)
    sizes = buckets_lib.per_bucket(split_length_counts(info, split), lengths)
    parts = [dealt(_in_bucket(length, lengths, k), int(n))
             .map(_cut_tokens(lengths[k]))
             for k, n in enumerate(sizes) if n > 0]

  def batches() -> Iterator[Batch]:
    for ds in parts:
      yield from ds.prefetch(AUTOTUNE).as_numpy_iterator()
  yield from _named_read_errors(batches(), info, split)
