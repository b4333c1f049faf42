"""The photo-feature cache built by several hosts, each computing its share.

Two real ``jax.distributed`` processes on this machine (CPU) build one cache
into a shared directory; process 1 is SIGKILLed part-way through its share.
Process 0 publishes its shard, waits, and stops with an error naming the
missing shard and its host; the rerun reuses shard 0 untouched, rebuilds
only shard 1 (the killed half-build is swept, never read), and both
processes then read rows equal, bit for bit, to a single-process build.
The in-process tests cover a ``scheme://`` root (TF's ``ram://``), the
timeout message, a damaged shard and the rule for when roots are shared.
"""

import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from mic_jax.features import feature_store, image_features

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = int(os.environ.get("MIC_JAX_TEST_TIMEOUT", "400"))
BATCH = 4  # Photos per forward pass: ~10 batches, 5 per host.


def _jpeg(colour):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.new("RGB", (20, 16), colour).save(out, format="JPEG")
  return out.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """36 distinct photos (some repeated, some products without one) in two
  splits, written as data_prep would."""
  from mic_jax.data import records  # pylint: disable=g-import-not-at-top
  photos = [_jpeg((7 * i % 256, 50 * i % 256, 255 - 6 * i)) for i in range(36)]

  def example(i):
    photo = b"" if i % 9 == 0 else photos[i % 36]
    return records.Example(product_id=str(i), title=f"t {i}",
                           input_ids=[1, 2, 0, 0], attention_mask=[1, 1, 0, 0],
                           label=i % 3, image_jpeg=photo)

  path = tmp_path_factory.mktemp("hosts") / "data"
  records.write_examples(path, {
      "train": [example(i) for i in range(40)],
      "validation": [example(i) for i in range(30, 50)]},
      labels=["a", "b", "c"], max_length=4)
  return str(path)


def _tower():
  from mic_jax.models import vit  # pylint: disable=g-import-not-at-top
  tower = vit.get_vit("tiny")
  params = tower.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  return tower, params


def _config(root, **image):
  return ml_collections.ConfigDict({"image": {
      "size": 16, "feature_cache_dir": str(root),
      "feature_cache_batch_size": BATCH, **image}})


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """The single-process cache: (sorted keys, their rows)."""
  tower, params = _tower()
  cache = image_features.ensure(
      _config(tmp_path_factory.mktemp("one") / "cache"), tower, params, data)
  assert isinstance(cache.directory, str)  # One whole cache, no shards.
  return cache.keys, cache.lookup(cache.keys)


# ------------------------------------------------- two real processes --

_SCRIPT = """
import sys
import jax, jax.numpy as jnp, ml_collections, numpy as np
from absl import logging
logging.set_verbosity(logging.INFO)
port, index, root, data, out, wait = sys.argv[1:]
# A long heartbeat timeout: on a loaded machine the service would otherwise
# end process 0 (the peer died) before its own wait times out.
jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                           process_id=int(index), heartbeat_timeout_seconds=900)
from mic_jax.features import image_features
from mic_jax.models import vit
tower = vit.get_vit("tiny")
params = tower.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
config = ml_collections.ConfigDict({"image": {"size": 16,
    "feature_cache_dir": root, "feature_cache_batch_size": %d,
    "feature_cache_shared": True, "feature_cache_wait_seconds": float(wait)}})
try:
  cache = image_features.ensure(config, tower, params, data)
except Exception as e:
  print(f"FAILED: {type(e).__name__}: {e}", flush=True)
  import os; os._exit(3)  # Not jax.distributed's exit barrier: a peer died.
np.savez(out, keys=cache.keys, rows=cache.lookup(cache.keys),
         shards=len(cache.shard_tokens))
""" % BATCH


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_two(root, data, out, wait, faults=(None, None)):
  """Both processes; returns [(returncode, output)] by process index."""
  port = _free_port()
  procs, logs = [], []
  for i, fault in enumerate(faults):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               PYTHONPATH=str(REPO))
    env.pop("MIC_JAX_FAULT", None)
    if fault:
      env["MIC_JAX_FAULT"] = fault
    # Files, not pipes: a full pipe of one process's log would block it,
    # and with it the other in jax.distributed.initialize.
    logs.append(open(out / f"log{i}-{port}.txt", "w+b"))
    procs.append(subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(port), str(i), str(root), data,
         str(out / f"process{i}.npz"), str(wait)],
        cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
  results = []
  for p, log in zip(procs, logs):
    try:
      p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    log.seek(0)
    results.append((p.returncode, log.read().decode(errors="replace")))
    log.close()
  return results


def _entries(root):
  return sorted(p.name for p in pathlib.Path(root).iterdir())


# Slow: it passes on its own (68 s idle) but failed once in the full
# parallel suite (2026-12-07) for a reason not yet found; until it is, it
# runs with the slow tests (python -m pytest -m slow tests). Ruled out: an
# early sweep of the killed build by process 0 (process 1 stays a zombie,
# so "alive", until this test reaps it; tried with process 0 started 30 s
# late). Suspected: under load process 1 reaches its kill only after
# process 0, which hosts jax.distributed's service, has exited.
@pytest.mark.slow
def test_two_hosts_one_killed_and_rerun_equal_one_host(data, reference,
                                                       tmp_path):
  root, out = tmp_path / "cache", tmp_path / "out"
  out.mkdir()
  (code0, out0), (code1, out1) = _launch_two(
      root, data, out, wait=20, faults=(None, "feature_build_batch:2:KILL"))
  assert code1 == -9, out1[-3000:]
  assert code0 == 3, out0[-3000:]
  assert "FAILED: ShardTimeout" in out0, out0[-3000:]
  assert "shard 1 of 2 (built by process 1)" in out0 and "not there" in out0
  left = _entries(root)
  shard0 = [n for n in left if n.endswith(".00000-of-00002")]
  assert len(shard0) == 1, left
  name = shard0[0].split(".")[0]
  assert feature_store.problem(str(root / shard0[0]), 1) is None
  # Process 1's half-written shard is only a temporary build, never published.
  assert sorted(left) == sorted([shard0[0], *[n for n in left
                                              if n.startswith(f".{name}.00001")]])
  assert len(left) == 2, left
  stamp = (root / shard0[0] / "cache.json").stat().st_mtime_ns

  (code0, out0), (code1, out1) = _launch_two(root, data, out, wait=300)
  assert code0 == 0, out0[-3000:]
  assert code1 == 0, out1[-3000:]
  assert "reusing this host's shard" in out0, out0[-3000:]
  assert "this host's share (1 of 2)" in out1, out1[-3000:]
  assert "its writer is gone" in out0 + out1  # The killed build, swept.
  assert (root / shard0[0] / "cache.json").stat().st_mtime_ns == stamp
  assert _entries(root) == [f"{name}.00000-of-00002", f"{name}.00001-of-00002"]

  keys, rows = reference
  for i in range(2):
    got = np.load(out / f"process{i}.npz")
    assert int(got["shards"]) == 2
    np.testing.assert_array_equal(got["keys"], keys)
    np.testing.assert_array_equal(got["rows"], rows)  # Bit for bit.
  # The shares are disjoint, both non-empty, and together every photo.
  share = [np.load(root / f"{name}.0000{i}-of-00002" / "keys.npy")
           for i in range(2)]
  assert len(share[0]) and len(share[1])
  assert not set(share[0].tolist()) & set(share[1].tolist())
  assert sorted(np.concatenate(share).tolist()) == sorted(keys.tolist())
  meta = json.loads((root / f"{name}.00001-of-00002" / "cache.json").read_text())
  assert (meta["shard"], meta["shards"], meta["batch_size"]) == (1, 2, BATCH)

  # A later single-process run reuses the two shards (builds nothing).
  tower, params = _tower()
  cache = image_features.ensure(_config(root), tower, params, data)
  assert len(cache.shard_tokens) == 2 and len(_entries(root)) == 2
  np.testing.assert_array_equal(cache.lookup(keys), rows)


# ------------------------------------------------------- in-process --


def test_shards_on_an_object_store(data, reference, tmp_path, monkeypatch):
  """The shard paths go through tf.io.gfile (a ``ram://`` root here)."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  tower, params = _tower()
  root = f"ram://{tmp_path.name}/cache"
  config = _config(root, feature_cache_wait_seconds=60.0)
  assert image_features.shared_root(config, root)
  digest = image_features.cache_key(params, tower, 16, data)
  image_features.build(feature_store.shard_directory(root, digest, 0, 2),
                       tower, params, data, 16, batch_size=BATCH,
                       share=image_features.Hosts(0, 2))
  cache = image_features.ensure(config, tower, params, data,
                                image_features.Hosts(1, 2))
  assert [str(d) for d in cache.directory] == [
      feature_store.shard_directory(root, digest, i, 2) for i in range(2)]
  keys, rows = reference
  np.testing.assert_array_equal(cache.keys, keys)
  np.testing.assert_array_equal(cache.lookup(keys), rows)
  assert not (tmp_path / "ram:").exists()
  tf.io.gfile.rmtree(f"ram://{tmp_path.name}")


def test_missing_shard_times_out_naming_it(data, tmp_path):
  tower, params = _tower()
  config = _config(tmp_path / "cache", feature_cache_wait_seconds=0.5)
  with pytest.raises(feature_store.ShardTimeout,
                     match=r"shard 2 of 3 \(built by process 2\).*not there"):
    image_features.ensure(config, tower, params, data,
                          image_features.Hosts(0, 3))
  # Its own shard is published (complete), so a rerun only waits.
  names = _entries(tmp_path / "cache")
  assert len(names) == 1 and names[0].endswith(".00000-of-00003")


def test_damaged_own_shard_is_moved_aside_and_rebuilt(data, reference,
                                                      tmp_path, caplog):
  tower, params = _tower()
  root = tmp_path / "cache"
  config = _config(root, feature_cache_wait_seconds=60.0)
  digest = image_features.cache_key(params, tower, 16, data)
  for i in range(2):
    image_features.build(feature_store.shard_directory(root, digest, i, 2),
                         tower, params, data, 16, batch_size=BATCH,
                         share=image_features.Hosts(i, 2))
  shard1 = pathlib.Path(feature_store.shard_directory(root, digest, 1, 2))
  tokens = shard1 / "tokens.npy"
  tokens.write_bytes(tokens.read_bytes()[:-100])
  early = config.copy_and_resolve_references()
  early.image.feature_cache_wait_seconds = 0.5
  # Host 0 never uses (nor moves) host 1's damaged shard: it waits, then
  # says why.
  with pytest.raises(feature_store.ShardTimeout, match="tokens.npy has"):
    image_features.ensure(early, tower, params, data,
                          image_features.Hosts(0, 2))
  # Host 1 (its owner) moves it aside and builds it again.
  with caplog.at_level("WARNING"):
    cache = image_features.ensure(config, tower, params, data,
                                  image_features.Hosts(1, 2))
  assert "damaged" in caplog.text and str(shard1) in caplog.text
  keys, rows = reference
  np.testing.assert_array_equal(cache.lookup(keys), rows)


def test_which_roots_count_as_shared():
  def shared(value, root="/local/cache"):
    config = ml_collections.ConfigDict({"image": {
        "feature_cache_shared": value}})
    return image_features.shared_root(config, root)
  assert not shared("auto") and shared("auto", "gs://bucket/cache")
  assert shared(True) and not shared(False, "gs://bucket/cache")
  assert shared("True") and not shared(None)
  with pytest.raises(ValueError, match="feature_cache_shared"):
    shared("maybe")
  # One process (no jax.distributed): always the whole cache.
  assert image_features.hosts_of_run(ml_collections.ConfigDict(
      {"image": {"feature_cache_shared": True}}), "/x") == image_features.Hosts()
