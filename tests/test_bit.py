"""BiT ResNet-v2 tower and loader tests.

Checkpoints are written in the released BiT ``.npz`` layout (random weights,
the real names and shapes at a tiny width), loaded through ``load_bit`` and
compared with Hugging Face's PyTorch ``BitModel`` given the same weights.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mic_jax.checkpoints import CheckpointError, load_bit
from mic_jax.models import bit

TOL = 1e-4
# Tiny geometry: stem 8, bottlenecks 8/16/32/64, outputs 32/64/128/256.
TINY = dict(base=8, depths=(2, 1, 1, 1), groups=4)


def _bit_npz(rng, *, base, depths, groups, classes=None):
  """A google-research/big_transfer file (BiT-M-R50x1.npz layout)."""
  del groups  # Not stored in the files.

  def w(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  def gn(prefix, c):
    return {prefix + "group_norm/gamma": 1 + 0.3 * w(c),
            prefix + "group_norm/beta": 0.3 * w(c)}

  f = {"resnet/root_block/standardized_conv2d/kernel": w(7, 7, 3, base)}
  cin = base
  for s, depth in enumerate(depths):
    mid = base * 2 ** s
    for u in range(depth):
      p = f"resnet/block{s + 1}/unit{u + 1:02d}/"
      f.update(gn(p + "a/", cin))
      f[p + "a/standardized_conv2d/kernel"] = w(1, 1, cin, mid)
      if u == 0:
        f[p + "a/proj/standardized_conv2d/kernel"] = w(1, 1, cin, 4 * mid)
      f.update(gn(p + "b/", mid))
      f[p + "b/standardized_conv2d/kernel"] = w(3, 3, mid, mid)
      f.update(gn(p + "c/", mid))
      f[p + "c/standardized_conv2d/kernel"] = w(1, 1, mid, 4 * mid)
      cin = 4 * mid
  f.update(gn("resnet/", cin))
  if classes:
    f["resnet/head/conv2d/kernel"] = w(1, 1, cin, classes, scale=0.1)
    f["resnet/head/conv2d/bias"] = w(classes, scale=0.1)
  return f


def _save(path: pathlib.Path, arrays) -> str:
  np.savez(path, **arrays)
  return str(path)


def _images(rng, batch, size):
  return rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _hf_bit(f, *, base, depths, groups):
  """Hugging Face BitModel with the file's weights (HWIO -> OIHW)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.BitConfig(
      embedding_size=base, depths=list(depths),
      hidden_sizes=[4 * base * 2 ** s for s in range(len(depths))],
      layer_type="preactivation", global_padding=None, num_groups=groups,
      embedding_dynamic_padding=False, hidden_act="relu")
  model = transformers.BitModel(config).eval()
  t = lambda a: torch.from_numpy(np.ascontiguousarray(
      a.transpose(3, 2, 0, 1) if a.ndim == 4 else a, np.float32))
  sd = {"embedder.convolution.weight": t(
      f["resnet/root_block/standardized_conv2d/kernel"]),
        "norm.weight": t(f["resnet/group_norm/gamma"]),
        "norm.bias": t(f["resnet/group_norm/beta"])}
  for s, depth in enumerate(depths):
    for u in range(depth):
      p = f"resnet/block{s + 1}/unit{u + 1:02d}/"
      h = f"encoder.stages.{s}.layers.{u}."
      for i, sub in enumerate("abc", 1):
        sd[h + f"norm{i}.weight"] = t(f[p + sub + "/group_norm/gamma"])
        sd[h + f"norm{i}.bias"] = t(f[p + sub + "/group_norm/beta"])
        sd[h + f"conv{i}.weight"] = t(
            f[p + sub + "/standardized_conv2d/kernel"])
      if u == 0:
        sd[h + "downsample.conv.weight"] = t(
            f[p + "a/proj/standardized_conv2d/kernel"])
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not missing and not unexpected, (missing, unexpected)

  def run(images):
    with torch.no_grad():
      out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    grid = out.last_hidden_state.numpy().transpose(0, 2, 3, 1)
    return out.pooler_output.numpy()[:, :, 0, 0], grid
  return run


@pytest.mark.parametrize("size", [64, 72])
def test_load_bit_matches_hf(tmp_path, size):
  """Parity incl. an input (72) whose grid sizes are odd at every stride."""
  rng = np.random.default_rng(0)
  f = _bit_npz(rng, classes=21, **TINY)
  model, params = load_bit(_save(tmp_path / "bit.npz", f), num_groups=4)
  assert "head" not in params["resnet"]
  images = _images(rng, 2, size)
  tokens = np.asarray(model.apply({"params": params}, images))
  pooled, grid = _hf_bit(f, **TINY)(images)
  b, h, w, c = grid.shape
  assert tokens.shape == (b, 1 + h * w, c)
  d_pool = float(np.max(np.abs(tokens[:, 0] - pooled)))
  d_grid = float(np.max(np.abs(tokens[:, 1:] - grid.reshape(b, h * w, c))))
  print(f"BiT tiny @{size} max abs diff vs HF: pooled {d_pool:.2e}, "
        f"grid {d_grid:.2e}")
  assert d_pool <= TOL and d_grid <= TOL
  assert np.abs(grid).max() > 0.1  # A live network, not a zero map.


def test_head_kept_or_replaced(tmp_path):
  rng = np.random.default_rng(1)
  f = _bit_npz(rng, classes=7, **TINY)
  path = _save(tmp_path / "bit.npz", f)
  images = _images(rng, 2, 64)
  tower, tower_params = load_bit(path, num_groups=4)
  pooled = np.asarray(tower.apply({"params": tower_params}, images))[:, 0]

  model, params = load_bit(path, num_groups=4, num_classes=7)
  logits = model.apply({"params": params}, images)
  want = pooled @ f["resnet/head/conv2d/kernel"][0, 0] + f[
      "resnet/head/conv2d/bias"]
  np.testing.assert_allclose(logits, want, atol=1e-4)

  model, params = load_bit(path, num_groups=4, num_classes=3)
  assert params["resnet"]["head"]["conv2d"]["kernel"].shape == (1, 1, 256, 3)
  assert not np.any(params["resnet"]["head"]["conv2d"]["kernel"])
  assert model.apply({"params": params}, images).shape == (2, 3)


def test_errors_name_the_file_and_tensors(tmp_path):
  rng = np.random.default_rng(2)
  with pytest.raises(CheckpointError, match="missing.npz: no such"):
    load_bit(str(tmp_path / "missing.npz"))
  f = _bit_npz(rng, **TINY)
  bad = dict(f)
  bad["resnet/block2/unit01/b/standardized_conv2d/kernel"] = np.zeros(
      (3, 3, 16, 17), np.float32)
  del bad["resnet/block1/unit02/c/group_norm/beta"]
  with pytest.raises(CheckpointError) as e:
    load_bit(_save(tmp_path / "bad.npz", bad), num_groups=4)
  msg = str(e.value)
  assert "bad.npz" in msg
  assert ("resnet/block2/unit01/b/standardized_conv2d/kernel: checkpoint "
          "(3, 3, 16, 17)") in msg
  assert "resnet/block1/unit02/c/group_norm/beta" in msg
  with pytest.raises(CheckpointError, match="not a BiT R50x1.*depths"):
    load_bit(_save(tmp_path / "ok.npz", f), num_groups=4, variant="R50x1")
  with pytest.raises(CheckpointError, match="is this a BiT checkpoint"):
    load_bit(_save(tmp_path / "vit.npz", {"cls": np.zeros((1, 1, 4))}))


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown BiT variant 'R34x1'"):
    bit.get_bit("R34x1")


def _count(model):
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return bit.count_params(variables["params"])


@pytest.mark.parametrize("name", ["R50x1", "R101x3", "R152x4"])
def test_param_counts_match_hf(name):
  """Full-size counts, ours abstract, HF's built on torch's meta device."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = bit.bit_config(name)
  # Widths passed pre-multiplied: HF sizes its final norm from
  # hidden_sizes[-1] without the width factor.
  hf = transformers.BitConfig(
      embedding_size=cfg.root_width, depths=list(cfg.depths),
      hidden_sizes=[4 * cfg.bottleneck_width(s) for s in range(4)],
      layer_type="preactivation", global_padding=None)
  with torch.device("meta"):
    hf_count = sum(p.numel() for p in transformers.BitModel(hf).parameters())
  assert _count(bit.get_bit(name)) == hf_count
  # The ImageNet-21k head: a 1x1 conv to 21,843 classes.
  assert _count(bit.get_bit(name, num_classes=21843)) == (
      hf_count + (cfg.out_width + 1) * 21843)


def test_published_r50x1_size():
  # BiT-M-R50x1 with its 21k head: 68.3M (timm's model card), body 23.5M.
  assert _count(bit.get_bit("R50x1", num_classes=21843)) == 68_256_659


def test_output_contract_and_partitioning():
  model = bit.get_bit("tiny")
  images = jnp.asarray(_images(np.random.default_rng(3), 2, 64))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  boxed = jax.tree_util.tree_leaves(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  params = nn.meta.unbox(variables["params"])
  tokens = model.apply({"params": params}, images)
  assert tokens.shape == (2, 1 + 2 * 2, 256)
  np.testing.assert_allclose(tokens[:, 0], tokens[:, 1:].mean(1), atol=1e-5)
  np.testing.assert_array_equal(
      tokens, model.apply({"params": params}, images, train=True))


def test_bf16_and_remat_run():
  model = bit.get_bit("tiny", remat=True, dtype=jnp.bfloat16)
  images = jnp.zeros((1, 32, 32, 3))
  params = nn.meta.unbox(
      jax.jit(model.init)(jax.random.key(0), images)["params"])

  @jax.jit
  def loss(p):
    out = model.apply({"params": p}, images)
    assert out.dtype == jnp.bfloat16
    return jnp.mean(out.astype(jnp.float32) ** 2)
  grads = jax.grad(loss)(params)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
