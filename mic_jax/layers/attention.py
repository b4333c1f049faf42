"""Scaled dot-product attention for every model, with a choice of kernel.

BERT's self-attention, ViT's and the two SA terms of the cross-modal fusion
(eq. 2) all call :func:`dot_product_attention`; ``implementation`` picks how
it runs (``config.model.attention_impl``):

* ``"einsum"`` (default): two einsums and a float32 softmax written out here,
  the path the models were built and checked against Hugging Face with.
  It is the only one with dropout on the attention probabilities.
* ``"xla"``: :func:`jax.nn.dot_product_attention` with
  ``implementation="xla"``; the same arithmetic (float32 logits and
  softmax), left to XLA to fuse, on every backend.
* ``"cudnn"``: :func:`jax.nn.dot_product_attention` with cuDNN's fused
  (flash) kernel; NVIDIA GPUs only, bf16/fp16 inputs.

The fused kernels have no dropout on the attention probabilities. When that
dropout is active (training with a rate > 0, e.g. BERT's
``attention_probs_dropout_prob`` 0.1) the einsum path runs instead, so the
model trained is the one configured; set the rate to 0 to train on the
fused kernel.

Masks. ``bias`` is added to the scaled logits (BERT's additive padding
bias). ``mask`` is boolean, True where a key may be attended to; with
``empty_rows_zero`` a query row with no valid key returns exact zeros (the
fusion's photo-less products, :func:`masked_softmax`), on every path: the
fused kernels give such a row a uniform average, which is then multiplied
by 0.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from mic_jax.layers import dropout as dropout_lib

IMPLEMENTATIONS = ("einsum", "xla", "cudnn")

Dtype = Any


def check_implementation(implementation: str) -> str:
  """Returns ``implementation`` or raises naming the config field."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention_impl must be one of "
                     f"{IMPLEMENTATIONS}, got {implementation!r}")
  return implementation


def masked_softmax(logits: jnp.ndarray, mask: jnp.ndarray,
                   axis: int = -1) -> jnp.ndarray:
  """Softmax over ``axis`` restricted to ``mask``; all-masked rows give 0.

  The usual additive ``-inf`` / ``finfo.min`` bias turns an all-masked row
  into a uniform average over the masked entries (or NaN), which would let a
  photo-less product attend to its placeholder image. Here masked entries
  get probability exactly 0 and a row with nothing to attend to is all
  zeros, with finite gradients.

  Args:
    logits: any float array; computed in float32.
    mask: boolean (or 0/1) array broadcastable to ``logits``.
    axis: the axis normalised over.

  Returns:
    float32 probabilities with ``logits``'s shape.
  """
  logits = logits.astype(jnp.float32)
  mask = jnp.broadcast_to(mask.astype(bool), logits.shape)
  peak = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=axis, keepdims=True)
  peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  # The inner where keeps exp() away from masked (possibly huge) logits so
  # neither the value nor its gradient can overflow.
  e = jnp.where(mask, jnp.exp(jnp.where(mask, logits - peak, 0.0)), 0.0)
  total = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def dot_product_attention(query: jnp.ndarray, key: jnp.ndarray,
                          value: jnp.ndarray, *,
                          bias: jnp.ndarray | None = None,
                          mask: jnp.ndarray | None = None,
                          scale: float | None = None,
                          empty_rows_zero: bool = False,
                          implementation: str = "einsum",
                          dropout_rate: float = 0.0,
                          deterministic: bool = True,
                          position_dropout: bool = False,
                          packed: Any = None,
                          dtype: Dtype = jnp.float32) -> jnp.ndarray:
  """``softmax(q k^T * scale + bias, masked) v`` per head.

  Call it inside a compact method: the einsum path's dropout is a child
  module of the calling module (it holds no parameters).

  Args:
    query: ``[B, Tq, H, D]``.
    key, value: ``[B, Tk, H, D]``.
    bias: float, broadcastable to ``[B, H, Tq, Tk]``, added to the logits.
    mask: bool, broadcastable to ``[B, H, Tq, Tk]``; True = may attend.
    scale: logit scale; None divides by ``sqrt(D)``.
    empty_rows_zero: rows whose ``mask`` is all False give zeros (needs
      ``mask``); otherwise they follow the plain softmax.
    implementation: one of :data:`IMPLEMENTATIONS`.
    dropout_rate, deterministic: dropout on the attention probabilities.
    position_dropout: draw that dropout's mask per (query, key) position
      pair (:class:`mic_jax.layers.dropout.TokenDropout`), so it does not
      depend on how far the titles are padded; for attention over title
      tokens (BERT, the fusion). Otherwise one ``nn.Dropout`` draw.
    packed: a :class:`mic_jax.layers.packing.PackedIndex` when query and
      key are packed titles: the dropout mask is then the padded batch's
      (needs ``position_dropout``).
    dtype: compute dtype of the probabilities-times-values product.

  Returns:
    ``[B, Tq, H, D]`` in ``dtype``.
  """
  check_implementation(implementation)
  if empty_rows_zero and mask is None:
    raise ValueError("empty_rows_zero needs a mask")
  if packed is not None and not position_dropout:
    raise ValueError("packed titles need position_dropout")
  use_dropout = dropout_rate > 0 and not deterministic
  if implementation != "einsum" and use_dropout:
    logging.log_first_n(
        logging.WARNING, "attention_impl=%s has no dropout on attention "
        "probabilities; the einsum path runs while dropout %.3g is active",
        1, implementation, dropout_rate)
    implementation = "einsum"
  if implementation == "einsum":
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                        preferred_element_type=jnp.float32)
    if scale is None:
      logits = logits / jnp.sqrt(jnp.float32(query.shape[-1]))
    elif scale != 1.0:
      logits = logits * jnp.float32(scale)
    if bias is not None:
      logits = logits + bias
    if empty_rows_zero:
      weights = masked_softmax(logits, mask)
    else:
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      weights = jax.nn.softmax(logits, axis=-1)
    if position_dropout:
      weights = dropout_lib.TokenDropout(dropout_rate, position_axes=(2, 3))(
          weights, deterministic=not use_dropout, packed=packed)
    else:
      weights = nn.Dropout(dropout_rate)(weights,
                                         deterministic=not use_dropout)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype),
                      value.astype(dtype))

  query, key, value = (x.astype(dtype) for x in (query, key, value))
  batch, q_len, heads, _ = query.shape
  k_len = key.shape[1]
  full = (batch, heads, q_len, k_len)
  if mask is not None:
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), full)
  if bias is not None:
    # cuDNN takes the bias in the inputs' dtype; XLA adds it in float32.
    bias = jnp.broadcast_to(bias, full).astype(
        jnp.float32 if implementation == "xla" else dtype)
  out = jax.nn.dot_product_attention(
      query, key, value, bias=bias, mask=mask, scale=scale,
      implementation=implementation)
  if empty_rows_zero:
    has_key = jnp.any(mask, axis=-1)  # [B, H, Tq]
    out = out * jnp.swapaxes(has_key, 1, 2)[..., None].astype(out.dtype)
  return out.astype(dtype)
