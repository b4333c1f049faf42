"""The Vision Transformer image tower (Dosovitskiy et al., 2020) in linen.

The parameter tree uses the names of Google's released ViT checkpoints
(google-research/vision_transformer), so a released ``.npz`` file loads
without renaming, and a person can check any weight by eye against it:

  embedding/{kernel,bias}                       patch projection (a conv)
  cls                                           [1, 1, D] class token
  Transformer/posembed_input/pos_embedding      [1, 1+N, D] (N for "gap")
  Transformer/encoderblock_{i}/LayerNorm_0
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/
      {query,key,value}/kernel [D, heads, head_dim], out/kernel [heads,
      head_dim, D], each with a bias
  Transformer/encoderblock_{i}/LayerNorm_2
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}
  Transformer/encoderblock_{i}/LayerScale_{1,3}/scale
                                                [D], only with layer_scale_init
                                                (DINOv2): scales the output
                                                of sub-module 1 / 3
  Transformer/encoder_norm
  pre_logits, head                              optional, off by default

The odd suffixes (``_1``, ``_2``, ``_3``) are the automatic names the
original pre-linen code gave; keeping them is what makes loading free.

Output contract shared by every image tower: ``__call__(images, train=...)``
returns tokens ``[B, 1+N, D]`` after the final LayerNorm, where index 0 is
the global representation (the class token, or for a "gap" model the mean
of the N patch tokens). The fusion layers need every token. Only when
``num_classes`` is set does the module act as a standalone classifier and
return logits ``[B, num_classes]`` instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mic_jax.layers import attention
from mic_jax.layers import partitioning as P
from mic_jax.layers import precision

Dtype = Any

# Google's checkpoints were trained with flax's ``nn.gelu``, whose default is
# the tanh approximation; running them with the exact erf form changes every
# activation slightly, so the activation is a model option, not a constant.
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
}

CLASSIFIERS = ("token", "gap")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT hyper-parameters.

  Attributes:
    patch_size: side of the square patches, in pixels.
    width: token width D.
    depth: number of encoder blocks.
    mlp_dim: inner width of each MLP block.
    num_heads: attention heads; must divide ``width``.
    classifier: "token" (a learned class token at index 0, the original ViT)
      or "gap" (no class token; index 0 of the output is the mean of the
      patch tokens). It also decides whether the position embedding has a
      row for the class token, so no loader ever guesses it from shapes.
    representation_size: width of the tanh ``pre_logits`` layer that the
      ImageNet-21k checkpoints carry; used only with ``num_classes``.
    num_classes: adds a linear ``head`` and makes the module a classifier.
    dropout: dropout rate after the embeddings, inside and after each MLP and
      after attention (the original ViT places it there).
    attention_dropout: dropout on the attention weights.
    activation: key of :data:`ACTIVATIONS`.
    layer_norm_eps: 1e-6 in every released checkpoint (flax's default).
    image_size: (height, width) the position embeddings were made for; when
      set, images of another size are rejected with a message saying how to
      resize the embeddings, instead of failing inside flax.
    remat: recompute each block's activations in the backward pass.
    scan_layers: run the blocks under ``nn.scan`` (one compiled block,
      weights stacked as ``Transformer/encoderblock/...`` on a leading
      layer axis, big_vision's scanned layout) instead of unrolled
      ``encoderblock_{i}``; same numbers.
    layer_scale_init: None (default, the original ViT) or the initial value
      of LayerScale (Touvron et al. 2021, used by DINOv2): a learned
      per-channel scale on the attention output and on the MLP output of
      every block. Its parameters exist only when this is set.
    pixel_mean, pixel_std: the per-channel (R, G, B) normalisation the
      checkpoint was trained with, on pixels in [0, 1] (ImageNet's for
      DINOv2). The tower still takes images in [-1, 1] like every tower and
      applies ``((images + 1) / 2 - mean) / std`` itself. None (default)
      feeds the images as they are, which is what mean = std = 0.5 means.
    attention_impl: how attention runs, not the architecture: "einsum",
      "xla" or "cudnn" (:mod:`mic_jax.layers.attention`).
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  classifier: str = "token"
  representation_size: int | None = None
  num_classes: int | None = None
  dropout: float = 0.0
  attention_dropout: float = 0.0
  activation: str = "gelu_tanh"
  layer_norm_eps: float = 1e-6
  image_size: tuple[int, int] | None = None
  remat: bool = False
  layer_scale_init: float | None = None
  pixel_mean: tuple[float, float, float] | None = None
  pixel_std: tuple[float, float, float] | None = None
  attention_impl: str = "einsum"
  scan_layers: bool = False

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads "
                       f"{self.num_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; known: "
                       f"{sorted(ACTIVATIONS)}")
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"unknown classifier {self.classifier!r}; known: "
                       f"{CLASSIFIERS}")
    attention.check_implementation(self.attention_impl)
    if self.representation_size and not self.num_classes:
      raise ValueError("representation_size (pre_logits) is only used by the "
                       "classification head; set num_classes too, or drop it")
    if self.image_size is not None:
      size = tuple(self.image_size)
      object.__setattr__(self, "image_size", size)
      if len(size) != 2 or any(s % self.patch_size for s in size):
        raise ValueError(f"image_size {size} must be two multiples of "
                         f"patch_size {self.patch_size}")
    if (self.pixel_mean is None) != (self.pixel_std is None):
      raise ValueError("pixel_mean and pixel_std go together; got mean "
                       f"{self.pixel_mean} and std {self.pixel_std}")
    if self.pixel_mean is not None:
      mean = tuple(float(m) for m in self.pixel_mean)
      std = tuple(float(s) for s in self.pixel_std)
      if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"pixel_mean {mean} and pixel_std {std} must be "
                         "three numbers each (R, G, B), std > 0")
      object.__setattr__(self, "pixel_mean", mean)
      object.__setattr__(self, "pixel_std", std)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


# Published sizes (Dosovitskiy et al. 2020, Table 1; Ti and S from Touvron et
# al. / Steiner et al.): width, depth, mlp_dim, heads. A name is SIZE/PATCH.
_WIDTHS = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}
# Sizes of our own: "tiny" for unit tests, "small-scratch" for the CPU-sized
# `small` preset (4 blocks trained from scratch on 64x64 photos).
_OWN_SIZES = {
    "tiny": dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2),
    "small-scratch": dict(patch_size=8, width=192, depth=4, mlp_dim=768,
                          num_heads=3),
}
VIT_NAMES = ("Ti/16", "S/16", "B/16", "B/32", "L/16", "L/32", "H/14",
             *_OWN_SIZES)


def vit_config(variant: str, **overrides: Any) -> ViTConfig:
  """The config of a named size, e.g. ``"L/16"`` or ``"tiny"``.

  Any ``SIZE/PATCH`` with SIZE in Ti, S, B, L, H is accepted (``B/8``...);
  the names in :data:`VIT_NAMES` are the published ones.
  """
  if variant in _OWN_SIZES:
    base = dict(_OWN_SIZES[variant])
  else:
    match = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", variant)
    if not match:
      raise ValueError(f"unknown ViT variant {variant!r}; known: "
                       f"{', '.join(VIT_NAMES)} (or any SIZE/PATCH)")
    base = dict(_WIDTHS[match.group(1)], patch_size=int(match.group(2)))
  fields = {f.name for f in dataclasses.fields(ViTConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown ViT option(s) {unknown}; known: "
                     f"{sorted(fields)}")
  return ViTConfig(**{**base, **overrides})


def get_vit(variant: str, *, dtype: Dtype = jnp.float32,
            param_dtype: Dtype = jnp.float32,
            **overrides: Any) -> "VisionTransformer":
  """Builds a ViT by name; ``overrides`` are :class:`ViTConfig` fields."""
  return VisionTransformer(vit_config(variant, **overrides), dtype=dtype,
                           param_dtype=param_dtype)


class _ViTModule(nn.Module):
  """Fields every ViT sub-module shares."""
  config: ViTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def kw(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def layer_norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=self.config.layer_norm_eps,
        scale_init=P.logical(nn.initializers.ones, (P.NORM,)),
        bias_init=P.logical(nn.initializers.zeros, (P.NORM,)),
        name=name, **self.kw)


class LayerScale(nn.Module):
  """Multiplies each channel by a learned scale (DINOv2's ``lambda1``)."""
  init_value: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param(
        "scale", P.logical(nn.initializers.constant(self.init_value),
                           (P.NORM,)),
        (x.shape[-1],), self.param_dtype)
    return x * scale.astype(x.dtype)


class MlpBlock(_ViTModule):
  """Dense -> activation -> dropout -> Dense -> dropout."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    cfg = self.config
    # The released models used xavier-uniform kernels and tiny random biases.
    bias_init = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(
        cfg.mlp_dim,
        kernel_init=P.logical(nn.initializers.xavier_uniform(),
                              (P.EMBED, P.MLP)),
        bias_init=P.logical(bias_init, (P.MLP,)),
        dot_general=precision.dense_dot_general(self.dtype),
        name="Dense_0", **self.kw)(x)
    x = ACTIVATIONS[cfg.activation](x)
    x = P.constrain(x, (P.BATCH, P.LENGTH, P.ACT_MLP))
    x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
    x = nn.Dense(
        cfg.width,
        kernel_init=P.logical(nn.initializers.xavier_uniform(),
                              (P.MLP, P.EMBED)),
        bias_init=P.logical(bias_init, (P.EMBED,)),
        dot_general=precision.dense_dot_general(self.dtype),
        name="Dense_1", **self.kw)(x)
    return nn.Dropout(cfg.dropout)(x, deterministic=not train)


class HeadsDense(nn.Module):
  """``DenseGeneral`` over per-head axes, initialised like its flat matrix.

  The kernel keeps the checkpoints' layout (``[D, heads, head_dim]`` for the
  q/k/v projections, ``[heads, head_dim, D]`` for the output) and its
  logical axis names have the kernel's full rank. ``flax.linen.DenseGeneral``
  cannot be used with logical names under a mesh: it boxes the *flattened*
  2-D kernel, and the sharding constraint of the 3 names fails on it.
  """
  features: tuple[int, ...] = ()
  contract: int = 1
  kernel_axes: tuple[str | None, ...] = ()
  bias_axes: tuple[str | None, ...] = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    in_shape = x.shape[x.ndim - self.contract:]
    shape = (*in_shape, *self.features)
    flat = (math.prod(in_shape), math.prod(self.features))
    xavier = nn.initializers.xavier_uniform()

    def kernel_init(key, shape, dtype):
      return jnp.reshape(xavier(key, flat, dtype), shape)

    kernel = self.param("kernel", P.logical(kernel_init, self.kernel_axes),
                        shape, self.param_dtype)
    bias = self.param("bias", P.logical(nn.initializers.zeros,
                                        self.bias_axes),
                      tuple(self.features), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    # The product as one flat [in, out] matmul: a Dense contraction, which
    # below float32 accumulates in float32 (models/precision.py).
    dot = precision.dense_dot_general(self.dtype) or jax.lax.dot_general
    batch = x.shape[:x.ndim - self.contract]
    y = dot(x.reshape(*batch, flat[0]), kernel.reshape(flat),
            (((len(batch),), (0,)), ((), ())))
    return y.reshape(*batch, *self.features) + bias


class SelfAttention(_ViTModule):
  """Multi-head self-attention with per-head projection kernels.

  Logits and softmax run in float32 whatever the compute dtype, so bf16
  training keeps a stable softmax.
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    cfg = self.config

    def project(name):
      return HeadsDense(
          (cfg.num_heads, cfg.head_dim), contract=1,
          kernel_axes=(P.EMBED, P.HEADS, None), bias_axes=(P.HEADS, None),
          name=name, **self.kw)(x)

    q, k, v = project("query"), project("key"), project("value")
    q = q / jnp.sqrt(cfg.head_dim).astype(q.dtype)
    y = attention.dot_product_attention(
        q, k, v, scale=1.0, implementation=cfg.attention_impl,
        dropout_rate=cfg.attention_dropout, deterministic=not train,
        dtype=self.dtype)
    y = P.constrain(y, (P.BATCH, P.LENGTH, P.ACT_HEADS, None))
    return HeadsDense((cfg.width,), contract=2,
                      kernel_axes=(P.HEADS, None, P.EMBED),
                      bias_axes=(P.EMBED,), name="out", **self.kw)(y)


class Encoder1DBlock(_ViTModule):
  """Pre-LayerNorm block: x + Attn(LN(x)), then x + MLP(LN(x)).

  With ``layer_scale_init`` each branch is scaled per channel before it is
  added: x + ls1 * Attn(LN(x)), then x + ls2 * MLP(LN(x)).
  """

  def layer_scale(self, name: str, y: jnp.ndarray) -> jnp.ndarray:
    if self.config.layer_scale_init is None:
      return y
    return LayerScale(self.config.layer_scale_init, name=name,
                      param_dtype=self.param_dtype)(y)

  scan_body: bool = False  # Return (x, None) for nn.scan.

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    cfg = self.config
    y = self.layer_norm("LayerNorm_0")(x)
    y = SelfAttention(cfg, name="MultiHeadDotProductAttention_1",
                      **self.kw)(y, train=train)
    y = self.layer_scale("LayerScale_1", y)
    y = nn.Dropout(cfg.dropout)(y, deterministic=not train)
    x = x + y
    y = self.layer_norm("LayerNorm_2")(x)
    y = MlpBlock(cfg, name="MlpBlock_3", **self.kw)(y, train=train)
    y = self.layer_scale("LayerScale_3", y)
    x = x + y
    x = P.constrain(x, (P.BATCH, P.LENGTH, P.ACT_EMBED))
    return (x, None) if self.scan_body else x


class Encoder(_ViTModule):
  """Position embeddings, the block stack and the final LayerNorm.

  ``first``/``last`` run only blocks ``first .. last - 1``: the position
  embeddings are added only when the stack starts at block 0, the final
  LayerNorm only when it ends at the top. A frozen lower part's output can
  so be computed once (``last``) and the top blocks trained on it
  (``first``; :mod:`mic_jax.features.image_features`).
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool, first: int = 0,
               last: int | None = None) -> jnp.ndarray:
    cfg = self.config
    last = cfg.depth if last is None else last
    if not 0 <= first <= last <= cfg.depth:
      raise ValueError(f"ViT blocks {first}..{last} are not within the "
                       f"{cfg.depth} blocks of the tower")
    if cfg.scan_layers and (first, last) != (0, cfg.depth):
      raise ValueError("a scanned ViT (model.scan_layers) runs all its "
                       "blocks at once; part of the stack needs it unscanned")
    if first == 0:
      posemb = PositionEmbedding(cfg, name="posembed_input",
                                 param_dtype=self.param_dtype)(x)
      x = x + posemb.astype(x.dtype)
      x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
    block_cls = (nn.remat(Encoder1DBlock, static_argnums=(2,)) if cfg.remat
                 else Encoder1DBlock)
    if cfg.scan_layers:
      stack = P.scan_layers(block_cls, length=cfg.depth, num_broadcast=1)
      x, _ = stack(cfg, scan_body=True, name="encoderblock", **self.kw)(
          x, train)
    else:
      for i in range(first, last):
        x = block_cls(cfg, name=f"encoderblock_{i}", **self.kw)(x, train)
    if last < cfg.depth:
      return x
    return self.layer_norm("encoder_norm")(x)


class PositionEmbedding(nn.Module):
  """The learned ``pos_embedding`` ``[1, L, D]`` for an input of length L."""
  config: ViTConfig
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # std 0.02 as in BERT and the original ViT.
    return self.param(
        "pos_embedding",
        P.logical(nn.initializers.normal(stddev=0.02),
                  (None, P.POSITIONS, P.EMBED)),
        (1, x.shape[1], x.shape[2]), self.param_dtype)


def normalize_pixels(images: jnp.ndarray, cfg: ViTConfig) -> jnp.ndarray:
  """[-1, 1] images -> the checkpoint's normalised pixels (see ViTConfig).

  Computed in float32 (at least) whatever the compute dtype, like the
  preprocessing a checkpoint was trained with.
  """
  if cfg.pixel_mean is None:
    return images
  dtype = jnp.promote_types(images.dtype, jnp.float32)
  mean = jnp.asarray(cfg.pixel_mean, dtype)
  std = jnp.asarray(cfg.pixel_std, dtype)
  return ((images.astype(dtype) + 1) / 2 - mean) / std


class VisionTransformer(_ViTModule):
  """ViT image tower; see the module docstring for names and outputs."""

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool = False,
               stop_block: int | None = None, start_block: int = 0
               ) -> jnp.ndarray:
    """Encodes images scaled to [-1, 1].

    Args:
      images: ``[B, H, W, 3]``; H and W multiples of the patch size. With
        ``start_block > 0``, the hidden tokens ``[B, T, D]`` entering that
        block instead (what ``stop_block=start_block`` returned).
      train: enables dropout (uses the ``dropout`` RNG).
      stop_block: return the hidden tokens after this many blocks (before
        the final LayerNorm) instead of the tower's output.
      start_block: resume from hidden tokens at this block (see ``images``).
        ``tower(tower(x, stop_block=k), start_block=k)`` equals
        ``tower(x)``.

    Returns:
      Tokens ``[B, 1+N, D]`` (N = H*W / patch^2), or logits
      ``[B, num_classes]`` when the config has a head; the hidden tokens
      with ``stop_block``.
    """
    cfg = self.config
    if start_block:
      if images.ndim != 3:
        raise ValueError("start_block resumes from hidden tokens [B, T, D], "
                         f"got shape {images.shape}")
      return self._output(Encoder(cfg, name="Transformer", **self.kw)(
          images.astype(self.dtype), train=train, first=start_block))
    if images.ndim != 4:
      raise ValueError(f"images must be [B, H, W, C], got {images.shape}")
    height, width = images.shape[1:3]
    if height % cfg.patch_size or width % cfg.patch_size:
      raise ValueError(f"image size {height}x{width} is not a multiple of "
                       f"the patch size {cfg.patch_size}")
    if cfg.image_size is not None and (height, width) != cfg.image_size:
      raise ValueError(
          f"this ViT's position embeddings are for {cfg.image_size[0]}x"
          f"{cfg.image_size[1]} images, got {height}x{width}; load the "
          "checkpoint with image_size=... to resize them")
    images = normalize_pixels(images, cfg)
    x = nn.Conv(
        cfg.width, (cfg.patch_size, cfg.patch_size),
        strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
        kernel_init=P.logical(nn.initializers.lecun_normal(),
                              (None, None, None, P.EMBED)),
        bias_init=P.logical(nn.initializers.zeros, (P.EMBED,)),
        name="embedding", **self.kw)(images.astype(self.dtype))
    batch, gh, gw, dim = x.shape
    x = jnp.reshape(x, (batch, gh * gw, dim))
    if cfg.classifier == "token":
      cls = self.param("cls", P.logical(nn.initializers.zeros,
                                        (None, None, P.EMBED)),
                       (1, 1, dim), self.param_dtype)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, dim)), x], axis=1)
    x = P.constrain(x, (P.BATCH, P.LENGTH, P.ACT_EMBED))
    x = Encoder(cfg, name="Transformer", **self.kw)(x, train=train,
                                                     last=stop_block)
    if stop_block is not None:
      return x
    return self._output(x)

  def _output(self, x: jnp.ndarray) -> jnp.ndarray:
    """The encoder's normalized tokens -> the tower's output (and head)."""
    cfg = self.config
    if cfg.classifier == "gap":
      x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
    tokens = P.constrain(x, (P.BATCH, P.LENGTH, P.ACT_EMBED))
    if not cfg.num_classes:
      return tokens

    rep = tokens[:, 0]
    if cfg.representation_size:
      rep = jnp.tanh(nn.Dense(
          cfg.representation_size,
          kernel_init=P.logical(nn.initializers.lecun_normal(),
                                (P.EMBED, None)),
          bias_init=P.logical(nn.initializers.zeros, (None,)),
          name="pre_logits", **self.kw)(rep))
    # A zero head starts fine-tuning from the pretrained features unchanged.
    return nn.Dense(
        cfg.num_classes,
        kernel_init=P.logical(nn.initializers.zeros, (None, P.CLASSES)),
        bias_init=P.logical(nn.initializers.zeros, (P.CLASSES,)),
        name="head", **self.kw)(rep)


def count_params(tree: Any) -> int:
  """Number of scalars in a (possibly abstract or boxed) parameter tree."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(tree))
  return sum(math.prod(leaf.shape) for leaf in leaves)
