"""Fusion layers and classifier heads: how text and image meet (paper, 3.3).

* :class:`CrossModalAttention`: the gated cross-modal attention of eqs.
  (1)-(4), the paper's best system::

    h'   = SA(h, h, h) + VG ⊙ SA(h, v, v)                       (1)
    SA(q, k, v) = softmax((W_Q q)(W_K k)^T / sqrt(d_k)) W_V v    (2)
    VG_i = sigmoid(W_1 h_i + W_2 v_0 + b)                        (3)
    y    = softmax(W_3 Σ_i h'_i)                                 (4)

  This module computes ``Σ_i h'_i``; ``W_3`` and the softmax are the
  :class:`ClassifierHead` (logits) and the loss.
* :class:`EarlyFusion`: the "shallow" fusion of 3.3.2, concatenating the two
  global ([CLS]) vectors and passing them through an MLP layer.
* :class:`ClassifierHead`: optional MLP, dropout, then the class logits.

Products without a photo. The data pipeline marks them with
``image_present = 0`` and feeds an all-zero image. A zero image still has
tokens (the tower's biases and position embeddings), so attending to it would
inject the same made-up "image" into every photo-less product. Therefore:

* cross-modal attention masks *every* image key of such an example, so the
  cross-attention row is all-masked; the masked softmax returns exact zeros
  for all-masked rows (not NaN, not a uniform average), the gate is
  multiplied by the flag as well, and ``h'`` reduces exactly to
  ``SA(h, h, h)``: the text-only path;
* early fusion zeroes the image vector and appends the flag itself as one
  more input feature, so the MLP can learn a separate offset for "no photo"
  instead of reading the zero image's features as evidence.

Attention logits, softmax and the pooled sum run in float32 whatever the
compute dtype, so bf16 training keeps a stable softmax and a sum over up to
``L`` tokens does not lose precision.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mic_jax.layers import attention
from mic_jax.layers import partitioning as P
from mic_jax.layers import precision

Dtype = Any
POOLS = ("sum", "mean")


HEAD_INIT_STD = 0.02


def _dense_init():
  return nn.initializers.xavier_uniform()


class Attention(nn.Module):
  """``SA(q, k, v)`` of eq. (2), multi-head, with key masking.

  ``W_Q`` maps the query width to ``out_features``, ``W_K`` and ``W_V`` map
  the key/value width (which may differ, e.g. ViT-L's 1024 against BERT's
  768) to ``out_features``. With ``heads = 1`` this is eq. (2) verbatim with
  ``d_k = out_features``; with ``H`` heads each head has
  ``d_k = out_features / H`` and the head outputs are concatenated.
  Eq. (2) has no biases and no output projection, so both are off unless
  asked for.

  Attributes:
    out_features: width of the result (the text width ``Dt`` in eq. 1).
    heads: number of attention heads; must divide ``out_features``.
    use_bias: biases on the Q/K/V projections.
    out_proj: a final ``Dt x Dt`` projection of the concatenated heads.
    dropout: dropout rate on the attention probabilities.
    attention_impl: "einsum", "xla" or "cudnn"
      (:mod:`mic_jax.layers.attention`); every one returns zeros for a row
      with no valid key.
  """
  out_features: int
  heads: int = 1
  use_bias: bool = False
  out_proj: bool = False
  dropout: float = 0.0
  attention_impl: str = "einsum"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jnp.ndarray, kv: jnp.ndarray, key_mask: jnp.ndarray,
               *, train: bool = False) -> jnp.ndarray:
    """Attends from ``q [B, Lq, Dq]`` to ``kv [B, Lk, Dk]``.

    Args:
      q: queries.
      kv: keys and values (the same tensor in eq. 1's two SA terms).
      key_mask: ``[B, Lk]``, nonzero where a key may be attended to. A row
        with no valid key returns zeros.
      train: enables dropout (``dropout`` RNG).

    Returns:
      ``[B, Lq, out_features]`` in the compute dtype.
    """
    if self.out_features % self.heads:
      raise ValueError(f"fusion width {self.out_features} is not divisible by "
                       f"heads={self.heads}")
    head_dim = self.out_features // self.heads

    def project(x, name):
      # One [D_in, heads * head_dim] matrix (the W of eq. 2), split into heads
      # afterwards: the flattened axis shards on "tensor" even with 1 head.
      y = nn.Dense(
          self.out_features, use_bias=self.use_bias,
          kernel_init=P.logical(_dense_init(), (P.EMBED, P.HEADS)),
          bias_init=P.logical(nn.initializers.zeros, (P.HEADS,)),
          dot_general=precision.dense_dot_general(self.dtype),
          dtype=self.dtype, param_dtype=self.param_dtype, name=name)(
              x.astype(self.dtype))
      return y.reshape(*y.shape[:2], self.heads, head_dim)

    query, key, value = project(q, "query"), project(kv, "key"), project(
        kv, "value")
    y = attention.dot_product_attention(
        query, key, value, mask=key_mask[:, None, None, :] > 0,
        empty_rows_zero=True, implementation=self.attention_impl,
        dropout_rate=self.dropout, deterministic=not train,
        position_dropout=True, dtype=self.dtype)
    # Concatenating the heads is a reshape of the head-major layout.
    y = y.reshape(*y.shape[:2], self.out_features)
    # The head axis is not constrained: with 1 head (eq. 2) it cannot split.
    y = P.constrain(y, (P.BATCH, P.LENGTH, P.ACT_HEADS))
    if self.out_proj:
      y = nn.Dense(
          self.out_features,
          kernel_init=P.logical(_dense_init(), (P.HEADS, P.EMBED)),
          bias_init=P.logical(nn.initializers.zeros, (P.EMBED,)),
          dot_general=precision.dense_dot_general(self.dtype),
          dtype=self.dtype, param_dtype=self.param_dtype, name="out")(y)
    return y


class CrossModalAttention(nn.Module):
  """Gated cross-modal attention fusion, eqs. (1)-(4) of the paper.

  The two SA terms of eq. (1) have their own ``W_Q, W_K, W_V`` (sub-modules
  ``self_attn`` and ``cross_attn``): the image keys/values have a different
  width than the text, so they cannot share ``W_K, W_V``. The visual gate
  of eq. (3) is element-wise (``VG_i`` has the text width, as ``⊙`` in eq.
  (1) requires): ``W_1`` is ``gate_text`` (with the bias ``b``) and ``W_2``
  is ``gate_image`` (no bias; one ``b`` is enough).

  Masking: text padding is masked as a key in ``SA(h, h, h)`` and left out
  of the pooled sum (padding *queries* are computed and then ignored).
  When ``image_present = 0`` every image key is masked and the gate is
  zeroed, so that example's ``h'`` is exactly ``SA(h, h, h)``.

  Attributes:
    heads: attention heads of both SA terms (1 = eq. 2 as written).
    gate: the visual gate of eq. (3); off gives ``h' = SA(h,h,h) +
      SA(h,v,v)``.
    out_proj: output projections after each SA (not in the paper).
    qkv_bias: biases on the Q/K/V projections (not in the paper).
    dropout: dropout on the attention probabilities of both SA terms. (The
      pooled vector gets its dropout at the input of the classifier head.)
    pool: ``"sum"`` (eq. 4) or ``"mean"`` over the valid text tokens. The
      sum grows with the title length; mean is the option when titles vary
      a lot in length.
    image_to_output: return ``[Σ_i h'_i, LayerNorm(v_0)]`` instead of the
      pooled ``h'`` alone: the photo's global token reaches the classifier
      directly, not only through the title tokens' gated cross-attention
      (a documented deviation from eq. 4, off by default). The token is
      zeroed for a product without a photo, as the cross term is.
    return_stats: also return a dict of monitoring scalars (gate mean).
    attention_impl: how both SA terms run (:mod:`mic_jax.layers.attention`).
  """
  heads: int = 1
  gate: bool = True
  out_proj: bool = False
  qkv_bias: bool = False
  dropout: float = 0.0
  pool: str = "sum"
  image_to_output: bool = False
  return_stats: bool = False
  attention_impl: str = "einsum"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jnp.ndarray, v: jnp.ndarray,
               text_mask: jnp.ndarray | None = None,
               image_present: jnp.ndarray | None = None, *,
               train: bool = False):
    """Fuses a text sequence with an image sequence.

    Args:
      h: text tokens ``[B, L, Dt]`` (the full BERT sequence).
      v: image tokens ``[B, M, Dv]`` (the full ViT/BiT sequence; ``v[:, 0]``
        is the global token used by the gate).
      text_mask: ``[B, L]``, 1 for real tokens; all ones when omitted.
      image_present: ``[B]``, 0 for products without a photo; all ones when
        omitted.
      train: enables dropout (``dropout`` RNG).

    Returns:
      ``Σ_i h'_i`` (or the mean) ``[B, Dt]`` in the compute dtype (with
      ``image_to_output``, ``[B, Dt + Dv]``: ``LayerNorm(v_0)`` appended), and with
      ``return_stats`` a dict with ``gate_mean`` (float32 scalar; the mean of
      ``VG`` over real tokens of examples with a photo). ``h'`` is sown as
      ``intermediates/h_prime`` and the gate as ``intermediates/gate``.
    """
    if self.pool not in POOLS:
      raise ValueError(f"fusion pool must be one of {POOLS}, got {self.pool!r}")
    batch, length, width = h.shape
    if text_mask is None:
      text_mask = jnp.ones((batch, length), jnp.int32)
    if image_present is None:
      image_present = jnp.ones((batch,), jnp.int32)
    present = (image_present > 0)
    image_keys = jnp.broadcast_to(present[:, None], v.shape[:2])
    kw = dict(out_features=width, heads=self.heads, use_bias=self.qkv_bias,
              out_proj=self.out_proj, dropout=self.dropout,
              attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype)

    self_term = Attention(name="self_attn", **kw)(h, h, text_mask, train=train)
    cross_term = Attention(name="cross_attn", **kw)(h, v, image_keys,
                                                    train=train)
    flag = present.astype(self.dtype)[:, None, None]
    if self.gate:
      gate_h = nn.Dense(
          width, use_bias=True,
          kernel_init=P.logical(_dense_init(), (P.EMBED, None)),
          bias_init=P.logical(nn.initializers.zeros, (None,)),
          dot_general=precision.dense_dot_general(self.dtype),
          dtype=self.dtype, param_dtype=self.param_dtype, name="gate_text")(
              h.astype(self.dtype))
      gate_v = nn.Dense(
          width, use_bias=False,
          kernel_init=P.logical(_dense_init(), (P.EMBED, None)),
          dot_general=precision.dense_dot_general(self.dtype),
          dtype=self.dtype, param_dtype=self.param_dtype, name="gate_image")(
              v[:, 0].astype(self.dtype))
      gate = jax.nn.sigmoid(gate_h + gate_v[:, None, :]) * flag
    else:
      gate = jnp.broadcast_to(flag, (batch, length, width))
    # The all-masked cross rows are already exact zeros; the gate also being
    # zero keeps the "no photo" path independent of the placeholder image.
    h_prime = self_term + gate * cross_term
    h_prime = P.constrain(h_prime, (P.BATCH, P.LENGTH, P.ACT_EMBED))
    self.sow("intermediates", "h_prime", h_prime)
    self.sow("intermediates", "gate", gate)

    tokens = (text_mask > 0).astype(jnp.float32)
    pooled = jnp.einsum("bl,bld->bd", tokens, h_prime.astype(jnp.float32))
    if self.pool == "mean":
      pooled = pooled / jnp.maximum(tokens.sum(-1, keepdims=True), 1.0)
    pooled = pooled.astype(self.dtype)
    if self.image_to_output:
      image_cls = nn.LayerNorm(
          epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
          scale_init=P.logical(nn.initializers.ones, (P.NORM,)),
          bias_init=P.logical(nn.initializers.zeros, (P.NORM,)),
          name="image_norm")(v[:, 0])
      pooled = jnp.concatenate([pooled, image_cls.astype(self.dtype) *
                                flag[:, 0]], axis=-1)
    if not self.return_stats:
      return pooled
    weight = tokens * present.astype(jnp.float32)[:, None]
    gate_tokens = jnp.mean(gate.astype(jnp.float32), axis=-1)
    gate_mean = jnp.sum(gate_tokens * weight) / jnp.maximum(weight.sum(), 1.0)
    return pooled, {"gate_mean": gate_mean}


class EarlyFusion(nn.Module):
  """Shallow fusion (3.3.2): concat the two global vectors, then an MLP layer.

  The input is ``[text_cls, image_cls * present, present]``: a photo-less
  product contributes a zero image vector plus a flag feature of 0, so the
  first layer learns a dedicated "no photo" offset rather than treating the
  zero image's features as a real photo. The classifier's ``head`` turns the
  result into logits.

  Attributes:
    mlp_dim: width of the hidden layer; 0 returns the concatenation itself
      (the head is then a linear classifier on it).
    dropout: dropout on the hidden layer's output.
  """
  mlp_dim: int = 512
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text_cls: jnp.ndarray, image_cls: jnp.ndarray,
               image_present: jnp.ndarray | None = None, *,
               train: bool = False) -> jnp.ndarray:
    """``[B, Dt]``, ``[B, Dv]``, ``[B]`` -> features ``[B, mlp_dim]``."""
    if image_present is None:
      image_present = jnp.ones(text_cls.shape[:1], jnp.int32)
    flag = (image_present > 0).astype(self.dtype)[:, None]
    x = jnp.concatenate([text_cls.astype(self.dtype),
                         image_cls.astype(self.dtype) * flag, flag], axis=-1)
    if not self.mlp_dim:
      return x
    x = _gelu_hidden(self, x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


def _gelu_hidden(module: nn.Module, x: jnp.ndarray) -> jnp.ndarray:
  """The ``hidden`` Dense + exact GELU layer of ``module`` (``mlp_dim`` wide).

  Called inside a compact method, so the layer is ``module``'s child.
  """
  x = nn.Dense(
      module.mlp_dim,
      kernel_init=P.logical(_dense_init(), (None, P.MLP)),
      bias_init=P.logical(nn.initializers.zeros, (P.MLP,)),
      dot_general=precision.dense_dot_general(module.dtype),
      dtype=module.dtype, param_dtype=module.param_dtype, name="hidden")(x)
  x = jax.nn.gelu(x, approximate=False)
  return P.constrain(x, (P.BATCH, P.ACT_MLP))


class ClassifierHead(nn.Module):
  """Dropout -> optional hidden layer -> logits (``W_3`` of eq. 4).

  The output layer starts small, normal with stddev 0.02 (BERT's
  ``initializer_range``, as in Hugging Face's classifiers), so a fresh model
  predicts nearly the uniform distribution (initial loss close to ``log C``).
  Not at zero: a zero head gives the towers no gradient on the first step
  and every output column the same first Adam update; a scratch BERT below
  it was measured to learn the demo's titles far more slowly that way
  (text-only loss 1.58 vs 1.00 after 300 steps). Logits are float32 whatever
  the compute dtype, so the loss and the softmax of eq. (4) are stable in
  bf16.

  Attributes:
    num_classes: number of categories.
    mlp_dim: a hidden GELU layer before the output; 0 = linear.
    dropout: dropout on the input (and on the hidden layer).
    use_bias: bias on the output layer (eq. 4 has none).
  """
  num_classes: int
  mlp_dim: int = 0
  dropout: float = 0.0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """``[B, D]`` -> float32 logits ``[B, num_classes]``."""
    x = nn.Dropout(self.dropout)(x.astype(self.dtype), deterministic=not train)
    if self.mlp_dim:
      x = _gelu_hidden(self, x)
      x = nn.Dropout(self.dropout)(x, deterministic=not train)
    logits = nn.Dense(
        self.num_classes, use_bias=self.use_bias,
        kernel_init=P.logical(nn.initializers.normal(stddev=HEAD_INIT_STD),
                              (None, P.CLASSES)),
        bias_init=P.logical(nn.initializers.zeros, (P.CLASSES,)),
        dot_general=precision.dense_dot_general(self.dtype),
        dtype=self.dtype, param_dtype=self.param_dtype, name="output")(x)
    return logits.astype(jnp.float32)
