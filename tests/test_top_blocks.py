"""Fine-tuning the top blocks of a frozen, cached photo tower.

``image.train_top_blocks = N``: the cache holds the tokens entering block
``depth - N``, each step runs only the top N blocks on them. That must
change nothing but speed: the split tower equals the whole one, evaluation
through the cached hidden tokens equals evaluation on pixels, training moves
the top blocks and nothing below them, and the cache stays the same one
while the top blocks train (so a resumed run reuses it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mic_jax import trainer
from mic_jax.evaluation import evaluation
from mic_jax.features import image_features
from mic_jax.models import vit
from mic_jax.train import checkpointing
from test_image_features import _config as cache_config


def _config(tmp_path, **overrides):
  """The feature-cache tests' demo config with the top ViT block trained."""
  return cache_config(tmp_path, **{"image.train_top_blocks": 1, **overrides})


@pytest.mark.parametrize("depth,split", [(2, 1), (3, 1), (3, 2)])
def test_split_tower_equals_the_whole_one(depth, split):
  model = vit.VisionTransformer(vit.ViTConfig(
      patch_size=8, width=32, depth=depth, mlp_dim=64, num_heads=2))
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3),
                              minval=-1, maxval=1)
  params = model.init(jax.random.key(1), images)["params"]
  whole = model.apply({"params": params}, images)
  hidden = model.apply({"params": params}, images, stop_block=split)
  assert hidden.shape == whole.shape
  assert np.abs(np.asarray(hidden - whole)).max() > 1e-3  # Not the output.
  top = model.apply({"params": params}, hidden, start_block=split)
  np.testing.assert_allclose(np.asarray(top), np.asarray(whole), atol=1e-6)


def test_scanned_tower_cannot_be_split():
  model = vit.VisionTransformer(vit.ViTConfig(
      patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2,
      scan_layers=True))
  images = jnp.zeros((1, 32, 32, 3))
  params = model.init(jax.random.key(1), images)["params"]
  with pytest.raises(ValueError, match="scan"):
    model.apply({"params": params}, images, stop_block=1)


@pytest.fixture(scope="module")
def top_run(tmp_path_factory):
  """A cross-modal demo run with its top ViT block trained, 4 steps."""
  tmp = tmp_path_factory.mktemp("top")
  config = _config(tmp)
  workdir = str(tmp / "run")
  results = trainer.train_and_evaluate(config, workdir)
  return tmp, config, workdir, results


def _best(config, workdir):
  """The run of ``config`` in ``workdir`` and its best checkpoint's params."""
  run = trainer.build_run(config, workdir)
  ckpt = checkpointing.RunCheckpoints(workdir, keep=1, async_save=False)
  _, params = ckpt.restore_best(run.abstract_state.params)
  ckpt.close()
  return run, params


def test_top_block_trains_and_the_rest_stays(top_run):
  tmp, config, workdir, results = top_run
  assert 0 <= results["test"]["macro_f1"] <= 1
  run = trainer.build_run(config, str(tmp / "fresh"))
  assert run.config.optim.unfreeze == image_features.top_block_pattern(
      run.model.img, 1)
  init, _ = trainer.init_state(run, checkpointing.RunCheckpoints(
      str(tmp / "fresh"), keep=1, async_save=False))
  ckpt = checkpointing.RunCheckpoints(workdir, keep=1, async_save=False)
  _, best = ckpt.restore_best(run.abstract_state.params)
  ckpt.close()
  before = jax.device_get(init.params["img"])
  after = jax.device_get(best["img"])
  moved = {}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before),
                          jax.tree.leaves(after)):
    name = jax.tree_util.keystr(path)
    moved[name] = not np.array_equal(np.asarray(a), np.asarray(b))
  top = [n for n in moved if "encoderblock_1" in n or "encoder_norm" in n]
  assert top and all(moved[n] for n in top if "kernel" in n)
  assert not any(moved[n] for n in moved if n not in top)
  # One cache, of the lower block's output, the same for the trained params
  # (the demo data lives in the workdir, so ask for the trained run's).
  caches = list((tmp / "cache").iterdir())
  assert len(caches) == 1
  run = trainer.build_run(config, workdir)
  again = image_features.ensure(run.config, run.model.img, after,
                                run.data_dir)
  assert str(again.directory).rstrip("/") == str(caches[0]).rstrip("/")
  assert again.batch_key == image_features.HIDDEN
  whole = image_features.cache_key(after, run.model.img, config.image.size,
                                   run.data_dir)
  assert whole not in str(caches[0])


def test_cached_hidden_tokens_evaluate_as_pixels(top_run):
  _, config, workdir, _ = top_run
  run, params = _best(config, workdir)
  with jax.set_mesh(run.mesh):
    pixel_probs, pixel_labels = evaluation.Evaluator(run).predict(
        params, "validation")
    trainer.attach_image_features(run, params)
    assert run.features.batch_key == image_features.HIDDEN
    cached_probs, cached_labels = evaluation.Evaluator(run).predict(
        params, "validation")
  np.testing.assert_array_equal(cached_labels, pixel_labels)
  np.testing.assert_allclose(cached_probs, pixel_probs, atol=1e-5)


def test_cache_key_changes_with_the_blocks_and_the_row_dtype(top_run):
  _, config, workdir, _ = top_run
  run, params = _best(config, workdir)
  img, tower, size = params["img"], run.model.img, config.image.size
  keys = {image_features.cache_key(img, tower, size, run.data_dir, depth,
                                   dtype)
          for depth in (None, 1, 0) for dtype in ("float32", "bfloat16")}
  assert len(keys) == 6


def test_training_every_block_equals_training_the_tower_from_pixels(tmp_path):
  """``train_top_blocks`` = depth is the unfrozen tower: no cache, every
  image parameter (embeddings too) trains, and the run follows the run with
  nothing frozen step for step."""
  steps = {"total_steps": 3, "eval_every": 3, "log_every": 1}
  every = _config(tmp_path / "a", **{"image.train_top_blocks": 2, **steps})
  free = _config(tmp_path / "b", **{"optim.freeze": "",
                                    "image.train_top_blocks": 0, **steps})
  params = {}
  for name, config in (("every", every), ("free", free)):
    workdir = str(tmp_path / name)
    trainer.train_and_evaluate(config, workdir)
    run = trainer.build_run(config, workdir)
    ckpt = checkpointing.RunCheckpoints(workdir, keep=1, async_save=False)
    params[name] = jax.device_get(
        ckpt.restore_state(run.abstract_state).params)
    ckpt.close()
    assert run.features is None
  assert not (tmp_path / "a" / "cache").exists()
  flat_every = jax.tree_util.tree_leaves_with_path(params["every"])
  flat_free = jax.tree.leaves(params["free"])
  assert len(flat_every) == len(flat_free)
  for (path, a), b in zip(flat_every, flat_free):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("overrides,match", [
    ({"optim.freeze": ""}, "freeze"),
    ({"image.train_top_blocks": 3}, "2 blocks"),
    ({"image.kind": "bit", "image.variant": "tiny"}, "ViT"),
])
def test_impossible_top_blocks_are_clear_errors(tmp_path, overrides, match):
  config = _config(tmp_path, **overrides)
  with pytest.raises(ValueError, match=match):
    trainer.build_run(config, str(tmp_path / "run"))
