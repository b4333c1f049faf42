"""Loading released ViT checkpoints into our ViT.

Hugging Face ``ViTModel`` / ``Dinov2Model`` directories and hub ids are
read by :mod:`mic_jax.checkpoints.hf_vit` into the same parameter names.
Two families of Google ``.npz`` files exist and both load without renaming
by hand:

* google-research/vision_transformer (the 2020 paper files such as
  ``ViT-L_16.npz`` and the AugReg files): already in our names
  (``Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1`` ...), with
  the class token's position embedding included in
  ``Transformer/posembed_input/pos_embedding``.
* google-research/big_vision: blocks named ``LayerNorm_0/1``,
  ``MultiHeadDotProductAttention_0``, ``MlpBlock_0``, possibly stacked on a
  leading depth axis under ``Transformer/encoderblock/`` ("scan" layers), and
  a top-level ``pos_embedding`` for the patches only: big_vision adds it
  *before* prepending the class token. That is the same function as our
  layout with a zero position embedding for the class token, which is how it
  is converted (exactly).

The architecture (patch, width, depth, heads, MLP width, class token or not)
is read from the tensors' names and shapes, so a file cannot be loaded into
the wrong size; a ``variant`` name, if given, is checked against it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import zipfile
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mic_jax.checkpoints import common
from mic_jax.checkpoints import hf_vit
from mic_jax.checkpoints import layer_stacks
from mic_jax.checkpoints import npz
from mic_jax.checkpoints.common import CheckpointError, FlatParams
from mic_jax.checkpoints.hub import resolve_dir
from mic_jax.checkpoints.npz import read_npz
from mic_jax.models.vit import ViTConfig, VisionTransformer, vit_config

POSEMB = "Transformer/posembed_input/pos_embedding"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
# big_vision's automatic names inside a block -> the original ViT's.
_BIG_VISION_BLOCK = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_ARCH_FIELDS = ("patch_size", "width", "depth", "mlp_dim", "num_heads")


def _unstack_scan(flat: FlatParams, source: str) -> FlatParams:
  """``Transformer/encoderblock/x`` [depth, ...] -> ``encoderblock_{i}/x``."""
  out, depths = {}, set()
  for name, value in flat.items():
    if not name.startswith("Transformer/encoderblock/"):
      out[name] = value
      continue
    rest = name[len("Transformer/encoderblock/"):]
    depths.add(value.shape[0] if value.ndim else 0)
    for i in range(value.shape[0] if value.ndim else 0):
      out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
  if len(depths) != 1 or 0 in depths:
    raise CheckpointError(
        f"{source}: scanned encoder blocks disagree on the depth axis "
        f"(leading sizes {sorted(depths)})")
  return out


def _rename_block(rest: str) -> str:
  head, _, tail = rest.partition("/")
  return f"{_BIG_VISION_BLOCK.get(head, head)}/{tail}"


def to_vit_names(flat: FlatParams, source: str) -> FlatParams:
  """Converts either released layout to our parameter names.

  Raises:
    CheckpointError: for layouts we cannot run faithfully (a MAP pooling
      head, hybrid ResNet stems).
  """
  if any(n.startswith("MAPHead_0/") or n == "probe" for n in flat):
    raise CheckpointError(
        f"{source}: this ViT pools with a MAP head (MAPHead_0), which this "
        "tower does not implement; use a 'token' or 'gap' checkpoint")
  if any(n.startswith(("conv_root/", "gn_root/", "block1/")) for n in flat):
    raise CheckpointError(
        f"{source}: a hybrid ResNet+ViT checkpoint (conv_root, block*/...); "
        "only pure ViT checkpoints are supported")
  if any(n.startswith("Transformer/encoderblock/") for n in flat):
    flat = _unstack_scan(flat, source)

  # A block is in big_vision's naming if it has one of its module names; the
  # LayerNorm names alone are ambiguous (both layouts have LayerNorm_0).
  big_vision_blocks = {
      m.group(1) for n in flat if (m := _BLOCK.match(n))
      and n[m.end():].split("/")[0] in ("MultiHeadDotProductAttention_0",
                                         "MlpBlock_0")}
  out: FlatParams = {}
  bv_posemb = None
  for name, value in flat.items():
    if name in ("pos_embedding", "Transformer/pos_embedding"):
      bv_posemb = (name, value)
      continue
    match = _BLOCK.match(name)
    if match and match.group(1) in big_vision_blocks:
      name = match.group(0) + _rename_block(name[match.end():])
    out[name] = value

  if bv_posemb is not None:
    name, value = bv_posemb
    if POSEMB in out:
      raise CheckpointError(f"{source}: holds both {name!r} and {POSEMB!r}")
    if value.ndim != 3 or value.shape[0] != 1:
      raise CheckpointError(f"{source}: {name!r} has shape {value.shape}, "
                            "expected [1, N, width]")
    if "cls" in out:
      # big_vision adds the posemb before prepending the class token: the
      # class token's own position embedding is zero.
      value = np.concatenate(
          [np.zeros_like(value[:, :1]), value], axis=1)
    out[POSEMB] = value
  return out


def _shape(flat: FlatParams, name: str, ndim: int, source: str
           ) -> tuple[int, ...]:
  if name not in flat:
    raise CheckpointError(f"{source}: no {name!r}; is this a ViT checkpoint? "
                          f"(first names: {sorted(flat)[:5]})")
  shape = tuple(flat[name].shape)
  if len(shape) != ndim:
    raise CheckpointError(f"{source}: {name!r} has shape {shape}, expected "
                          f"{ndim} dimensions")
  return shape


def infer_architecture(flat: FlatParams, source: str) -> dict[str, Any]:
  """Reads patch, width, depth, heads, MLP width and pooling from a file.

  Args:
    flat: params already in our names (see :func:`to_vit_names`).
    source: file name for error messages.

  Returns:
    :class:`ViTConfig` fields, plus ``representation_size`` and
    ``num_classes`` of the checkpoint's own pre-logits / head (or None).
  """
  kernel = _shape(flat, "embedding/kernel", 4, source)
  if kernel[0] != kernel[1] or kernel[2] != 3:
    raise CheckpointError(f"{source}: embedding/kernel has shape {kernel}; "
                          "expected [patch, patch, 3, width]")
  blocks = sorted({int(m.group(1)) for n in flat
                   if (m := _BLOCK.match(n))})
  if not blocks or blocks != list(range(len(blocks))):
    raise CheckpointError(f"{source}: encoder blocks {blocks} are not "
                          "numbered 0..depth-1")
  query = _shape(flat, "Transformer/encoderblock_0/"
                 "MultiHeadDotProductAttention_1/query/kernel", 3, source)
  mlp = _shape(flat, "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel",
               2, source)
  arch = dict(patch_size=kernel[0], width=kernel[3], depth=len(blocks),
              mlp_dim=mlp[1], num_heads=query[1],
              classifier="token" if "cls" in flat else "gap")
  arch["representation_size"] = (
      flat["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in flat
      else None)
  arch["num_classes"] = (flat["head/kernel"].shape[1]
                         if "head/kernel" in flat else None)
  return arch


def _interpolate_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Linear interpolation along one axis with the end points kept in place.

  This is the sampling of ``scipy.ndimage.zoom(order=1)``, which Google used
  to make its higher-resolution fine-tuned ViTs.
  """
  old = x.shape[axis]
  if old == size:
    return x
  if old == 1 or size == 1:
    return np.repeat(np.take(x, [0], axis=axis), size, axis=axis)
  pos = np.arange(size) * (old - 1) / (size - 1)
  lo = np.minimum(np.floor(pos).astype(np.int64), old - 2)
  frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  return (np.take(x, lo, axis=axis) * (1 - frac)
          + np.take(x, lo + 1, axis=axis) * frac)


# Keys' cubic convolution kernel with a = -0.75, PyTorch's choice.
_CUBIC_A = -0.75


def _cubic_weights(old: int, size: int) -> np.ndarray:
  """The ``[size, old]`` matrix of PyTorch's bicubic resampling on one axis.

  This is ``torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False, antialias=False)`` with an output *size* (not a scale
  factor), which is how Hugging Face's ViT and DINOv2 resize their position
  embeddings at run time: output pixel i samples the input at
  ``(i + 0.5) * old / size - 0.5`` (not clamped), from the 4 nearest input
  pixels, indices beyond the border clamped to it.
  """
  a = _CUBIC_A
  src = (np.arange(size, dtype=np.float64) + 0.5) * (old / size) - 0.5
  base = np.floor(src)
  t = src - base

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  index = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0,
                  old - 1)
  matrix = np.zeros((size, old))
  for k in range(4):
    np.add.at(matrix, (np.arange(size), index[:, k]), weights[:, k])
  return matrix


RESIZE_METHODS = ("linear", "bicubic")


def resize_posemb(posemb: np.ndarray, *, num_prefix: int,
                  old_grid: Sequence[int], new_grid: Sequence[int],
                  method: str = "linear") -> np.ndarray:
  """Resizes learned position embeddings to a new patch grid.

  Args:
    posemb: ``[1, num_prefix + gh * gw, D]``.
    num_prefix: leading rows not on the grid (1 for the class token); they
      are kept exactly.
    old_grid: (gh, gw) the embeddings were trained for.
    new_grid: (gh', gw') wanted.
    method: "linear" keeps the corners in place (``scipy.ndimage.zoom``,
      Google's resampler for its ``.npz`` files); "bicubic" is Hugging
      Face's run-time ``interpolate_pos_encoding`` of ViT and DINOv2 (see
      :func:`_cubic_weights`), computed in float64.

  Returns:
    ``[1, num_prefix + gh' * gw', D]`` in the input dtype.
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"unknown resize method {method!r}; known: "
                     f"{RESIZE_METHODS}")
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  if grid.shape[0] != math.prod(old_grid):
    raise ValueError(f"{grid.shape[0]} grid rows do not form a {old_grid} "
                     "grid")
  if old_grid == new_grid:
    return posemb
  grid = grid.reshape(*old_grid, -1).astype(np.float64)
  if method == "bicubic":
    grid = np.einsum("ai,bj,ijd->abd", _cubic_weights(old_grid[0], new_grid[0]),
                     _cubic_weights(old_grid[1], new_grid[1]), grid)
  else:
    grid = _interpolate_axis(grid, 0, new_grid[0])
    grid = _interpolate_axis(grid, 1, new_grid[1])
  grid = grid.reshape(1, -1, grid.shape[-1]).astype(posemb.dtype)
  return np.concatenate([prefix, grid], axis=1)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f"image_size must be an int or (height, width), got "
                     f"{size}")
  return size


def _is_npz(source: str) -> bool:
  return source.lower().endswith(".npz")


def _npz_shapes(source: str) -> FlatParams:
  """The arrays of an ``.npz`` as zero-stride stand-ins: names and shapes
  only, read from the archive's headers without loading any weights."""
  with npz._open(source) as f:  # pylint: disable=protected-access
    try:
      with zipfile.ZipFile(f) as archive:
        out = {}
        for member in archive.namelist():
          if not member.endswith(".npy"):
            continue
          with archive.open(member) as entry:
            version = np.lib.format.read_magic(entry)
            read_header = (np.lib.format.read_array_header_1_0
                           if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(entry)
          out[member[:-len(".npy")]] = np.broadcast_to(
              np.zeros((), dtype if dtype.kind != "V" else np.float32), shape)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise CheckpointError(f"{source}: not a readable .npz file ({e})") from e
  if not out:
    raise CheckpointError(f"{source}: the .npz file holds no arrays")
  return out


def _hf_architecture(directory: pathlib.Path) -> dict[str, Any]:
  arch = hf_vit.config_fields(directory)
  arch.update(representation_size=None, num_classes=None)
  return arch


def _make_config(arch: dict[str, Any], source: str,
                 image_size: int | Sequence[int], *, variant: str | None,
                 num_classes: int | None, representation_size: int | None,
                 overrides: dict[str, Any]) -> ViTConfig:
  """The model config: the checkpoint's architecture, then the caller's."""
  if variant is not None:
    want = vit_config(variant)
    diff = [f"{f}: {variant} has {getattr(want, f)}, file has {arch[f]}"
            for f in _ARCH_FIELDS if getattr(want, f) != arch[f]]
    if diff:
      raise CheckpointError(f"{source} is not a ViT-{variant}: "
                            + "; ".join(diff))
  fixed = sorted(set(overrides) & {*_ARCH_FIELDS, "classifier"})
  if fixed:
    raise ValueError(f"{fixed} come from the checkpoint {source} and cannot "
                     "be overridden")
  height, width = _pair(image_size)
  patch = arch["patch_size"]
  if height % patch or width % patch:
    raise ValueError(f"image_size {height}x{width} is not a multiple of the "
                     f"checkpoint's patch size {patch}")
  fields = {k: v for k, v in arch.items()
            if k not in ("representation_size", "num_classes")}
  return ViTConfig(**{**fields, **overrides}, num_classes=num_classes,
                   representation_size=representation_size,
                   image_size=(height, width))


def vit_config_from_checkpoint(path: str | os.PathLike[str],
                               image_size: int | Sequence[int] = 224,
                               **overrides: Any) -> ViTConfig:
  """The :class:`ViTConfig` :func:`load_vit` would build, without weights.

  Cheap: a Hugging Face directory or hub id is read through its JSON files
  (``config.json``, ``preprocessor_config.json``); an ``.npz`` through its
  array headers. The tower it describes returns tokens (no head) and takes
  ``image_size`` images; ``overrides`` are other ViTConfig fields
  (``dropout``, ``remat``...), not architecture ones.
  """
  source = os.fspath(path)
  if _is_npz(source):
    arch = infer_architecture(to_vit_names(_npz_shapes(source), source),
                              source)
  else:
    arch = _hf_architecture(resolve_dir(source, what="ViT checkpoint"))
  return _make_config(arch, source, image_size, variant=None,
                      num_classes=None, representation_size=None,
                      overrides=overrides)


def load_vit(
    path: str | os.PathLike[str],
    image_size: int | Sequence[int] = 224,
    *,
    num_classes: int | None = None,
    keep_pre_logits: bool = False,
    variant: str | None = None,
    checkpoint_grid: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
    **overrides: Any,
) -> tuple[VisionTransformer, dict[str, Any]]:
  """Builds a ViT from a checkpoint and loads its weights.

  Args:
    path: one of
      * a vision_transformer or big_vision ``.npz`` file (local or
        ``gs://...``);
      * a Hugging Face ``ViTModel`` or ``Dinov2Model`` directory
        (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``,
        optionally ``preprocessor_config.json`` for the pixel statistics),
        or a hub id of one such as ``google/vit-large-patch16-224-in21k`` or
        ``facebook/dinov2-small``. Their pooler and mask token are ignored.
    image_size: input size (int or (height, width)); the position embeddings
      are resized when it differs from the checkpoint's, keeping the class
      token's row: linearly with the corners in place for ``.npz`` files (as
      Google did), bicubically for Hugging Face directories exactly as their
      ``interpolate_pos_encoding`` does at run time.
    num_classes: None (default) drops the checkpoint's head and pre-logits
      and returns a tower whose ``apply`` gives tokens ``[B, 1+N, D]``. An
      int adds a classification head: the checkpoint's head is kept if it has
      exactly this many classes (and its pre_logits are kept, if it has
      any), otherwise a fresh (zero) head is made.
    keep_pre_logits: with ``num_classes``, keep the checkpoint's tanh
      ``pre_logits`` layer (ImageNet-21k ``.npz`` files have one).
    variant: optional name (``"L/16"``); checked against the checkpoint.
    checkpoint_grid: (gh, gw) patch grid of an ``.npz`` checkpoint's position
      embeddings, needed only if it is not square.
    dtype: compute dtype; ``param_dtype``: dtype of the returned params.
    seed: RNG seed for parameters that are created fresh (a new head).
    **overrides: other :class:`ViTConfig` fields (``dropout``,
      ``activation``, ``remat``, ...). The architecture (including, for
      Hugging Face directories, the activation, LayerNorm epsilon,
      LayerScale and pixel statistics) comes from the checkpoint.

  Returns:
    ``(model, params)``: ``params`` is a plain nested dict of arrays for
    ``model.apply({"params": params}, images)``, in our parameter names
    whatever the format (images in [-1, 1]).

  Raises:
    CheckpointError: missing file, unknown layout, or names / shapes that do
      not fit, all listed in one message.
  """
  source = os.fspath(path)
  directory = None
  if _is_npz(source):
    flat = to_vit_names(read_npz(source), source)
    arch = infer_architecture(flat, source)
  else:
    directory = resolve_dir(source, what="ViT checkpoint")
    arch = _hf_architecture(directory)
  ckpt_rep, ckpt_classes = arch["representation_size"], arch["num_classes"]
  if keep_pre_logits and not num_classes:
    raise ValueError("keep_pre_logits needs num_classes (pre_logits feed "
                     "the classification head only)")
  if keep_pre_logits and ckpt_rep is None:
    raise CheckpointError(f"{source}: keep_pre_logits asked for, but the "
                          "file has no pre_logits layer")
  config = _make_config(
      arch, source, image_size, variant=variant, num_classes=num_classes,
      representation_size=ckpt_rep if keep_pre_logits else None,
      overrides=overrides)
  model = VisionTransformer(config, dtype=dtype, param_dtype=param_dtype)
  # Weights are matched in the unrolled layout, then stacked if the model
  # scans its blocks (``scan_layers``).
  unrolled = VisionTransformer(
      dataclasses.replace(config, scan_layers=False), dtype=dtype,
      param_dtype=param_dtype)
  height, width = config.image_size
  dummy = jnp.zeros((1, height, width, 3), jnp.float32)
  expected = nn.meta.unbox(jax.eval_shape(
      lambda: unrolled.init(jax.random.key(seed), dummy))["params"])

  if directory is not None:
    tensors, source = hf_vit.read_weights(directory)
    kind = hf_vit.read_hf_config(directory)["model_type"]
    tower_names = [n for n in common.flatten(expected)
                   if not n.startswith(("head/", "pre_logits/"))]
    flat = hf_vit.to_our_names(tensors, tower_names, model_type=kind,
                               num_heads=config.num_heads, source=source)

  # Position embeddings: keep prefix rows, resize the grid.
  patch = config.patch_size
  num_prefix = 1 if config.classifier == "token" else 0
  new_grid = (height // patch, width // patch)
  if POSEMB in flat:
    posemb = flat[POSEMB]
    rows = posemb.shape[1] - num_prefix if posemb.ndim == 3 else -1
    if checkpoint_grid is not None:
      old_grid = tuple(checkpoint_grid)
    else:
      side = math.isqrt(max(rows, 0))
      if side * side != rows:
        raise CheckpointError(
            f"{source}: {POSEMB} has {rows} patch rows, not a square grid; "
            "pass checkpoint_grid=(rows, cols)")
      old_grid = (side, side)
    try:
      flat[POSEMB] = resize_posemb(
          posemb, num_prefix=num_prefix, old_grid=old_grid,
          new_grid=new_grid,
          method="linear" if directory is None else "bicubic")
    except ValueError as e:
      raise CheckpointError(f"{source}: {POSEMB} {posemb.shape}: {e}") from e

  # The file's head is reused only if it reads the same representation: same
  # number of classes, and its pre_logits layer kept (if it had one).
  head_fits = ckpt_classes == num_classes and (keep_pre_logits
                                               or ckpt_rep is None)
  reinit, init_params = None, None
  if num_classes and not head_fits:
    reinit = r"^head/"
    # Only the head leaves the jitted init; XLA drops the rest unrun.
    init_params = {"head": jax.device_get(jax.jit(
        lambda: nn.meta.unbox(unrolled.init(jax.random.key(seed), dummy))[
            "params"]["head"])())}
  unexpected = []
  if not num_classes:
    unexpected.append(r"^head/")
  if not keep_pre_logits:
    unexpected.append(r"^pre_logits/")
  params = common.merge_into(
      expected, flat, source=source, reinit=reinit, init_params=init_params,
      allow_unexpected="|".join(unexpected) or None)
  if config.scan_layers:
    params = layer_stacks.to_layout(params,
                                    {"encoderblock": layer_stacks.STACKED})
  return model, params
