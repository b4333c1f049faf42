"""The BiT image tower: ResNet-v2 with GroupNorm and weight standardization.

Big Transfer (Kolesnikov et al., 2020) is the paper's ResNet baseline
(BiT-M R152x4). The parameter tree uses the names of the released BiT
``.npz`` files, so loading them is a pass-through and any weight can be
checked by eye against the file:

  resnet/root_block/standardized_conv2d/kernel      7x7 stride-2 stem
  resnet/block{s}/unit{uu}/a/group_norm/{gamma,beta}
  resnet/block{s}/unit{uu}/a/standardized_conv2d/kernel         1x1
  resnet/block{s}/unit{uu}/a/proj/standardized_conv2d/kernel    shortcut
  resnet/block{s}/unit{uu}/b/...  3x3 (carries the stride)
  resnet/block{s}/unit{uu}/c/...  1x1 to 4x the bottleneck width
  resnet/group_norm/{gamma,beta}                    final norm
  resnet/head/conv2d/{kernel,bias}                  optional, off by default

Each unit is pre-activation: every conv is preceded by GroupNorm + ReLU of
its own sub-block (a, b, c), and the projection shortcut reads the output of
a's norm. Kernels are standardized (zero mean, unit variance over H, W, in)
on every call, which is what lets BiT train with GroupNorm at any batch size.

Output contract shared by every image tower: ``__call__(images, train=...)``
returns tokens ``[B, 1+h*w, C]``: index 0 is the global average of the final
(normed, ReLU'd) feature map, followed by the h*w grid cells, so late fusion
reads index 0 and cross-modal attention can attend to every cell. With
``num_classes`` set the module is a standalone classifier and returns logits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mic_jax.layers import partitioning as P

Dtype = Any

# Stage depths of the bottleneck ResNets BiT released (and R26 for CPUs).
BLOCK_DEPTHS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
BIT_NAMES = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4",
             "R26x1", "tiny")


@dataclasses.dataclass(frozen=True)
class BiTConfig:
  """BiT hyper-parameters.

  Attributes:
    depths: residual units per stage.
    width_factor: the "x3" in R50x3; multiplies every width.
    base_width: stem width and first bottleneck width before the factor
      (64 in every released model; smaller only for tests).
    num_groups: GroupNorm groups (32 in BiT).
    num_classes: adds the 1x1-conv ``head`` and returns logits.
    ws_eps: weight-standardization epsilon; 1e-10 as in the released code.
    gn_eps: GroupNorm epsilon; 1e-5 as in the released code.
    remat: recompute each unit's activations in the backward pass.
  """
  depths: tuple[int, ...] = BLOCK_DEPTHS[50]
  width_factor: int = 1
  base_width: int = 64
  num_groups: int = 32
  num_classes: int | None = None
  ws_eps: float = 1e-10
  gn_eps: float = 1e-5
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "depths", tuple(self.depths))
    if not self.depths or min(self.depths) < 1:
      raise ValueError(f"depths must be positive, got {self.depths}")
    if self.root_width % self.num_groups:
      raise ValueError(f"stem width {self.root_width} is not divisible by "
                       f"num_groups {self.num_groups}")

  @property
  def root_width(self) -> int:
    return self.base_width * self.width_factor

  def bottleneck_width(self, stage: int) -> int:
    return self.root_width * 2 ** stage

  @property
  def out_width(self) -> int:
    return 4 * self.bottleneck_width(len(self.depths) - 1)


def bit_config(variant: str, **overrides: Any) -> BiTConfig:
  """The config of a named model: ``R{50,101,152,26}x{factor}`` or "tiny".

  A ``-scratch`` suffix (as in the configs' ``R26x1-scratch``) names the
  same architecture; it only says the weights are not loaded.
  """
  name = variant[:-len("-scratch")] if variant.endswith("-scratch") else (
      variant)
  if name == "tiny":
    base = dict(depths=(2, 1, 1, 1), base_width=8, num_groups=4)
  else:
    match = re.fullmatch(r"R(\d+)x(\d+)", name)
    if not match or int(match.group(1)) not in BLOCK_DEPTHS:
      raise ValueError(f"unknown BiT variant {variant!r}; known: "
                       f"{', '.join(BIT_NAMES)} (R{{26,50,101,152}}xN)")
    base = dict(depths=BLOCK_DEPTHS[int(match.group(1))],
                width_factor=int(match.group(2)))
  fields = {f.name for f in dataclasses.fields(BiTConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown BiT option(s) {unknown}; known: "
                     f"{sorted(fields)}")
  return BiTConfig(**{**base, **overrides})


def get_bit(variant: str, *, dtype: Dtype = jnp.float32,
            param_dtype: Dtype = jnp.float32, **overrides: Any) -> "BiT":
  """Builds a BiT ResNet-v2 by name; ``overrides`` are BiTConfig fields."""
  return BiT(bit_config(variant, **overrides), dtype=dtype,
             param_dtype=param_dtype)


class _BiTModule(nn.Module):
  config: BiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def kw(self) -> dict[str, Any]:
    return dict(config=self.config, dtype=self.dtype,
                param_dtype=self.param_dtype)


class StdConv(_BiTModule):
  """A bias-free convolution whose kernel is standardized on every call."""
  features: int = 0
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  in_axis: str | None = P.CONV_IN

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param(
        "kernel",
        P.logical(nn.initializers.he_normal(),
                  (None, None, self.in_axis, P.CONV_OUT)),
        (k, k, x.shape[-1], self.features), self.param_dtype)
    kernel = kernel.astype(jnp.float32)
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
    kernel = (kernel - mean) * jax.lax.rsqrt(var + self.config.ws_eps)
    pad = self.padding
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=(self.stride, self.stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class GroupNorm(_BiTModule):
  """GroupNorm with the checkpoint's ``gamma``/``beta`` names.

  Statistics are taken in float32 whatever the compute dtype.
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    channels = x.shape[-1]
    if channels % cfg.num_groups:
      raise ValueError(f"{channels} channels are not divisible by "
                       f"num_groups {cfg.num_groups}")
    gamma = self.param("gamma", P.logical(nn.initializers.ones, (P.NORM,)),
                       (channels,), self.param_dtype)
    beta = self.param("beta", P.logical(nn.initializers.zeros, (P.NORM,)),
                      (channels,), self.param_dtype)
    shape = x.shape
    y = x.astype(jnp.float32).reshape(
        *shape[:-1], cfg.num_groups, channels // cfg.num_groups)
    axes = tuple(range(1, y.ndim - 2)) + (y.ndim - 1,)
    mean = jnp.mean(y, axis=axes, keepdims=True)
    var = jnp.var(y, axis=axes, keepdims=True)
    y = ((y - mean) * jax.lax.rsqrt(var + cfg.gn_eps)).reshape(shape)
    return (y * gamma + beta).astype(self.dtype)


class Projection(_BiTModule):
  """The 1x1 strided shortcut conv, under the checkpoint's ``proj`` scope."""
  features: int = 0
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return StdConv(features=self.features, stride=self.stride,
                   name="standardized_conv2d", **self.kw)(x)


class NormReluConv(_BiTModule):
  """One of a unit's sub-blocks a, b, c: GroupNorm -> ReLU -> StdConv.

  Sub-block a also owns the projection shortcut (``a/proj/...`` in the
  released files), which reads the same pre-activation as its conv.

  Returns:
    The conv output, and the projected shortcut (None without projection).
  """
  features: int = 0
  kernel_size: int = 1
  stride: int = 1
  proj_features: int | None = None
  proj_stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray
               ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    pre = nn.relu(GroupNorm(name="group_norm", **self.kw)(x))
    y = StdConv(features=self.features, kernel_size=self.kernel_size,
                stride=self.stride, padding=(self.kernel_size - 1) // 2,
                name="standardized_conv2d", **self.kw)(pre)
    shortcut = None
    if self.proj_features:
      shortcut = Projection(features=self.proj_features,
                            stride=self.proj_stride, name="proj",
                            **self.kw)(pre)
    return y, shortcut


class BottleneckUnit(_BiTModule):
  """Pre-activation bottleneck; the stride sits on the 3x3 conv."""
  width: int = 0
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out = 4 * self.width
    project = self.stride != 1 or x.shape[-1] != out
    y, shortcut = NormReluConv(
        features=self.width, proj_features=out if project else None,
        proj_stride=self.stride, name="a", **self.kw)(x)
    y, _ = NormReluConv(features=self.width, kernel_size=3,
                        stride=self.stride, name="b", **self.kw)(y)
    y, _ = NormReluConv(features=out, name="c", **self.kw)(y)
    y = y + (x if shortcut is None else shortcut)
    return P.constrain(y, (P.BATCH, None, None, P.ACT_EMBED))


class RootBlock(_BiTModule):
  """The stem: a 7x7/2 StdConv and a 3x3/2 max-pool."""

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    x = StdConv(features=self.config.root_width, kernel_size=7, stride=2,
                padding=3, in_axis=None, name="standardized_conv2d",
                **self.kw)(images.astype(self.dtype))
    # Zero padding, then a VALID max-pool, as in the released models (not a
    # -inf "SAME" pool: nothing before it is non-negative).
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Stage(_BiTModule):
  """One stage ("block1".."block4") of bottleneck units."""
  depth: int = 1
  width: int = 0
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    unit_cls = nn.remat(BottleneckUnit) if self.config.remat else (
        BottleneckUnit)
    for i in range(self.depth):
      x = unit_cls(width=self.width, stride=self.stride if i == 0 else 1,
                   name=f"unit{i + 1:02d}", **self.kw)(x)
    return x


class Head(_BiTModule):
  """The classifier: a 1x1 conv (``head/conv2d``) on the pooled feature."""

  @nn.compact
  def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
    conv = nn.Conv(
        self.config.num_classes, (1, 1),
        # Zero init: fine-tuning starts from the pretrained features.
        kernel_init=P.logical(nn.initializers.zeros,
                              (None, None, P.CONV_IN, P.CLASSES)),
        bias_init=P.logical(nn.initializers.zeros, (P.CLASSES,)),
        dtype=self.dtype, param_dtype=self.param_dtype, name="conv2d")
    return conv(pooled[:, None, None, :])[:, 0, 0, :]


class ResNetV2(_BiTModule):
  """Everything under the checkpoints' ``resnet/`` scope."""

  @nn.compact
  def __call__(self, images: jnp.ndarray
               ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    cfg = self.config
    x = RootBlock(name="root_block", **self.kw)(images)
    for stage, depth in enumerate(cfg.depths):
      x = Stage(depth=depth, width=cfg.bottleneck_width(stage),
                stride=1 if stage == 0 else 2, name=f"block{stage + 1}",
                **self.kw)(x)
    x = nn.relu(GroupNorm(name="group_norm", **self.kw)(x))
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
    logits = (Head(name="head", **self.kw)(pooled) if cfg.num_classes
              else None)
    return x, pooled, logits


class BiT(nn.Module):
  """BiT image tower; see the module docstring for names and outputs."""
  config: BiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool = False
               ) -> jnp.ndarray:
    """Encodes images scaled to [-1, 1].

    Args:
      images: ``[B, H, W, 3]``.
      train: accepted for the shared tower interface; BiT has no dropout and
        GroupNorm has no batch statistics, so it changes nothing.

    Returns:
      Tokens ``[B, 1 + h*w, C]`` (h, w = H/32, W/32 rounded as the strided
      convs do), or logits ``[B, num_classes]`` when the config has a head.
    """
    del train
    if images.ndim != 4:
      raise ValueError(f"images must be [B, H, W, C], got {images.shape}")
    grid, pooled, logits = ResNetV2(
        self.config, dtype=self.dtype, param_dtype=self.param_dtype,
        name="resnet")(images)
    if logits is not None:
      return logits
    batch, h, w, c = grid.shape
    tokens = jnp.concatenate(
        [pooled[:, None, :], grid.reshape(batch, h * w, c)], axis=1)
    return P.constrain(tokens, (P.BATCH, P.LENGTH, P.ACT_EMBED))


def count_params(tree: Any) -> int:
  """Number of scalars in a (possibly abstract or boxed) parameter tree."""
  return sum(math.prod(leaf.shape)
             for leaf in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))
