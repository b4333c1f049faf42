"""Packed titles inside the models: segment masks, per-title dropout, unpacking.

A packed batch (:mod:`mic_jax.data.packing` builds them) holds ``R`` rows of
``P`` tokens; each row carries up to ``S`` titles back to back, so the text
tower computes (nearly) only real tokens instead of every title padded to
``max_length``. Per token it has ``segment_ids`` (1..S: which title of the
row, 0: padding) and ``positions`` (the position within its own title);
per slot ``slot_start`` (the title's [CLS] position in the row) and
``slot_length`` (its token count, 0 for an empty slot), and the product's
label, weight and photo.

Where the models separate the titles again (the design choice):

* The text tower runs on the packed rows. Attention is block-diagonal by
  segment (:func:`attention_bias`), position embeddings read ``positions``,
  so every title is encoded exactly as it is alone in a padded row.
* Right after the tower each slot's tokens are gathered into a padded
  ``[R * S, title_length, d]`` array (:func:`unpack`), and the pooler, the
  text representation, the fusion layer and the heads run on that array
  exactly as on a padded batch. Making the fusion segment-aware instead
  would also save its padding, but it would duplicate every fusion variant
  (cross-modal self and cross attention, gate, pooled sum, early fusion)
  with packed twins to keep equal; the fusion is one layer against the
  tower's many, so unpacking keeps one tested code path where most of the
  padding saving is already made. The photo side is never packed: slot
  ``(r, s)`` is product ``r * S + s`` of the flattened batch.

Dropout. The position-folded masks of :mod:`mic_jax.layers.dropout` make
the mask at a title position independent of the padded width; a packed
title must also get the masks of the same product in the padded batch,
which depend on its row there (product ``r * S + s``) and its position in
its own title. :class:`PackedIndex` carries both, and
:class:`~mic_jax.layers.dropout.TokenDropout` gathers the padded batch's
mask at them. So a packed step equals the padded step of the same products
(in slot order) up to float rounding, with dropout on too. The price: the
random bits are drawn for the padded shape ``[R * S, title_length, ...]``
(the matmuls are what packing saves; with dropout off nothing is drawn).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax
import jax.numpy as jnp

# The keys that make a batch a packed one, and its per-slot keys.
SEGMENT_IDS = "segment_ids"
POSITIONS = "positions"
SLOT_START = "slot_start"
SLOT_LENGTH = "slot_length"


def is_packed(batch: Mapping[str, jnp.ndarray]) -> bool:
  """Whether ``batch`` holds packed titles (it has ``segment_ids``)."""
  return SEGMENT_IDS in batch


@flax.struct.dataclass
class PackedIndex:
  """Where each token of a packed batch sits in the equivalent padded batch.

  Attributes:
    segment_ids: ``[R, P]``, 1..S: the token's title within its row; 0:
      padding.
    positions: ``[R, P]``, the token's position within its own title.
    slot_start: ``[R, S]``, each title's first ([CLS]) position in the row.
    slot_length: ``[R, S]``, each title's token count (0: empty slot).
    title_length: the padded width titles are unpacked to (static).
  """
  segment_ids: jnp.ndarray
  positions: jnp.ndarray
  slot_start: jnp.ndarray
  slot_length: jnp.ndarray
  title_length: int = flax.struct.field(pytree_node=False, default=0)

  @classmethod
  def from_batch(cls, batch: Mapping[str, jnp.ndarray], title_length: int
                 ) -> PackedIndex:
    return cls(jnp.asarray(batch[SEGMENT_IDS]), jnp.asarray(batch[POSITIONS]),
               jnp.asarray(batch[SLOT_START]), jnp.asarray(batch[SLOT_LENGTH]),
               int(title_length))

  @property
  def slots(self) -> int:
    return self.slot_start.shape[1]

  @property
  def num_examples(self) -> int:
    """Products of the equivalent padded batch: ``R * S`` (static)."""
    return self.slot_start.shape[0] * self.slot_start.shape[1]

  @property
  def example_ids(self) -> jnp.ndarray:
    """``[R, P]``: each token's product in the padded batch (``r * S + s``;
    padding tokens say their row's first slot, whose mask they never use)."""
    rows = jnp.arange(self.segment_ids.shape[0])[:, None] * self.slots
    return rows + jnp.maximum(self.segment_ids - 1, 0)

  @property
  def title_positions(self) -> jnp.ndarray:
    """``positions`` clipped into ``[0, title_length)`` (padding can hold
    anything)."""
    return jnp.clip(self.positions, 0, self.title_length - 1)


def attention_bias(index: PackedIndex, attention_mask: jnp.ndarray
                   ) -> jnp.ndarray:
  """Additive bias ``[R, 1, P, P]``: 0 where query and key are tokens of the
  same title (and the key is not masked), float32 min elsewhere.

  Block-diagonal by segment, so no title attends to another title of its
  row; a padding query attends to padding keys (a finite, ignored row).
  """
  seg = index.segment_ids
  same = seg[:, :, None] == seg[:, None, :]
  key_ok = (attention_mask > 0) | (seg == 0)
  allowed = same & key_ok[:, None, :]
  return jnp.where(allowed[:, None], 0.0,
                   jnp.finfo(jnp.float32).min).astype(jnp.float32)


def unpack(x: jnp.ndarray, index: PackedIndex
           ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Packed token states ``[R, P, ...]`` -> per product ``[R * S, T, ...]``.

  ``T`` is ``index.title_length``; slot ``(r, s)`` becomes row ``r * S +
  s``. Returns the gathered states and their mask ``[R * S, T]`` (1 on the
  slot's own tokens; positions past its length hold whatever follows it in
  the row and are masked, as padding is in a padded batch).
  """
  rows, width = x.shape[:2]
  offsets = jnp.arange(index.title_length)
  gather = jnp.clip(index.slot_start[..., None] + offsets, 0, width - 1)
  gather = gather.reshape(rows, -1)  # [R, S * T]
  picked = jnp.take_along_axis(
      x, gather.reshape(gather.shape + (1,) * (x.ndim - 2)), axis=1)
  out = picked.reshape(index.num_examples, index.title_length, *x.shape[2:])
  mask = (offsets[None, None, :] < index.slot_length[..., None]).reshape(
      index.num_examples, index.title_length)
  return out, mask.astype(jnp.int32)


def flatten_slots(x: jnp.ndarray) -> jnp.ndarray:
  """A per-slot array ``[R, S, ...]`` as the padded batch's ``[R * S, ...]``."""
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
