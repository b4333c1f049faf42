"""Dropout whose mask at a title position does not depend on the padded width.

Length buckets (:mod:`mic_jax.data.buckets`) cut a batch of titles to 8, 16,
... tokens instead of padding it to ``max_length``, and promise the same
results as the padded batch up to float rounding. ``nn.Dropout`` breaks that
promise: it draws one Bernoulli array of the activation's full shape, and
the bits of element ``[b, l, d]`` depend on the flattened index, hence on
the width ``L``. A title cut to 8 tokens then gets other masks than the same
title padded to 16.

:class:`TokenDropout` draws one independent mask slice per title position
instead: the dropout key is folded with the position's index (with both
indices for a ``[query, key]`` pair of attention probabilities) and the
slice is drawn over the remaining axes. Position ``l``'s mask is a function
of (key, l) alone, so a batch cut to any width gets exactly the masks of
the padded batch on the positions it keeps; the positions cut off are
padding, which the models never read.

Why fold the index in rather than draw the mask for ``max_length`` and slice
it to the current width: slicing would keep the padded run's masks bit for
bit, but every bucket would pay for drawing the random bits of the full
width (for the attention probabilities ``(max_length / width)^2`` times the
bits needed), eating into what buckets save. Folding costs one hash per
position (per pair) and exactly the bits used. The price is that a padded
run draws other masks than ``nn.Dropout`` did (the same distribution, so
the same model in expectation; a padded run is not bitwise the one before).

Packed titles (:mod:`mic_jax.layers.packing`) share a row, so a token's
row position is neither its position in its title nor its row in the padded
batch. :class:`TokenDropout` called with a ``packed`` index draws the padded
batch's mask (``[R * S, title_length, ...]``) and gathers each token's
element at (its product, its title position), so a packed step gets the
very masks of the padded step of the same products.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mic_jax.layers import packing


def keep_mask(key: jax.Array, keep_prob: float, shape: Sequence[int],
              position_axes: Sequence[int]) -> jnp.ndarray:
  """A boolean mask of ``shape``, True with probability ``keep_prob``.

  The slice at index ``i`` of each axis in ``position_axes`` (for two axes,
  at the pair ``(i, j)``) is drawn from ``key`` folded with ``i`` (then
  ``j``) over the other axes, so it is the same whatever the length of the
  position axes.
  """
  ndim = len(shape)
  axes = sorted({a % ndim for a in position_axes})
  rest = tuple(d for a, d in enumerate(shape) if a not in axes)

  def draw(key, lengths):
    if not lengths:
      return jax.random.bernoulli(key, keep_prob, rest)
    return jax.vmap(lambda i: draw(jax.random.fold_in(key, i), lengths[1:]))(
        jnp.arange(lengths[0]))

  mask = draw(key, [shape[a] for a in axes])  # [*position axes, *rest]
  return jnp.moveaxis(mask, tuple(range(len(axes))), tuple(axes))


class TokenDropout(nn.Module):
  """Inverted dropout with a per-position mask (see the module docstring).

  Attributes:
    rate: probability of zeroing an element.
    position_axes: the axes indexed by title position (``(1,)`` for
      ``[B, L, D]`` hidden states, ``(2, 3)`` for ``[B, H, Lq, Lk]``
      attention probabilities).
  """
  rate: float
  position_axes: tuple[int, ...] = (1,)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, deterministic: bool,
               packed: packing.PackedIndex | None = None) -> jnp.ndarray:
    """``packed``: ``x`` is packed titles (``[R, P, D]`` states or ``[R, H,
    P, P]`` attention probabilities); see the module docstring."""
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    key = self.make_rng("dropout")
    if packed is None:
      keep = keep_mask(key, keep_prob, x.shape, self.position_axes)
    else:
      keep = _packed_keep_mask(key, keep_prob, x.shape, self.position_axes,
                               packed)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype),
                     jnp.zeros_like(x))


def _packed_keep_mask(key: jax.Array, keep_prob: float, shape: Sequence[int],
                      position_axes: Sequence[int],
                      packed: packing.PackedIndex) -> jnp.ndarray:
  """The padded batch's :func:`keep_mask`, gathered at the packed tokens.

  Supports the two layouts the models use: hidden states ``[R, P, ...]``
  with ``position_axes=(1,)`` and attention probabilities ``[R, H, P, P]``
  with ``(2, 3)``. A (query, key) pair of two titles gets some mask: its
  probability is 0 (the segment mask), so the mask never matters there.
  """
  n, t = packed.num_examples, packed.title_length
  example, pos = packed.example_ids, packed.title_positions  # [R, P]
  axes = tuple(a % len(shape) for a in position_axes)
  if axes == (1,):
    full = keep_mask(key, keep_prob, (n, t, *shape[2:]), (1,))
    return full[example, pos]
  if axes == (2, 3) and len(shape) == 4:
    full = keep_mask(key, keep_prob, (n, shape[1], t, t), (2, 3))
    # Advanced indices around a slice: the result is [R, P, P, H].
    picked = full[example[:, :, None], :, pos[:, :, None], pos[:, None, :]]
    return jnp.moveaxis(picked, 3, 1)
  raise ValueError(f"packed dropout supports [R, P, D] (axes (1,)) and "
                   f"[R, H, P, P] (axes (2, 3)), got shape {tuple(shape)} "
                   f"with axes {tuple(position_axes)}")
