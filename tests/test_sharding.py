"""Sharded training equals single-device training; FSDP really shards.

Every run uses the real trainer pieces (``build_run``, ``init_state``,
``jit_train_step``) on the tiny cross-modal demo config and the first
batches of the real demo pipeline, on the 8 fake CPU devices of
conftest.py. The reference is the same computation on one device. Warmup is
off, so every compared step has a non-zero learning rate: losses, gradient
norms and the parameters after the steps (which really move) must agree.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from mic_jax import sharding as shd
from mic_jax import trainer
from mic_jax.data import pipeline
from mic_jax.train import checkpointing

STEPS = 3
BATCH = 16

pytestmark = pytest.mark.needs_8_devices


def _config(data, fsdp, tensor):
  config = common.make_config("cross_modal", "demo")
  with config.unlocked():
    config.batch_size = BATCH
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    config.optim.warmup_steps = 0
    # Key biases (softmax-invariant) get a zero gradient up to float noise,
    # which Adam's default eps would turn into lr-sized steps that differ
    # between meshes; a larger eps keeps noise-only updates negligible while
    # real gradients still move the parameters.
    config.optim.eps = 1e-3
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One demo data set for every mesh (made by the first build_run)."""
  return str(tmp_path_factory.mktemp("sharding"))


def _train(run, state, batches):
  step = trainer.jit_train_step(run, donate=False)
  batch_sharding = shd.batch_sharding(run.mesh, run.rules)
  history = []  # (loss, grad norm) per step.
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    for batch in batches:
      state, metrics = step(state, shd.host_to_global(batch, batch_sharding))
      assert float(metrics["train/learning_rate"]) > 0
      history.append((float(metrics["train/loss"]),
                      float(metrics["train/grad_norm"])))
  return state, history


def _fresh(mesh, workdir, name):
  run = trainer.build_run(_config(*mesh), workdir)
  ckpts = checkpointing.RunCheckpoints(f"{workdir}/ckpt-{name}", keep=1,
                                       async_save=False)
  state, how = trainer.init_state(run, ckpts)
  assert how == "from scratch"
  return run, state, ckpts


def _batches(run, n):
  it = pipeline.train_batches(run.data_dir, batch_size=BATCH,
                              image_size=run.config.image.size, seed=0)
  return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def reference(workdir):
  """Losses, grad norms and final params on one device (mesh (1, 1, 1))."""
  run, state, _ = _fresh((1, 1, 1), workdir, "ref")
  assert run.mesh.devices.size == 1
  batches = _batches(run, STEPS)
  initial = jax.device_get(state.params)
  state, history = _train(run, state, batches)
  params = jax.device_get(state.params)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(initial)))
  assert moved > 1e-4, moved  # Equal params below are not equal by inertia.
  return batches, history, params


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_matches_single_device(mesh, workdir, reference):
  batches, want_history, want_params = reference
  run, state, _ = _fresh(mesh, workdir, "x".join(map(str, mesh)))
  specs = {s.spec for s in jax.tree.leaves(run.state_shardings.params)}
  if mesh[1] > 1:
    assert any("fsdp" in str(s) for s in specs), specs
  if mesh[2] > 1:
    assert any("tensor" in str(s) for s in specs), specs
  state, history = _train(run, state, batches)
  np.testing.assert_allclose(history, want_history, rtol=1e-5)
  got = jax.device_get(state.params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_fsdp_holds_at_most_a_sixth_per_device(workdir):
  """Measured from the arrays' shards on each device, not predicted."""
  run, state, _ = _fresh((1, 8, 1), workdir, "fsdp")
  tree = (state.params, state.opt_state)
  total = sum(x.nbytes for x in jax.tree.leaves(tree))
  per_device = shd.bytes_per_device(tree)
  assert len(per_device) == 8
  worst = max(per_device.values())
  assert worst <= total / 6, (worst, total, worst / total)


def test_checkpoint_from_one_mesh_continues_on_another(workdir, reference):
  """Save after 2 steps on (8,1,1), restore on (2,4,1), step 3 matches."""
  batches, want_history, want_params = reference
  run, state, ckpts = _fresh((8, 1, 1), workdir, "move")
  state, _ = _train(run, state, batches[:2])
  ckpts.save_state(2, state, force=True)
  ckpts.wait()
  run2 = trainer.build_run(_config(2, 4, 1), workdir)
  restored = checkpointing.RunCheckpoints(
      f"{workdir}/ckpt-move", keep=1).restore_state(run2.abstract_state)
  leaf = jax.tree.leaves(restored.params)[0]
  assert leaf.sharding.mesh.shape == run2.mesh.shape
  restored, history = _train(run2, restored, batches[2:])
  np.testing.assert_allclose(history, want_history[2:], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)),
                  jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
