"""Packing titles: several products' titles share one row of the text tower.

Buckets (:mod:`mic_jax.data.buckets`) still pad each title to its bucket's
length (fashion: 14.3 tokens computed per 10.1-token title). Packing puts
titles back to back in rows of ``pack_length`` tokens, so the text tower
computes (nearly) only real tokens, at one static shape.

A packed batch of ``R`` rows, ``P = pack_length`` tokens and ``S = slots``
products per row (the trainer contract's packed form; the models read it
through :mod:`mic_jax.layers.packing`):

  input_ids, attention_mask, token_type_ids  [R, P]  titles back to back
  segment_ids  [R, P]  1..S: which slot's title; 0: padding
  positions    [R, P]  position within the own title (restarts at 0)
  slot_start   [R, S]  the title's first ([CLS]) position in its row
  slot_length  [R, S]  its token count; 0 for an empty slot
  label, mask, image_present   [R, S]  per product; ``mask`` 0 when empty
  image [R, S, H, W, 3] or image_key [R, S]  the product's photo

Rows are filled greedily in stream order (:func:`plan_rows`): the next
title goes into the current row when its tokens and a slot are free,
otherwise the row is closed. Nothing is reordered, dropped or repeated, so
the stream's shuffle and "every example once per epoch" carry over as they
are; the cost is some unused tokens at the end of each row. Every function
here is a pure function of its inputs, so a stream can be replayed (and
resumed) from the title lengths alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Batch = dict[str, np.ndarray]
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
# Per-product keys besides the tokens (whichever the stream has).
SLOT_KEYS = ("label", "mask", "image_present", "image", "image_key",
             "image_tokens", "image_hidden")


def check(pack_length: int, slots: int, max_length: int) -> None:
  """Raises unless every title (``<= max_length`` tokens) fits a row."""
  if slots < 1:
    raise ValueError(f"data.pack_slots must be >= 1, got {slots}")
  if pack_length < max_length:
    raise ValueError(f"data.pack_length={pack_length} is shorter than "
                     f"text.max_length={max_length}: a longest title would "
                     "not fit a row")


def plan_rows(lengths: Sequence[int], pack_length: int, slots: int
              ) -> list[int]:
  """Titles per row when ``lengths`` (in stream order) are packed greedily.

  Each row takes titles in order while they fit (``pack_length`` tokens,
  ``slots`` titles); the sum of the result is ``len(lengths)``.
  """
  rows, used, count = [], 0, 0
  for n in lengths:
    n = int(n)
    if n > pack_length:
      raise ValueError(f"a title of {n} tokens does not fit a packed row of "
                       f"{pack_length}")
    if count and (used + n > pack_length or count == slots):
      rows.append(count)
      used, count = 0, 0
    used += n
    count += 1
  if count:
    rows.append(count)
  return rows


def plan_batches(lengths: Sequence[int], pack_length: int, slots: int,
                 rows: int) -> list[int]:
  """Titles per batch of ``rows`` rows (the last batch may be partial)."""
  per_row = plan_rows(lengths, pack_length, slots)
  return [sum(per_row[i:i + rows]) for i in range(0, len(per_row), rows)]


def title_length(example: Mapping[str, np.ndarray]) -> int:
  """Token count of a left-aligned padded title (its attention mask)."""
  return int(np.asarray(example["attention_mask"]).sum())


def pack(examples: Sequence[Mapping[str, np.ndarray]], *, pack_length: int,
         slots: int, rows: int,
         empty_slot: Mapping[str, np.ndarray] | None = None) -> Batch:
  """One packed batch from padded examples (per-example dicts), in order.

  The examples must fit ``rows`` rows by :func:`plan_rows` (the pipelines
  cut them so); unused rows and slots are empty: ``mask`` 0, and zeros for
  the other per-product keys unless ``empty_slot`` gives their value (the
  "no photo" ``image_key``, which a feature cache can look up).
  """
  if not examples:
    raise ValueError("nothing to pack")
  lengths = [title_length(e) for e in examples]
  per_row = plan_rows(lengths, pack_length, slots)
  if len(per_row) > rows:
    raise ValueError(f"{len(examples)} titles need {len(per_row)} packed "
                     f"rows, the batch has {rows}")
  first = examples[0]
  out: Batch = {k: np.zeros((rows, pack_length), np.int32)
                for k in (*TOKEN_KEYS, "segment_ids", "positions")}
  out["slot_start"] = np.zeros((rows, slots), np.int32)
  out["slot_length"] = np.zeros((rows, slots), np.int32)
  for key in SLOT_KEYS:
    if key in first:
      value = np.asarray(first[key])
      out[key] = np.zeros((rows, slots, *value.shape), value.dtype)
      if empty_slot is not None and key in empty_slot and key != "mask":
        out[key][...] = np.asarray(empty_slot[key], value.dtype)
  i = 0
  for r, count in enumerate(per_row):
    start = 0
    for s in range(count):
      ex, n = examples[i], lengths[i]
      for key in TOKEN_KEYS:
        out[key][r, start:start + n] = np.asarray(ex[key])[:n]
      out["segment_ids"][r, start:start + n] = s + 1
      out["positions"][r, start:start + n] = np.arange(n)
      out["slot_start"][r, s] = start
      out["slot_length"][r, s] = n
      for key in SLOT_KEYS:
        if key in ex:
          out[key][r, s] = ex[key]
      start += n
      i += 1
  return out


def unpack(batch: Mapping[str, np.ndarray], title_length: int) -> Batch:
  """The padded batch of a packed one's ``R * S`` slots, in slot order.

  Product ``r * S + s`` is slot ``s`` of row ``r``; an empty slot is a row
  of zeros with ``mask`` 0. What the models compute on a packed batch equals
  what they compute on this (:mod:`mic_jax.layers.packing`); tests and
  checks use it.
  """
  rows, slots = batch["slot_start"].shape
  out: Batch = {k: np.zeros((rows * slots, title_length), np.int32)
                for k in TOKEN_KEYS}
  for r in range(rows):
    for s in range(slots):
      n, start = int(batch["slot_length"][r, s]), int(batch["slot_start"][r, s])
      for key in TOKEN_KEYS:
        out[key][r * slots + s, :n] = batch[key][r, start:start + n]
  for key in SLOT_KEYS:
    if key in batch:
      value = np.asarray(batch[key])
      out[key] = value.reshape(rows * slots, *value.shape[2:])
  return out
