"""Reading Hugging Face ``ViTModel`` and ``Dinov2Model`` directories.

Both are the same pre-LayerNorm transformer as our ViT tower; DINOv2 adds
LayerScale, patch 14, exact GELU and ImageNet pixel statistics. This module
turns a directory's ``config.json`` (and ``preprocessor_config.json``) into
:class:`ViTConfig` fields, and its tensors into our Google-style parameter
names, so one :class:`VisionTransformer` runs every format.

Names are read as the hub stores them (``encoder.layer.{i}.attention.
attention.query.weight`` ...), which is also what ``save_pretrained`` of
transformers 5 writes; transformers 5's in-memory names (``layers.{i}.
attention.q_proj`` ...) are accepted too. A directory whose tensors do not
match its config is refused with the missing and unexpected tensors listed
under the file's own names.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np

from mic_jax.checkpoints.common import CheckpointError, FlatParams
from mic_jax.checkpoints import tensor_files

MODEL_TYPES = ("vit", "dinov2")
# What HF's image processors default to when preprocessor_config.json is
# absent: ViTImageProcessor uses 0.5 (that is exactly our [-1, 1] images),
# DINOv2's BitImageProcessor ImageNet's statistics.
DEFAULT_PIXEL_STATS = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# HF ``hidden_act`` -> our activation names.
_ACTIVATIONS = {
    "gelu": "gelu_exact",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin")

POSEMB_HF = "embeddings.position_embeddings"
# Tensors of the checkpoint a tower does not use.
_IGNORED = re.compile(r"^(pooler\.|classifier\.|embeddings\.mask_token$)")

# Per block: our name -> (hub name in ViTModel, in Dinov2Model, conversion).
_BLOCK = {
    "LayerNorm_0/scale": ("layernorm_before.weight", "norm1.weight", None),
    "LayerNorm_0/bias": ("layernorm_before.bias", "norm1.bias", None),
    "LayerNorm_2/scale": ("layernorm_after.weight", "norm2.weight", None),
    "LayerNorm_2/bias": ("layernorm_after.bias", "norm2.bias", None),
    "MlpBlock_3/Dense_0/kernel": ("intermediate.dense.weight",
                                  "mlp.fc1.weight", "dense"),
    "MlpBlock_3/Dense_0/bias": ("intermediate.dense.bias", "mlp.fc1.bias",
                                None),
    "MlpBlock_3/Dense_1/kernel": ("output.dense.weight", "mlp.fc2.weight",
                                  "dense"),
    "MlpBlock_3/Dense_1/bias": ("output.dense.bias", "mlp.fc2.bias", None),
    "LayerScale_1/scale": (None, "layer_scale1.lambda1", None),
    "LayerScale_3/scale": (None, "layer_scale2.lambda1", None),
    "MultiHeadDotProductAttention_1/out/kernel": (
        "attention.output.dense.weight",) * 2 + ("out",),
    "MultiHeadDotProductAttention_1/out/bias": (
        "attention.output.dense.bias",) * 2 + (None,),
}
for _p in ("query", "key", "value"):
  _BLOCK[f"MultiHeadDotProductAttention_1/{_p}/kernel"] = (
      f"attention.attention.{_p}.weight",) * 2 + ("qkv",)
  _BLOCK[f"MultiHeadDotProductAttention_1/{_p}/bias"] = (
      f"attention.attention.{_p}.bias",) * 2 + ("qkv_bias",)
_TOP = {
    "cls": ("embeddings.cls_token", None),
    "Transformer/posembed_input/pos_embedding": (POSEMB_HF, None),
    "embedding/kernel": ("embeddings.patch_embeddings.projection.weight",
                         "conv"),
    "embedding/bias": ("embeddings.patch_embeddings.projection.bias", None),
    "Transformer/encoder_norm/scale": ("layernorm.weight", None),
    "Transformer/encoder_norm/bias": ("layernorm.bias", None),
}
_OUR_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.*)$")

# transformers 5's in-memory names -> the hub's: both model types rename
# the attention projections (below), ViTModel also its layers and MLP.
_V5_NAMES = {
    "vit": [(r"^layers\.(\d+)\.", r"encoder.layer.\1."),
            (r"\.mlp\.fc1\.", ".intermediate.dense."),
            (r"\.mlp\.fc2\.", ".output.dense.")],
    "dinov2": [],
}
_QKV = {"q": "query", "k": "key", "v": "value"}


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e


def read_hf_config(directory: pathlib.Path) -> dict[str, Any]:
  """``config.json`` of a ViTModel / Dinov2Model directory, checked."""
  path = directory / "config.json"
  if not path.exists():
    raise CheckpointError(f"{path}: missing; a Hugging Face ViT / DINOv2 "
                          "directory needs config.json next to its weights")
  config = _read_json(path)
  kind = config.get("model_type")
  if kind not in MODEL_TYPES:
    raise CheckpointError(
        f"{path}: model_type {kind!r} is not supported; this loader reads "
        f"{MODEL_TYPES} (ViTModel, Dinov2Model)")
  problems = []
  if config.get("num_channels", 3) != 3:
    problems.append(f"num_channels {config['num_channels']} (not RGB)")
  if not config.get("qkv_bias", True):
    problems.append("qkv_bias false (our attention always has biases)")
  if config.get("use_swiglu_ffn", False):
    problems.append("use_swiglu_ffn (a SwiGLU MLP, as in DINOv2-g)")
  if config.get("hidden_act", "gelu") not in _ACTIVATIONS:
    problems.append(f"hidden_act {config.get('hidden_act')!r} (known: "
                    f"{sorted(_ACTIVATIONS)})")
  patch = config.get("patch_size", 16)
  if isinstance(patch, (list, tuple)):
    if len(set(patch)) != 1:
      problems.append(f"non-square patch_size {patch}")
  if problems:
    raise CheckpointError(f"{path}: unsupported: " + "; ".join(problems))
  return config


def _patch_size(config: dict[str, Any]) -> int:
  patch = config.get("patch_size", 16)
  return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def pixel_stats(directory: pathlib.Path, model_type: str
                ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
  """The checkpoint's ``(pixel_mean, pixel_std)``; (None, None) = [-1, 1].

  From ``preprocessor_config.json`` when present (``image_mean``,
  ``image_std``; ``do_normalize: false`` means pixels in [0, 1]), else the
  defaults of the model type's HF image processor.
  """
  mean, std = DEFAULT_PIXEL_STATS[model_type]
  path = directory / "preprocessor_config.json"
  if path.exists():
    pre = _read_json(path)
    if pre.get("do_normalize", True) is False:
      mean, std = (0.0,) * 3, (1.0,) * 3
    else:
      mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
      if isinstance(mean, (int, float)):
        mean = (mean,) * 3
      if isinstance(std, (int, float)):
        std = (std,) * 3
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if mean == (0.5,) * 3 and std == (0.5,) * 3:
    return None, None  # Exactly the [-1, 1] images every tower takes.
  return mean, std


def config_fields(directory: pathlib.Path) -> dict[str, Any]:
  """:class:`ViTConfig` fields of a directory (reads JSON files only)."""
  config = read_hf_config(directory)
  kind = config["model_type"]
  width = int(config.get("hidden_size", 768))
  if kind == "dinov2":
    mlp_dim = int(width * config.get("mlp_ratio", 4))
    layer_scale = float(config.get("layerscale_value", 1.0))
  else:
    mlp_dim = int(config.get("intermediate_size", 3072))
    layer_scale = None
  mean, std = pixel_stats(directory, kind)
  return dict(
      patch_size=_patch_size(config), width=width,
      depth=int(config.get("num_hidden_layers", 12)), mlp_dim=mlp_dim,
      num_heads=int(config.get("num_attention_heads", 12)),
      classifier="token",
      activation=_ACTIVATIONS[config.get("hidden_act", "gelu")],
      layer_norm_eps=float(config.get(
          "layer_norm_eps", 1e-6 if kind == "dinov2" else 1e-12)),
      layer_scale_init=layer_scale, pixel_mean=mean, pixel_std=std)


def read_weights(directory: pathlib.Path) -> tuple[FlatParams, str]:
  """Tensors of the first weight file found; ``({hub name: array}, file)``."""
  return tensor_files.read_weight_files(directory, _WEIGHT_FILES)


def _hub_names(tensors: FlatParams, model_type: str) -> FlatParams:
  """Strips a task model's prefix and maps transformers-5 names to hub's."""
  out = {}
  for name, value in tensors.items():
    name = re.sub(rf"^{model_type}\.", "", name)
    for pattern, repl in _V5_NAMES[model_type]:
      name = re.sub(pattern, repl, name)
    name = re.sub(r"\.attention\.([qkv])_proj\.",
                  lambda m: f".attention.attention.{_QKV[m.group(1)]}.", name)
    name = name.replace(".attention.o_proj.", ".attention.output.dense.")
    out[name] = value
  return out


def expected_hub_names(our_names: list[str], model_type: str
                       ) -> dict[str, tuple[str, str | None]]:
  """``{hub name: (our name, conversion)}`` for the params a model expects."""
  column = MODEL_TYPES.index(model_type)
  out = {}
  for ours in our_names:
    match = _OUR_BLOCK.match(ours)
    if match:
      entry = _BLOCK.get(match.group(2))
      hub = entry and entry[column]
      if hub:
        out[f"encoder.layer.{match.group(1)}.{hub}"] = (ours, entry[2])
        continue
    elif ours in _TOP:
      out[_TOP[ours][0]] = (ours, _TOP[ours][1])
      continue
    raise CheckpointError(f"no {model_type} checkpoint name is known for "
                          f"our parameter {ours!r}")
  return out


def _convert(value: np.ndarray, conversion: str | None, num_heads: int
             ) -> np.ndarray:
  """A torch tensor -> our layout (kernels [in, out], per-head axes)."""
  if conversion is None:
    return value
  if conversion == "conv":  # [out, in, kh, kw] -> [kh, kw, in, out]
    return value.transpose(2, 3, 1, 0)
  if conversion == "qkv_bias":  # [D] -> [heads, head_dim]
    return value.reshape(num_heads, -1)
  kernel = value.T  # torch Linear [out, in] -> [in, out]
  if conversion == "qkv":  # [D, D] -> [D, heads, head_dim]
    return kernel.reshape(kernel.shape[0], num_heads, -1)
  if conversion == "out":  # [D, D] -> [heads, head_dim, D]
    return kernel.reshape(num_heads, -1, kernel.shape[1])
  return kernel


def to_our_names(tensors: FlatParams, our_names: list[str], *,
                 model_type: str, num_heads: int, source: str) -> FlatParams:
  """Checks a directory's tensors by name and converts them to our tree.

  Args:
    tensors: the weight file's tensors under their own names.
    our_names: the parameter names the model expects.
    model_type: "vit" or "dinov2".
    num_heads: to split attention kernels per head.
    source: weight file, for error messages.

  Raises:
    CheckpointError: naming every missing and unexpected tensor (hub names)
      and any tensor whose shape cannot be converted.
  """
  tensors = _hub_names(tensors, model_type)
  wanted = expected_hub_names(our_names, model_type)
  missing = sorted(set(wanted) - set(tensors))
  unexpected = sorted(n for n in tensors
                      if n not in wanted and not _IGNORED.match(n))
  problems = []
  if missing:
    problems.append("missing: " + ", ".join(missing))
  if unexpected:
    problems.append("unexpected: " + ", ".join(unexpected))
  if problems:
    raise CheckpointError(f"cannot load {source} as a {model_type} tower:\n  "
                          + "\n  ".join(problems))
  out = {}
  for hub, (ours, conversion) in wanted.items():
    value = np.asarray(tensors[hub])
    try:
      out[ours] = _convert(value, conversion, num_heads)
    except ValueError as e:
      raise CheckpointError(f"{source}: {hub!r} has shape {value.shape}, "
                            f"which does not fit {ours!r} ({e})") from e
  return out
