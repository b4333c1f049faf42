"""The BERT text tower as a Flax linen module.

The parameter tree mirrors Hugging Face's BERT names one to one, so that
converting a checkpoint is a transparent renaming (``encoder.layer.3.`` ->
``encoder/layer_3/``, ``weight`` -> ``kernel``/``scale``/``embedding``) and a
person can check any weight by eye:

  embeddings/{word,position,token_type}_embeddings/embedding
  embeddings/LayerNorm/{scale,bias}
  encoder/layer_{i}/attention/self/{query,key,value}/{kernel,bias}
  encoder/layer_{i}/attention/output/dense/{kernel,bias}
  encoder/layer_{i}/attention/output/LayerNorm/{scale,bias}
  encoder/layer_{i}/intermediate/dense/{kernel,bias}
  encoder/layer_{i}/output/dense/{kernel,bias}
  encoder/layer_{i}/output/LayerNorm/{scale,bias}
  pooler/dense/{kernel,bias}

(with ``scan_layers``, ``encoder/layer/...`` holds all layers stacked on a
leading axis instead of ``encoder/layer_{i}/...``).

Every weight carries logical axis names (see ``partitioning``) so the same
module runs data-parallel, FSDP or tensor-parallel by configuration.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mic_jax.layers import attention
from mic_jax.layers import dropout as dropout_lib
from mic_jax.layers import packing as packing_lib
from mic_jax.layers import partitioning as P
from mic_jax.layers import precision

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    # BERT's "gelu" is the exact erf form; the tanh form is a different model.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters, with Hugging Face's field names and defaults."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  # How attention runs, not the architecture (mic_jax.layers.attention).
  attention_impl: str = "einsum"

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by "
          f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; "
                       f"supported: {sorted(_ACTIVATIONS)}")
    attention.check_implementation(self.attention_impl)

  @classmethod
  def from_dict(cls, values: dict[str, Any], *, source: str = "config"
                ) -> "BertConfig":
    """Builds a config from a Hugging Face ``config.json`` dict.

    Unknown keys (HF configs carry many) are ignored; settings that would
    change the architecture into something this module does not implement
    are rejected instead of being silently dropped.
    """
    model_type = values.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"{source}: model_type is {model_type!r}, not 'bert'; "
                       "only BERT-architecture checkpoints can be loaded")
    pos_type = values.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(f"{source}: position_embedding_type {pos_type!r} is "
                       "not supported (only 'absolute')")
    if values.get("is_decoder") or values.get("add_cross_attention"):
      raise ValueError(f"{source}: decoder BERT configs are not supported")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in names and v is not None}
    try:
      return cls(**kwargs)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from e

  @classmethod
  def from_json_file(cls, path: str) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f), source=path)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


# Named sizes for configs and tests. "tiny" trains in seconds on a CPU.
BERT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=128),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                  intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24,
                  num_attention_heads=16, intermediate_size=4096),
}


def get_bert_config(size: str, **overrides: Any) -> BertConfig:
  """A named BERT size (``tiny``, ``mini``, ``small``, ``base``, ``large``)."""
  if size not in BERT_SIZES:
    raise ValueError(f"unknown BERT size {size!r}; known: {sorted(BERT_SIZES)}")
  return BertConfig(**{**BERT_SIZES[size], **overrides})


def _dense(features: int, names: tuple[str | None, str | None],
           cfg: BertConfig, dtype: Dtype, param_dtype: Dtype,
           name: str = "dense") -> nn.Dense:
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=P.logical(
          nn.initializers.normal(cfg.initializer_range), names),
      bias_init=P.logical(nn.initializers.zeros, (names[1],)),
      dot_general=precision.dense_dot_general(dtype),
      name=name)


def _layer_norm(cfg: BertConfig, dtype: Dtype, param_dtype: Dtype,
                name: str = "LayerNorm") -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=P.logical(nn.initializers.ones, (P.NORM,)),
      bias_init=P.logical(nn.initializers.zeros, (P.NORM,)),
      name=name)


class _BertModule(nn.Module):
  """Fields every BERT sub-module shares."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def kw(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class BertEmbeddings(_BertModule):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, train: bool,
               packed: packing_lib.PackedIndex | None = None):
    """``packed``: positions restart at 0 for each packed title."""
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)

    def embed(num, names, name):
      return nn.Embed(num, cfg.hidden_size, embedding_init=P.logical(
          init, names), name=name, **self.kw)

    # A packed row may be longer than any position: its titles are not.
    length = input_ids.shape[1] if packed is None else packed.title_length
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds "
                       f"max_position_embeddings {cfg.max_position_embeddings}")
    x = embed(cfg.vocab_size, (P.VOCAB, P.EMBED), "word_embeddings")(input_ids)
    positions = (jnp.arange(length)[None, :] if packed is None
                 else packed.title_positions)
    x = x + embed(cfg.max_position_embeddings, (P.POSITIONS, P.EMBED),
                  "position_embeddings")(positions)
    x = x + embed(cfg.type_vocab_size, (P.TYPES, P.EMBED),
                  "token_type_embeddings")(token_type_ids)
    x = _layer_norm(cfg, **self.kw)(x)
    x = dropout_lib.TokenDropout(cfg.hidden_dropout_prob)(
        x, deterministic=not train, packed=packed)
    return P.constrain(x, (P.BATCH, P.LENGTH, P.ACT_EMBED))


class BertSelfAttention(_BertModule):
  """Multi-head self-attention with an additive padding mask.

  Logits and softmax are computed in float32 whatever the compute dtype, so
  bf16 training keeps a stable softmax.
  """

  @nn.compact
  def __call__(self, x, attention_bias, *, train: bool, packed=None):
    cfg = self.config
    batch, length, _ = x.shape

    def project(name):
      y = _dense(cfg.hidden_size, (P.EMBED, P.HEADS), cfg, name=name,
                 **self.kw)(x)
      return y.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)

    q, k, v = project("query"), project("key"), project("value")
    out = attention.dot_product_attention(
        q, k, v, bias=attention_bias, implementation=cfg.attention_impl,
        dropout_rate=cfg.attention_probs_dropout_prob,
        deterministic=not train, position_dropout=True, packed=packed,
        dtype=self.dtype)
    return out.reshape(batch, length, cfg.hidden_size)


class BertOutput(_BertModule):
  """dense -> dropout -> residual add -> LayerNorm (BERT's post-LN)."""
  in_axis: str = P.MLP

  @nn.compact
  def __call__(self, h, residual, *, train: bool, packed=None):
    cfg = self.config
    h = _dense(cfg.hidden_size, (self.in_axis, P.EMBED), cfg, **self.kw)(h)
    h = dropout_lib.TokenDropout(cfg.hidden_dropout_prob)(
        h, deterministic=not train, packed=packed)
    return _layer_norm(cfg, **self.kw)(h + residual)


class BertAttention(_BertModule):
  """``attention/self`` then ``attention/output``, as Hugging Face names them."""

  @nn.compact
  def __call__(self, x, attention_bias, *, train: bool, packed=None):
    a = BertSelfAttention(self.config, name="self", **self.kw)(
        x, attention_bias, train=train, packed=packed)
    return BertOutput(self.config, in_axis=P.HEADS, name="output", **self.kw)(
        a, x, train=train, packed=packed)


class BertIntermediate(_BertModule):
  """The feed-forward expansion ``intermediate/dense`` and its activation."""

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = _dense(cfg.intermediate_size, (P.EMBED, P.MLP), cfg, **self.kw)(x)
    h = _ACTIVATIONS[cfg.hidden_act](h)
    return P.constrain(h, (P.BATCH, P.LENGTH, P.ACT_MLP))


class BertLayer(_BertModule):
  """One post-LayerNorm transformer layer.

  ``scan_body``: return ``(x, None)``, the carry/output pair ``nn.scan``
  wants, instead of ``x``.
  """
  scan_body: bool = False

  @nn.compact
  def __call__(self, x, attention_bias, train: bool, packed=None):
    x = BertAttention(self.config, name="attention", **self.kw)(
        x, attention_bias, train=train, packed=packed)
    h = BertIntermediate(self.config, name="intermediate", **self.kw)(x)
    x = BertOutput(self.config, name="output", **self.kw)(h, x, train=train,
                                                          packed=packed)
    x = P.constrain(x, (P.BATCH, P.LENGTH, P.ACT_EMBED))
    return (x, None) if self.scan_body else x


class BertLayerStack(_BertModule):
  """The ``encoder`` scope holding ``layer_0 ... layer_{N-1}``.

  With ``scan`` it holds one ``layer`` scope instead, whose weights have a
  leading layer axis (see :func:`partitioning.scan_layers`); stacking the
  ``layer_{i}`` trees of an unrolled model gives exactly its weights.
  """
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x, attention_bias, *, train: bool, packed=None):
    # static_argnums counts the module as argument 0, so ``train`` is 3.
    layer_cls = (nn.remat(BertLayer, static_argnums=(3,)) if self.remat
                 else BertLayer)
    if self.scan:
      stack = P.scan_layers(layer_cls, length=self.config.num_hidden_layers,
                            num_broadcast=3)
      x, _ = stack(self.config, scan_body=True, name="layer", **self.kw)(
          x, attention_bias, train, packed)
      return x
    for i in range(self.config.num_hidden_layers):
      x = layer_cls(self.config, name=f"layer_{i}", **self.kw)(
          x, attention_bias, train, packed)
    return x


class BertPooler(_BertModule):
  """tanh(dense([CLS])): BERT's pooled sentence vector."""

  @nn.compact
  def __call__(self, seq):
    dense = _dense(self.config.hidden_size, (P.EMBED, None), self.config,
                   **self.kw)
    return jnp.tanh(dense(seq[:, 0]))


class BertEncoder(_BertModule):
  """BERT: embeddings, ``num_hidden_layers`` layers, tanh pooler.

  Attributes:
    config: the architecture.
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision).
    param_dtype: parameter dtype (keep ``float32`` master weights).
    remat: recompute each layer's activations in the backward pass, trading
      compute for memory on long sequences / large batches.
    scan_layers: run the layers under ``nn.scan`` (one compiled layer,
      weights stacked as ``encoder/layer/...`` on a leading layer axis)
      instead of unrolled ``encoder/layer_{i}``; same numbers.
  """
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               train: bool = False,
               packed: packing_lib.PackedIndex | None = None):
    """Encodes token ids.

    Args:
      input_ids: int ``[B, L]``.
      attention_mask: ``[B, L]``, 1 for real tokens, 0 for padding; all ones
        when omitted.
      token_type_ids: int ``[B, L]``; zeros when omitted.
      train: enables dropout (needs a ``dropout`` RNG).
      packed: the rows are packed titles (:mod:`mic_jax.layers.packing`):
        attention is block-diagonal by segment, positions restart per
        title, and the outputs are per product, unpacked.

    Returns:
      ``(sequence [B, L, H], pooled [B, H])`` in the compute dtype; packed,
      ``(sequence [R * S, T, H], pooled [R * S, H])`` with ``T =
      packed.title_length`` (:func:`packing.unpack`; its mask is
      ``packing.unpack``'s too).
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(self.config, name="embeddings", **self.kw)(
        input_ids, token_type_ids, train=train, packed=packed)
    if packed is None:
      # Additive mask; float32 min keeps fully padded rows finite after
      # softmax.
      bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                       jnp.finfo(jnp.float32).min).astype(jnp.float32)
    else:
      bias = packing_lib.attention_bias(packed, attention_mask)
    seq = BertLayerStack(self.config, remat=self.remat, scan=self.scan_layers,
                         name="encoder", **self.kw)(x, bias, train=train,
                                                    packed=packed)
    if packed is not None:
      seq, _ = packing_lib.unpack(seq, packed)
    pooled = BertPooler(self.config, name="pooler", **self.kw)(seq)
    return seq, pooled
