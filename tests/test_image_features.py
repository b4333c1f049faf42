"""A frozen image tower's cached outputs, and image (modality) dropout.

The cache must change nothing but speed: evaluation through cached tokens
equals evaluation through pixels (with photos and with photos withheld),
the cache is reused when nothing changed and rebuilt when the tower's
weights or the image size change, and a build that fails leaves nothing a
later run could mistake for a cache.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import tensorflow as tf
import jax.numpy as jnp
import numpy as np
import pytest

import demo_configs
from mic_jax.train import checkpointing, evaluation, image_features, steps
from mic_jax.train import trainer


def _config(tmp_path, kind="cross_modal", **overrides):
  overrides = {"optim.freeze": "img",
               "image.feature_cache_dir": str(tmp_path / "cache"), **overrides}
  return demo_configs.short_demo(
      kind, **{"total_steps": 4, "log_every": 2, "eval_every": 4, **overrides})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """A built (untrained) cross-modal demo run with its initial state."""
  tmp = tmp_path_factory.mktemp("features")
  config = _config(tmp)
  workdir = str(tmp / "run")
  run = trainer.build_run(config, workdir)
  state, _ = trainer.init_state(run, checkpointing.RunCheckpoints(
      workdir, keep=1, async_save=False))
  return run, state


def test_frozen_tower_is_detected(demo_run):
  run, _ = demo_run
  params = run.abstract_state.params
  assert image_features.tower_is_frozen(run.config, params)
  config = run.config.copy_and_resolve_references()
  with config.unlocked():
    config.optim.freeze = "img/Transformer"  # Embedding still trains.
  assert not image_features.tower_is_frozen(config, params)
  config.optim.freeze = ""
  assert not image_features.wanted(config, params)


@pytest.mark.parametrize("withhold", [False, True])
def test_cached_evaluation_equals_pixel_evaluation(demo_run, withhold):
  run, state = demo_run
  run.features = None
  with jax.set_mesh(run.mesh):
    pixel_probs, pixel_labels = evaluation.Evaluator(run).predict(
        state.params, "validation", withhold_images=withhold)
    trainer.attach_image_features(run, state.params)
    assert run.features is not None
    cached_probs, cached_labels = evaluation.Evaluator(run).predict(
        state.params, "validation", withhold_images=withhold)
  run.features = None
  np.testing.assert_array_equal(cached_labels, pixel_labels)
  np.testing.assert_allclose(cached_probs, pixel_probs, atol=1e-6)


def test_cache_is_reused_and_rebuilt_when_inputs_change(demo_run):
  run, state = demo_run
  img = jax.device_get(state.params["img"])
  first = image_features.ensure(run.config, run.model.img, img, run.data_dir)
  meta = pathlib.Path(first.directory) / "cache.json"
  stamp = meta.stat().st_mtime_ns
  again = image_features.ensure(run.config, run.model.img, img, run.data_dir)
  assert again.directory == first.directory
  assert meta.stat().st_mtime_ns == stamp  # Reused, not rebuilt.
  info = json.loads(meta.read_text())
  # Every distinct photo of the three splits, plus the empty image.
  assert info["photos"] == len(first.keys) > 1
  assert first.no_photo in set(first.keys.tolist())

  changed = jax.tree.map(lambda x: x + 1.0, img)
  other = image_features.ensure(run.config, run.model.img, changed,
                                run.data_dir)
  assert other.directory != first.directory
  assert (image_features.cache_key(img, run.model.img, 16, run.data_dir)
          != image_features.cache_key(img, run.model.img, 32, run.data_dir))


def test_unknown_photo_is_an_error(demo_run):
  run, state = demo_run
  cache = image_features.ensure(run.config, run.model.img,
                                jax.device_get(state.params["img"]),
                                run.data_dir)
  unknown = int(cache.keys.max()) + 1 if cache.keys.max() < 2**62 else 1
  with pytest.raises(KeyError, match="not in the image feature cache"):
    cache.lookup(np.array([cache.keys[0], unknown]))


def test_failed_build_leaves_no_cache(demo_run, tmp_path):
  """A build that dies part-way (here: a truncated test shard) leaves nothing."""
  run, state = demo_run
  data = tmp_path / "data"
  shutil.copytree(run.data_dir, data)
  shard = sorted(data.glob("test.tfrecord-*"))[0]
  shard.write_bytes(shard.read_bytes()[:-100])
  target = tmp_path / "cache" / "abc"
  with pytest.raises(Exception, match="(?i)truncat|corrupt|data ?loss"):
    image_features.build(target, run.model.img,
                         jax.device_get(state.params["img"]), str(data),
                         int(run.config.image.size), batch_size=8)
  assert not target.exists()
  assert list((tmp_path / "cache").iterdir()) == []


def test_training_with_cache_keeps_tower_and_uses_tokens(tmp_path):
  config = _config(tmp_path)
  workdir = str(tmp_path / "run")
  results = trainer.train_and_evaluate(config, workdir)
  assert 0 <= results["test"]["macro_f1"] <= 1
  caches = list((tmp_path / "cache").iterdir())
  assert len(caches) == 1 and (caches[0] / "cache.json").exists()
  # The frozen tower is bit-for-bit its initial state in the checkpoint.
  run = trainer.build_run(config, str(tmp_path / "fresh"))
  init, _ = trainer.init_state(run, checkpointing.RunCheckpoints(
      str(tmp_path / "fresh"), keep=1, async_save=False))
  ckpt = checkpointing.RunCheckpoints(workdir, keep=1, async_save=False)
  _, best = ckpt.restore_best(run.abstract_state.params)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(init.params["img"]),
                  jax.tree.leaves(best["img"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The stream the loop trains on carries the cached tokens of its photos
  # (no pixels): the same examples as the pixel stream, in the same order.
  from mic_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from mic_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  trainer.attach_image_features(run, init.params)
  batch = next(run.train_batches(2))
  assert "image" not in batch and "image_key" not in batch
  keyed = next(pipeline.train_batches(
      run.data_dir, batch_size=shd.per_host_batch_size(config.batch_size),
      image_size=config.image.size, seed=config.seed, start_step=2,
      shuffle_buffer=config.data.shuffle_buffer, image_keys=True))
  np.testing.assert_array_equal(batch["label"], keyed["label"])
  np.testing.assert_array_equal(batch["image_tokens"],
                                run.features.lookup(keyed["image_key"]))
  assert len(np.unique(keyed["image_key"])) > 1


# ------------------------------------------------------- image dropout --


def test_withhold_photos_rate_and_determinism():
  batch = {"image_present": jnp.ones((4000,), jnp.int32)}
  key = jax.random.key(3)
  out = steps.withhold_photos(batch, key, 0.3)["image_present"]
  assert abs(1 - float(out.mean()) - 0.3) < 0.03
  again = steps.withhold_photos(batch, key, 0.3)["image_present"]
  np.testing.assert_array_equal(out, again)
  assert int(steps.withhold_photos(batch, key, 1.0)["image_present"].sum()) == 0
  # A product without a photo stays without one.
  none = {"image_present": jnp.zeros((10,), jnp.int32)}
  assert int(steps.withhold_photos(none, key, 0.0)["image_present"].sum()) == 0


def _one_step(run, state):
  """(state at step 5, one training batch, jitted-step maker by options)."""
  from mic_jax.train import optimizer  # pylint: disable=g-import-not-at-top
  from mic_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = run.config
  tx, schedule = optimizer.make_optimizer(config.optim, state.params,
                                          config.total_steps)
  weights = np.ones(run.info.num_classes, np.float32)
  batch = next(pipeline.train_batches(run.data_dir, batch_size=8,
                                      image_size=config.image.size, seed=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def make(**options):
    return jax.jit(steps.make_train_step(
        run.model, tx, schedule, seed=0, grad_accum_steps=1,
        label_smoothing=0.0, loss_class_weights=weights, **options))

  return state.replace(step=jnp.asarray(5, jnp.int32)), batch, make  # lr > 0


def test_image_dropout_one_trains_like_no_photos(demo_run):
  """Rate 1 is the same step as a batch whose products have no photo."""
  run, state = demo_run
  state, batch, make = _one_step(run, state)
  step_fn = lambda rate: make(image_dropout=rate)

  with jax.set_mesh(run.mesh):
    dropped, m1 = step_fn(1.0)(state, batch)
    no_photo = {**batch, "image_present": jnp.zeros_like(batch["image_present"])}
    plain, m2 = step_fn(0.0)(state, no_photo)
    with_photo, m3 = step_fn(0.0)(state, batch)
  assert float(m1["train/loss"]) == pytest.approx(float(m2["train/loss"]),
                                                  abs=1e-6)
  for a, b in zip(jax.tree.leaves(dropped.params),
                  jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert abs(float(m3["train/loss"]) - float(m1["train/loss"])) > 1e-6
  with pytest.raises(ValueError, match="image_dropout"):
    step_fn(1.5)


def test_model_trained_without_photos_is_scored_without_photos(demo_run):
  """``image_dropout = 1`` evaluates as trained: every photo withheld."""
  run, state = demo_run
  evaluator = evaluation.Evaluator(run)
  as_trained, _ = evaluator.predict(state.params, "validation")
  withheld, _ = evaluator.predict(state.params, "validation",
                                  withhold_images=True)
  assert np.abs(as_trained - withheld).max() > 1e-6  # Photos do matter here.
  config = run.config.copy_and_resolve_references()
  with config.unlocked():
    config.model.image_dropout = 1.0
  no_photos = evaluation.Evaluator(dataclasses.replace(run, config=config))
  scored, _ = no_photos.predict(state.params, "validation")
  np.testing.assert_array_equal(scored, withheld)


def _jpeg(colour):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.new("RGB", (20, 16), colour).save(out, format="JPEG")
  return out.getvalue()


def test_repeated_photos_are_cached_once(tmp_path):
  """Byte-identical photos (common in real catalogues) share one row, even
  within one batch and across splits; products without a photo share the
  empty image's row."""
  from mic_jax.data import preprocess, records  # pylint: disable=g-import-not-at-top
  from mic_jax.models import vit  # pylint: disable=g-import-not-at-top
  photos = [_jpeg((255, 0, 0)), _jpeg((0, 0, 255)), b""]

  def example(i, photo):
    return records.Example(product_id=str(i), title=f"t {i}",
                           input_ids=[1, 2, 0, 0], attention_mask=[1, 1, 0, 0],
                           label=i % 2, image_jpeg=photo)

  splits = {"train": [example(i, photos[i % 3]) for i in range(10)],
            "validation": [example(i, photos[i % 2]) for i in range(10, 14)]}
  data = tmp_path / "data"
  records.write_examples(data, splits, labels=["a", "b"], max_length=4)
  tower = vit.get_vit("tiny")
  params = tower.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  target = tmp_path / "cache" / "x"
  image_features.build(target, tower, params, str(data), 16, batch_size=8)
  cache = image_features.ImageFeatureCache(target)
  assert len(cache.keys) == 3 == len(set(cache.keys.tolist()))
  assert json.loads((target / "cache.json").read_text())["photos"] == 3
  red = preprocess.photo_key(tf.constant(photos[0]), tf.constant(1, tf.int64))
  tokens = cache.lookup(np.array([int(red), cache.no_photo, int(red)]))
  np.testing.assert_array_equal(tokens[0], tokens[2])
  assert not np.allclose(tokens[0], tokens[1])


# --------------------------------------------- faults of the cache (#22) --


@pytest.fixture
def tiny(tmp_path):
  """A 3-photo prepared set, a tiny ViT and a config whose cache is in tmp."""
  from mic_jax.data import records  # pylint: disable=g-import-not-at-top
  from mic_jax.models import vit  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  photos = [_jpeg((255, 0, 0)), _jpeg((0, 0, 255)), _jpeg((0, 255, 0)), b""]
  splits = {"train": [records.Example(
      product_id=str(i), title=f"t {i}", input_ids=[1, 2, 0, 0],
      attention_mask=[1, 1, 0, 0], label=i % 2, image_jpeg=photos[i % 4])
                      for i in range(12)]}
  data = tmp_path / "data"
  records.write_examples(data, splits, labels=["a", "b"], max_length=4)
  tower = vit.get_vit("tiny")
  params = tower.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  config = ml_collections.ConfigDict({"image": {
      "size": 16, "feature_cache_dir": str(tmp_path / "cache")}})
  return config, tower, params, str(data)


def _ensure(tiny, **changes):
  config, tower, params, data = tiny
  config = config.copy_and_resolve_references()
  for k, v in changes.items():
    config.image[k] = v
  return image_features.ensure(config, tower, params, data)


def _entries(root):
  return sorted(p.name for p in pathlib.Path(root).iterdir())


@pytest.mark.parametrize("damage", ["truncated_tokens", "missing_keys",
                                    "truncated_keys", "bad_marker",
                                    "missing_marker"])
def test_damaged_cache_is_moved_aside_and_rebuilt(tiny, damage, caplog):
  """Including a lost ``cache.json``, which once made every run rebuild and
  then crash publishing onto the incomplete directory (issue 36)."""
  good = _ensure(tiny)
  want = good.lookup(good.keys)
  directory = pathlib.Path(good.directory)
  del good
  if damage == "truncated_tokens":
    tokens = directory / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-1000])
  elif damage == "missing_keys":
    (directory / "keys.npy").unlink()
  elif damage == "truncated_keys":
    keys = directory / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:-8])
  elif damage == "missing_marker":
    (directory / "cache.json").unlink()
  else:
    (directory / "cache.json").write_text("{")
  with caplog.at_level("WARNING"):
    again = _ensure(tiny)
  assert str(directory) in caplog.text and "damaged" in caplog.text
  np.testing.assert_array_equal(again.lookup(again.keys), want)
  moved = [n for n in _entries(directory.parent) if n.startswith(".damaged-")]
  assert len(moved) == 1 and moved[0].startswith(f".damaged-{directory.name}")
  assert image_features.feature_store.problem(str(directory), 1) is None
  stamp = (directory / "cache.json").stat().st_mtime_ns
  reused = _ensure(tiny)  # The rebuilt cache is reused, not built again.
  assert reused.directory == again.directory
  assert (directory / "cache.json").stat().st_mtime_ns == stamp
  assert _entries(directory.parent) == sorted([directory.name, *moved])


def test_publishing_onto_an_incomplete_directory_moves_it_aside(tmp_path,
                                                               caplog):
  """A build that finds its target present but incomplete (no cache.json)
  publishes anyway; the leftover is kept aside as damaged."""
  store = image_features.feature_store
  target = tmp_path / "cache" / ("a" * store.NAME_LENGTH)
  target.mkdir(parents=True)
  (target / "keys.npy").write_bytes(b"left over")
  with store.Writer(str(target), 2, tmp_path / "mirror") as writer:
    writer.add(np.array([7, 8]), np.ones((2, 3, 4), np.float32))
    with caplog.at_level("WARNING"):
      writer.commit({}, 1)
  assert store.problem(str(target), 1) is None
  assert str(target) in caplog.text and "damaged" in caplog.text
  moved = [n for n in _entries(target.parent) if n.startswith(".damaged-")]
  assert len(moved) == 1
  assert (target.parent / moved[0] / "keys.npy").read_bytes() == b"left over"


def test_key_ignores_where_the_tokenizer_lies(tiny, tmp_path):
  """Copies of the same data (each demo row of reproduce prepares its own)
  share a cache though each records its own tokenizer path; what changes
  the photos or their preprocessing still names another cache."""
  _, tower, params, data = tiny

  def copy(name, **info_changes):
    other = tmp_path / name
    shutil.copytree(data, other)
    path = other / "dataset_info.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                **info_changes}, indent=1))
    return str(other)

  def key(data_dir):
    return image_features.cache_key(params, tower, 16, data_dir)

  first = copy("row1", tokenizer=str(tmp_path / "row1" / "tokenizer"))
  assert key(first) == key(copy(
      "row2", tokenizer=str(tmp_path / "row2" / "tokenizer")))
  assert key(first) != key(copy(
      "smaller", tokenizer=str(tmp_path / "row1" / "tokenizer"),
      photo_preprocessing={"max_image_side": 16, "jpeg_quality": 90}))
  shard = sorted(pathlib.Path(first).glob("train.tfrecord-*"))[0]
  shard.write_bytes(shard.read_bytes() + b"another photo")
  assert key(first) != key(copy(
      "row3", tokenizer=str(tmp_path / "row1" / "tokenizer")))


def test_cache_directory_is_readable_by_others(tiny):
  """mkdtemp's 0700 would lock other users out of a shared $MIC_JAX_CACHE."""
  old = os.umask(0o022)
  try:
    cache = _ensure(tiny)
  finally:
    os.umask(old)
  mode = pathlib.Path(cache.directory).stat().st_mode & 0o777
  assert mode == 0o755, oct(mode)
  for name in ("keys.npy", "tokens.npy", "cache.json"):
    assert (pathlib.Path(cache.directory) / name).stat().st_mode & 0o044


def test_cache_on_an_object_store(tiny, tmp_path, monkeypatch):
  """A ``scheme://`` root goes through tf.io.gfile (here TF's in-memory
  ram:// filesystem), never to a local ``ram:/`` folder; it is reused."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  local = _ensure(tiny)
  root = f"ram://{tmp_path.name}/cache"
  remote = _ensure(tiny, feature_cache_dir=root)
  assert str(remote.directory).startswith(root + "/")
  assert tf.io.gfile.exists(str(remote.directory) + "/cache.json")
  assert not (tmp_path / "ram:").exists()
  np.testing.assert_array_equal(remote.lookup(local.keys),
                                local.lookup(local.keys))
  stamp = tf.io.gfile.stat(str(remote.directory) + "/tokens.npy").mtime_nsec
  again = _ensure(tiny, feature_cache_dir=root)  # Reused, not rebuilt.
  assert tf.io.gfile.stat(str(again.directory) + "/tokens.npy"
                          ).mtime_nsec == stamp
  tf.io.gfile.rmtree(f"ram://{tmp_path.name}")


_BUILD_SCRIPT = """
import sys, jax, jax.numpy as jnp, ml_collections
sys.path.insert(0, {tests!r})
from mic_jax.models import vit
from mic_jax.train import image_features
tower = vit.get_vit("tiny")
params = tower.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
config = ml_collections.ConfigDict({{"image": {{"size": 16,
    "feature_cache_dir": {cache!r}}}}})
image_features.ensure(config, tower, params, {data!r})
"""


def _build_in_subprocess(tiny, fault):
  import sys  # pylint: disable=g-import-not-at-top
  config, _, _, data = tiny
  script = _BUILD_SCRIPT.format(tests=os.path.dirname(__file__),
                                cache=config.image.feature_cache_dir,
                                data=data)
  env = {**os.environ, "MIC_JAX_FAULT": fault, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "-c", script], env=env,
                        capture_output=True, text=True, timeout=300)


def test_sigterm_during_build_removes_its_files(tiny):
  done = _build_in_subprocess(tiny, "feature_build_batch:1:TERM")
  assert done.returncode != 0
  assert "SIGTERM while building the image feature cache" in done.stderr, (
      done.stderr[-3000:])
  assert _entries(tiny[0].image.feature_cache_dir) == []


def test_killed_build_is_swept_on_the_next_start(tiny, caplog):
  done = _build_in_subprocess(tiny, "feature_build_batch:1:KILL")
  assert done.returncode == -9, done.stderr[-3000:]
  root = tiny[0].image.feature_cache_dir
  left = _entries(root)
  assert len(left) == 1 and left[0].startswith(".")  # The partial build.
  with caplog.at_level("WARNING"):
    cache = _ensure(tiny)
  assert "its writer is gone" in caplog.text
  assert _entries(root) == [pathlib.Path(cache.directory).name]


def test_sweep_keeps_live_builds_and_removes_silent_ones(tmp_path):
  """A build elsewhere (another host) is judged by its last sign of life."""
  store = image_features.feature_store
  root = tmp_path / "cache"

  def temp(name, host, pid, age):
    path = root / name
    path.mkdir(parents=True)
    marker = path / store.WRITER
    marker.write_text(json.dumps({"host": host, "pid": pid}))
    os.utime(marker, (time_now - age, time_now - age))
    return path

  time_now = time.time()
  name = "0123456789abcdef01234567"
  here = temp(f".{name}.mine.1.x", __import__("socket").gethostname(),
              os.getpid(), 10 * store.STALE_SECONDS)
  fresh = temp(f".{name}.other.1.y", "another-host", 1, 60)
  silent = temp(f".{name}.other.1.z", "another-host", 1,
                2 * store.STALE_SECONDS)
  (root / name).mkdir()  # A finished cache: never touched.
  old = time_now - 2 * store.STALE_SECONDS
  (root / ".unrelated").mkdir()  # Not a build's name: never touched.
  os.utime(root / ".unrelated", (old, old))
  removed = store.sweep(str(root))
  assert removed == [str(silent)]
  assert here.exists() and fresh.exists() and (root / name).exists()
  assert (root / ".unrelated").exists()


def test_tower_with_dropout_is_not_cached(tmp_path):
  """Cached tokens are eval-mode: with image dropout the tower runs."""
  config = _config(tmp_path, **{"image.dropout": 0.1})
  run = trainer.build_run(config, str(tmp_path / "run"))
  assert image_features.train_mode_differs(run.model.img)
  state, _ = trainer.init_state(run, checkpointing.RunCheckpoints(
      str(tmp_path / "run"), keep=1, async_save=False))
  trainer.attach_image_features(run, state.params)
  assert run.features is None
  assert not (tmp_path / "cache").exists()


# ------------------------------------------------------- title dropout --


def test_withhold_titles_keeps_the_first_token_where_a_photo_is_present():
  n, length = 4000, 6
  mask = jnp.asarray(np.tile([1, 1, 1, 1, 0, 0], (n, 1)), jnp.int32)
  present = jnp.asarray(np.arange(n) % 4 != 0, jnp.int32)  # 1/4 no photo.
  batch = {"attention_mask": mask, "image_present": present}
  key = jax.random.key(4)
  out = np.asarray(steps.withhold_titles(batch, key, 0.3)["attention_mask"])
  dropped = (out != np.asarray(mask)).any(1)
  # Only products with a photo lose their title, about 30% of them.
  assert not dropped[np.asarray(present) == 0].any()
  assert abs(dropped[np.asarray(present) > 0].mean() - 0.3) < 0.03
  np.testing.assert_array_equal(out[dropped], np.tile([1, 0, 0, 0, 0, 0],
                                                      (dropped.sum(), 1)))
  np.testing.assert_array_equal(
      out, steps.withhold_titles(batch, key, 0.3)["attention_mask"])
  everything = np.asarray(steps.withhold_titles(batch, key, 1.0)[
      "attention_mask"])
  assert (everything[np.asarray(present) > 0].sum(1) == 1).all()


def test_title_dropout_one_trains_like_empty_titles(demo_run):
  """Rate 1 is the same step as a batch whose photo-bearing products show
  only their first title token, and differs from the plain step."""
  run, state = demo_run
  state, batch, make = _one_step(run, state)
  step_fn = lambda rate: make(title_dropout=rate)

  keep_first = (jnp.arange(batch["attention_mask"].shape[1]) == 0)[None]
  emptied = {**batch, "attention_mask": jnp.where(
      (batch["image_present"] > 0)[:, None], keep_first.astype(jnp.int32),
      batch["attention_mask"])}
  with jax.set_mesh(run.mesh):
    _, dropped = step_fn(1.0)(state, batch)
    _, by_hand = step_fn(0.0)(state, emptied)
    _, plain = step_fn(0.0)(state, batch)
  assert float(dropped["train/loss"]) == pytest.approx(
      float(by_hand["train/loss"]), abs=1e-6)
  assert abs(float(plain["train/loss"]) - float(dropped["train/loss"])) > 1e-6
  with pytest.raises(ValueError, match="title_dropout"):
    step_fn(-0.1)


def test_bfloat16_rows_take_half_the_disk_and_read_back_rounded(tiny):
  """``image.feature_cache_dtype=bfloat16``: another cache (the dtype is in
  its key), half the bytes of rows, and the same tokens rounded to bf16."""
  full = _ensure(tiny)
  half = _ensure(tiny, feature_cache_dtype="bfloat16")
  assert half.directory != full.directory and half.row_dtype == "bfloat16"
  rows = "tokens.npy"
  full_bytes = (pathlib.Path(full.directory) / rows).stat().st_size
  half_bytes = (pathlib.Path(half.directory) / rows).stat().st_size
  assert half_bytes < 0.55 * full_bytes
  want = full.lookup(full.keys)
  got = half.lookup(full.keys)
  assert got.dtype == np.float32
  assert not np.array_equal(got, want)  # Really rounded ...
  # ... to the nearest bf16 (8 bits of mantissa): relative error <= 2^-9.
  np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=1e-30)
  # Read back through a fresh open as well (the dtype comes from cache.json).
  again = image_features.ImageFeatureCache(half.directory)
  np.testing.assert_array_equal(again.lookup(full.keys), got)


def test_unknown_cache_dtype_is_a_clear_error(tiny):
  with pytest.raises(ValueError, match="float32, bfloat16"):
    _ensure(tiny, feature_cache_dtype="float16")


def test_cache_with_an_unknown_row_dtype_is_damaged(tiny):
  good = _ensure(tiny)
  marker = pathlib.Path(good.directory) / "cache.json"
  meta = json.loads(marker.read_text())
  meta["row_dtype"] = "int8"
  marker.write_text(json.dumps(meta))
  assert "row_dtype" in image_features.feature_store.problem(
      str(good.directory), image_features.FORMAT_VERSION)


def test_killed_writer_not_yet_reaped_counts_as_gone(tmp_path):
  """A writer SIGKILLed on this host whose parent has not reaped it yet is a
  zombie: ``kill(pid, 0)`` still finds it, but its build will never finish,
  so the sweep removes it instead of waiting on it forever."""
  store = image_features.feature_store
  child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    info = {"host": socket.gethostname(), "pid": child.pid}
    assert store._writer_alive(info) is True  # pylint: disable=protected-access
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.time() + 30
    while store._process_state(child.pid) != "Z":  # pylint: disable=protected-access
      assert time.time() < deadline, "the killed child never became a zombie"
      time.sleep(0.01)
    assert store._writer_alive(info) is False  # pylint: disable=protected-access
    root = tmp_path / "cache"
    build = root / f".{'0123456789abcdef01234567'}.here.{child.pid}.x"
    build.mkdir(parents=True)
    (build / store.WRITER).write_text(json.dumps(info))
    assert store.sweep(str(root)) == [str(build)]
  finally:
    child.kill()
    child.wait()
