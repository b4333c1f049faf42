"""ViT tower and loader tests.

Checkpoints are written here in the released ``.npz`` layouts (random
weights, the real names and shapes, tiny widths) and loaded through
``load_vit``; outputs are compared with Hugging Face's PyTorch ``ViTModel``
given the same weights. Parameter counts of the full-size models are checked
against published figures with ``jax.eval_shape`` (nothing is allocated).
"""

from __future__ import annotations

import io
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mic_jax.checkpoints import CheckpointError, load_vit
from mic_jax.checkpoints import vit as vit_ckpt
from mic_jax.models import vit

TOL = 1e-4


# --------------------------------------------------------------------------
# Writing checkpoints in the released layouts (names spelled out here, not
# taken from our model, so a naming slip in the model cannot hide).


def _vision_transformer_npz(rng, *, width, depth, heads, mlp, patch, grid,
                            pre_logits=None, classes=None):
  """A google-research/vision_transformer file (ViT-L_16.npz layout)."""
  hd = width // heads

  def w(*shape, scale=0.2):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  f = {
      "embedding/kernel": w(patch, patch, 3, width, scale=0.05),
      "embedding/bias": w(width),
      "cls": w(1, 1, width),
      "Transformer/posembed_input/pos_embedding": w(1, 1 + grid * grid,
                                                    width),
      "Transformer/encoder_norm/scale": 1 + w(width),
      "Transformer/encoder_norm/bias": w(width),
  }
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      f[b + ln + "/scale"] = 1 + w(width)
      f[b + ln + "/bias"] = w(width)
    a = b + "MultiHeadDotProductAttention_1/"
    for p in ("query", "key", "value"):
      f[a + p + "/kernel"] = w(width, heads, hd, scale=width ** -0.5)
      f[a + p + "/bias"] = w(heads, hd)
    f[a + "out/kernel"] = w(heads, hd, width, scale=width ** -0.5)
    f[a + "out/bias"] = w(width)
    f[b + "MlpBlock_3/Dense_0/kernel"] = w(width, mlp, scale=width ** -0.5)
    f[b + "MlpBlock_3/Dense_0/bias"] = w(mlp)
    f[b + "MlpBlock_3/Dense_1/kernel"] = w(mlp, width, scale=mlp ** -0.5)
    f[b + "MlpBlock_3/Dense_1/bias"] = w(width)
  if pre_logits:
    f["pre_logits/kernel"] = w(width, pre_logits)
    f["pre_logits/bias"] = w(pre_logits)
  if classes:
    f["head/kernel"] = w(pre_logits or width, classes)
    f["head/bias"] = w(classes)
  return f


def _to_big_vision(f, *, scan=False):
  """The same weights in big_vision's layout (patch-only posemb)."""
  rename = {"LayerNorm_0": "LayerNorm_0",
            "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
            "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  out, blocks = {}, {}
  for name, value in f.items():
    if name == "Transformer/posembed_input/pos_embedding":
      out["pos_embedding"] = value[:, 1:]
    elif name.startswith("Transformer/encoderblock_"):
      _, blk, mod, rest = name.split("/", 3)
      new = f"{rename[mod]}/{rest}"
      if scan:
        blocks.setdefault(new, []).append((int(blk.split("_")[1]), value))
      else:
        out[f"Transformer/{blk}/{new}"] = value
    else:
      out[name] = value
  for new, values in blocks.items():
    out[f"Transformer/encoderblock/{new}"] = np.stack(
        [v for _, v in sorted(values, key=lambda t: t[0])])
  return out


def _save(path: pathlib.Path, arrays) -> str:
  np.savez(path, **arrays)
  return str(path)


def _images(rng, batch, height, width):
  return rng.uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)


# --------------------------------------------------------------------------
# The outside reference: Hugging Face ViTModel (PyTorch, float32).


def _hf_vit(f, *, width, depth, heads, mlp, patch, image_size, act):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.ViTConfig(
      hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
      intermediate_size=mlp, hidden_act=act, layer_norm_eps=1e-6,
      image_size=image_size, patch_size=patch, num_channels=3,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      qkv_bias=True)
  model = transformers.ViTModel(config, add_pooling_layer=False).eval()
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))
  sd = {
      "embeddings.cls_token": t(f["cls"]),
      "embeddings.position_embeddings": t(
          f["Transformer/posembed_input/pos_embedding"]),
      "embeddings.patch_embeddings.projection.weight": t(
          f["embedding/kernel"].transpose(3, 2, 0, 1)),
      "embeddings.patch_embeddings.projection.bias": t(f["embedding/bias"]),
      "layernorm.weight": t(f["Transformer/encoder_norm/scale"]),
      "layernorm.bias": t(f["Transformer/encoder_norm/bias"]),
  }
  for i in range(depth):
    # transformers 5 names (layers.{i}.attention.q_proj, mlp.fc1, ...).
    b, h = f"Transformer/encoderblock_{i}/", f"layers.{i}."
    a = b + "MultiHeadDotProductAttention_1/"
    sd[h + "layernorm_before.weight"] = t(f[b + "LayerNorm_0/scale"])
    sd[h + "layernorm_before.bias"] = t(f[b + "LayerNorm_0/bias"])
    sd[h + "layernorm_after.weight"] = t(f[b + "LayerNorm_2/scale"])
    sd[h + "layernorm_after.bias"] = t(f[b + "LayerNorm_2/bias"])
    for p, q in (("query", "q"), ("key", "k"), ("value", "v")):
      sd[h + f"attention.{q}_proj.weight"] = t(
          f[a + p + "/kernel"].reshape(width, width).T)
      sd[h + f"attention.{q}_proj.bias"] = t(
          f[a + p + "/bias"].reshape(width))
    sd[h + "attention.o_proj.weight"] = t(
        f[a + "out/kernel"].reshape(width, width).T)
    sd[h + "attention.o_proj.bias"] = t(f[a + "out/bias"])
    sd[h + "mlp.fc1.weight"] = t(f[b + "MlpBlock_3/Dense_0/kernel"].T)
    sd[h + "mlp.fc1.bias"] = t(f[b + "MlpBlock_3/Dense_0/bias"])
    sd[h + "mlp.fc2.weight"] = t(f[b + "MlpBlock_3/Dense_1/kernel"].T)
    sd[h + "mlp.fc2.bias"] = t(f[b + "MlpBlock_3/Dense_1/bias"])
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected and not missing, (missing, unexpected)

  def run(images):
    with torch.no_grad():
      out = model(pixel_values=t(images.transpose(0, 3, 1, 2)))
    return out.last_hidden_state.numpy()
  return run


TINY = dict(width=32, depth=2, heads=2, mlp=64, patch=8)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


# --------------------------------------------------------------------------
# Parity with Hugging Face.


@pytest.mark.parametrize("layout", ["vision_transformer", "big_vision",
                                    "big_vision_scan"])
def test_load_vit_matches_hf(tmp_path, layout):
  rng = np.random.default_rng(0)
  f = _vision_transformer_npz(rng, grid=4, pre_logits=24, classes=10, **TINY)
  if layout == "vision_transformer":
    ref_weights = f
  else:
    # big_vision: the class token gets no position embedding.
    ref_weights = dict(f)
    pe = f["Transformer/posembed_input/pos_embedding"].copy()
    pe[:, 0] = 0
    ref_weights["Transformer/posembed_input/pos_embedding"] = pe
    f = _to_big_vision(ref_weights, scan=layout.endswith("scan"))
    assert "pos_embedding" in f and "cls" in f
  path = _save(tmp_path / "vit.npz", f)

  model, params = load_vit(path, image_size=32)
  images = _images(rng, 2, 32, 32)
  tokens = model.apply({"params": params}, images)
  assert tokens.shape == (2, 1 + 16, 32)
  ref = _hf_vit(ref_weights, image_size=32, act="gelu_pytorch_tanh",
                **TINY)(images)
  diff = _max_diff(tokens, ref)
  print(f"ViT tiny {layout} max abs diff vs HF: {diff:.2e}")
  assert diff <= TOL
  # The activation matters at this tolerance: exact gelu is another model.
  ref_exact = _hf_vit(ref_weights, image_size=32, act="gelu", **TINY)(images)
  assert _max_diff(tokens, ref_exact) > TOL


def test_load_vit_exact_gelu_option(tmp_path):
  rng = np.random.default_rng(1)
  f = _vision_transformer_npz(rng, grid=4, **TINY)
  model, params = load_vit(_save(tmp_path / "v.npz", f), image_size=32,
                           activation="gelu_exact")
  images = _images(rng, 2, 32, 32)
  ref = _hf_vit(f, image_size=32, act="gelu", **TINY)(images)
  assert _max_diff(model.apply({"params": params}, images), ref) <= TOL


def test_large_geometry_matches_hf(tmp_path):
  """ViT-L/16 shapes (width 1024, 16 heads, MLP 4096, patch 16) at depth 1."""
  rng = np.random.default_rng(2)
  dims = dict(width=1024, depth=1, heads=16, mlp=4096, patch=16)
  f = _vision_transformer_npz(rng, grid=4, pre_logits=1024, classes=5,
                              **dims)
  model, params = load_vit(_save(tmp_path / "l.npz", f), image_size=64)
  assert model.config.num_heads == 16 and model.config.mlp_dim == 4096
  images = _images(rng, 1, 64, 64)
  ref = _hf_vit(f, image_size=64, act="gelu_pytorch_tanh", **dims)(images)
  diff = _max_diff(model.apply({"params": params}, images), ref)
  print(f"ViT L-geometry max abs diff vs HF: {diff:.2e}")
  assert diff <= TOL


def test_load_vit_through_gfile(tmp_path):
  """Non-local paths go through tf.io.gfile (ram:// stands in for gs://)."""
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(3)
  f = _vision_transformer_npz(rng, grid=4, **TINY)
  buf = io.BytesIO()
  np.savez(buf, **f)
  remote = "ram://mic_jax_test/vit.npz"
  with tf.io.gfile.GFile(remote, "wb") as out:
    out.write(buf.getvalue())
  _, remote_params = load_vit(remote, image_size=32)
  _, local_params = load_vit(_save(tmp_path / "v.npz", f), image_size=32)
  jax.tree_util.tree_map(np.testing.assert_array_equal, remote_params,
                         local_params)


# --------------------------------------------------------------------------
# Position-embedding resizing.


@pytest.mark.parametrize("image_size", [64, (32, 48), 40])
def test_posemb_resize_keeps_class_token(tmp_path, image_size):
  """A 4x4-grid checkpoint at 2x, at a non-square and at an odd grid.

  (At real sizes: 224 -> 384 is 14x14 -> 24x24 patches.)
  """
  rng = np.random.default_rng(4)
  f = _vision_transformer_npz(rng, grid=4, **TINY)
  model, params = load_vit(_save(tmp_path / "v.npz", f),
                           image_size=image_size)
  old = f["Transformer/posembed_input/pos_embedding"]
  new = params["Transformer"]["posembed_input"]["pos_embedding"]
  h, w = (image_size, image_size) if isinstance(image_size, int) else (
      image_size)
  gh, gw = h // 8, w // 8
  assert new.shape == (1, 1 + gh * gw, 32)
  np.testing.assert_array_equal(new[:, 0], old[:, 0])
  # Corners of the grid stay where they were (align-corners sampling).
  grid = new[0, 1:].reshape(gh, gw, 32)
  old_grid = old[0, 1:].reshape(4, 4, 32)
  np.testing.assert_allclose(grid[0, 0], old_grid[0, 0], atol=1e-6)
  np.testing.assert_allclose(grid[-1, -1], old_grid[-1, -1], atol=1e-6)
  # And it runs at the new size.
  tokens = model.apply({"params": params}, _images(rng, 1, h, w))
  assert tokens.shape == (1, 1 + gh * gw, 32)


def test_resize_matches_scipy_zoom():
  """Same sampling as scipy.ndimage.zoom(order=1), Google's resampler."""
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  rng = np.random.default_rng(5)
  posemb = rng.standard_normal((1, 1 + 14 * 14, 6)).astype(np.float32)
  new = vit_ckpt.resize_posemb(posemb, num_prefix=1, old_grid=(14, 14),
                               new_grid=(24, 24))
  want = scipy_ndimage.zoom(posemb[0, 1:].reshape(14, 14, 6),
                            (24 / 14, 24 / 14, 1), order=1)
  np.testing.assert_allclose(new[0, 1:].reshape(24, 24, 6), want, atol=1e-5)
  np.testing.assert_array_equal(new[:, 0], posemb[:, 0])


def test_wrong_image_size_is_a_clear_error(tmp_path):
  f = _vision_transformer_npz(np.random.default_rng(6), grid=4, **TINY)
  model, params = load_vit(_save(tmp_path / "v.npz", f), image_size=32)
  with pytest.raises(ValueError, match="image_size"):
    model.apply({"params": params}, jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="multiple of the checkpoint's patch"):
    load_vit(str(tmp_path / "v.npz"), image_size=36)


# --------------------------------------------------------------------------
# Heads.


def test_head_dropped_kept_or_replaced(tmp_path):
  rng = np.random.default_rng(7)
  f = _vision_transformer_npz(rng, grid=4, pre_logits=24, classes=10, **TINY)
  path = _save(tmp_path / "v.npz", f)
  images = _images(rng, 2, 32, 32)

  model, params = load_vit(path, image_size=32)
  assert set(params) == {"embedding", "cls", "Transformer"}

  # Same number of classes with pre-logits: the file's head is used.
  model, params = load_vit(path, image_size=32, num_classes=10,
                           keep_pre_logits=True)
  np.testing.assert_array_equal(params["head"]["kernel"], f["head/kernel"])
  logits = model.apply({"params": params}, images)
  tokens = load_vit(path, image_size=32)[0].apply(
      {"params": {k: params[k] for k in ("embedding", "cls", "Transformer")}},
      images)
  rep = np.tanh(tokens[:, 0] @ f["pre_logits/kernel"] + f["pre_logits/bias"])
  np.testing.assert_allclose(logits, rep @ f["head/kernel"] + f["head/bias"],
                             atol=1e-4)

  # Same classes but pre-logits dropped: the file's head read the pre-logits
  # output, so a fresh head is made.
  model, params = load_vit(path, image_size=32, num_classes=10)
  assert "pre_logits" not in params and not np.any(params["head"]["kernel"])

  # New classes: a fresh zero head, no pre-logits.
  model, params = load_vit(path, image_size=32, num_classes=3)
  assert "pre_logits" not in params
  assert params["head"]["kernel"].shape == (32, 3)
  assert not np.any(params["head"]["kernel"])
  assert model.apply({"params": params}, images).shape == (2, 3)


def test_gap_checkpoint(tmp_path):
  """Without a class token, index 0 is the mean of the patch tokens."""
  rng = np.random.default_rng(8)
  f = _vision_transformer_npz(rng, grid=4, **TINY)
  del f["cls"]
  f["Transformer/posembed_input/pos_embedding"] = f[
      "Transformer/posembed_input/pos_embedding"][:, 1:]
  model, params = load_vit(_save(tmp_path / "v.npz", f), image_size=64)
  assert model.config.classifier == "gap"
  tokens = np.asarray(model.apply({"params": params},
                                  _images(rng, 2, 64, 64)))
  assert tokens.shape == (2, 1 + 64, 32)
  np.testing.assert_allclose(tokens[:, 0], tokens[:, 1:].mean(1), atol=1e-5)


# --------------------------------------------------------------------------
# Errors.


def test_errors_name_the_file_and_tensors(tmp_path):
  rng = np.random.default_rng(9)
  with pytest.raises(CheckpointError, match="nope.npz: no such"):
    load_vit(str(tmp_path / "nope.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(CheckpointError, match="junk.npz: not a readable"):
    load_vit(str(tmp_path / "junk.npz"))

  f = _vision_transformer_npz(rng, grid=4, **TINY)
  bad = dict(f)
  bad["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"] = np.zeros(7)
  del bad["Transformer/encoderblock_0/LayerNorm_2/scale"]
  bad["Transformer/encoderblock_0/Extra/kernel"] = np.zeros(3)
  with pytest.raises(CheckpointError) as e:
    load_vit(_save(tmp_path / "bad.npz", bad), image_size=32)
  msg = str(e.value)
  assert "bad.npz" in msg
  assert "encoderblock_1/MlpBlock_3/Dense_1/bias: checkpoint (7,)" in msg
  assert "missing from checkpoint: Transformer/encoderblock_0/LayerNorm_2/" \
         "scale" in msg
  assert "unexpected in checkpoint: Transformer/encoderblock_0/Extra" in msg

  with pytest.raises(CheckpointError, match="not a ViT-B/16.*width"):
    load_vit(str(tmp_path / "bad.npz"), variant="B/16")
  with pytest.raises(CheckpointError, match="MAP head"):
    load_vit(_save(tmp_path / "map.npz",
                   {**f, "MAPHead_0/probe": np.zeros((1, 1, 32))}))


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
    vit.get_vit("X/16")
  with pytest.raises(ValueError, match="unknown ViT option"):
    vit.get_vit("tiny", widht=3)


# --------------------------------------------------------------------------
# The module itself.


def _abstract_params(model, size):
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return variables["params"]


@pytest.mark.parametrize("name,classes,size,want", [
    # Published counts (google-research/vision_transformer tests).
    ("L/16", 1000, 224, 304_326_632),
    ("B/16", 1000, 224, 86_567_656),
    ("Ti/16", 1000, 224, 5_717_416),
    ("S/16", 1000, 224, 22_050_664),
    ("B/32", 1000, 224, 88_224_232),
    ("L/32", 1000, 224, 306_535_400),
    ("H/14", 1000, 224, 632_045_800),
    ("B/8", 1000, 224, 86_576_872),
    ("S/32", 1000, 224, 22_878_952),
    ("B/16-gap", 1000, 224, 86_566_120),
])
def test_param_counts(name, classes, size, want):
  name, _, gap = name.partition("-")
  kw = dict(classifier="gap") if gap else {}
  model = vit.get_vit(name, num_classes=classes, **kw)
  assert vit.count_params(_abstract_params(model, size)) == want


def test_output_contract_dropout_and_partitioning():
  model = vit.get_vit("tiny", dropout=0.5)
  images = jnp.asarray(_images(np.random.default_rng(10), 2, 32, 32))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  # Every weight carries logical axis names for sharding.
  boxed = jax.tree_util.tree_leaves(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  params = nn.meta.unbox(variables["params"])
  eval_a = model.apply({"params": params}, images)
  eval_b = model.apply({"params": params}, images, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  assert eval_a.shape == (2, 17, 32)
  train = model.apply({"params": params}, images, train=True,
                      rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(train, eval_a)


def test_bf16_and_remat_run():
  model = vit.get_vit("tiny", remat=True, dtype=jnp.bfloat16)
  images = jnp.zeros((1, 32, 32, 3))
  params = nn.meta.unbox(
      jax.jit(model.init)(jax.random.key(0), images)["params"])
  assert params["cls"].dtype == jnp.float32
  out = model.apply({"params": params}, images)
  assert out.dtype == jnp.bfloat16

  @jax.jit
  def loss(p):
    return jnp.mean(model.apply({"params": p}, images,
                                train=True).astype(jnp.float32) ** 2)
  grads = jax.grad(loss)(params)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
