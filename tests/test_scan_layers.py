"""``config.model.scan_layers``: same numbers as the unrolled layer stacks.

A scanned tower holds the unrolled tower's weights stacked on a leading
layer axis. Each test gives both layouts the same weights (stacked with
:mod:`mic_jax.checkpoints.layer_stacks`) and compares outputs, gradients,
loaded checkpoints and restored Orbax states; the last tests run a scanned
model sharded on the 8 fake devices of conftest.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from configs import common
from mic_jax import sharding as shd
from mic_jax import trainer
from mic_jax.checkpoints import architecture
from mic_jax.checkpoints import bert as bert_ckpt
from mic_jax.checkpoints import common as ckpt_common
from mic_jax.checkpoints import layer_stacks
from mic_jax.checkpoints import vit as vit_ckpt
from mic_jax.data import pipeline
from mic_jax.models import bert, classifier, vit
from mic_jax.train import checkpointing, optimizer, steps, towers

TOL = 1e-5


def _init(model, *args):
  return nn.meta.unbox(model.init(jax.random.key(0), *args))["params"]


def _assert_trees_close(got, want, atol=TOL):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol,
                               rtol=0, err_msg=jax.tree_util.keystr(path))


def _max_diff(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------- tree conversion --


def test_stack_and_unstack_are_inverse_and_keep_other_keys():
  tree = {"encoder": {f"layer_{i}": {"k": np.full((2, 3), i, np.float32)}
                      for i in range(3)} | {"other": np.ones(1)},
          "pooler": {"b": np.zeros(2)}}
  stacked = layer_stacks.stack_layers(tree, "layer")
  assert set(stacked["encoder"]) == {"layer", "other"}
  assert stacked["encoder"]["layer"]["k"].shape == (3, 2, 3)
  np.testing.assert_array_equal(stacked["encoder"]["layer"]["k"][2], 2)
  assert layer_stacks.layout(stacked) == {"layer": layer_stacks.STACKED}
  back = layer_stacks.unstack_layers(stacked, "layer")
  _assert_trees_close(back, tree, atol=0)
  assert layer_stacks.match_layout(back, stacked)["encoder"].keys() == \
      stacked["encoder"].keys()


def test_abstract_leaves_keep_a_named_sharding_with_unsharded_layer_axis():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
  spec = jax.sharding.PartitionSpec("fsdp", None)
  leaf = jax.ShapeDtypeStruct((4, 8), jnp.float32,
                              sharding=jax.sharding.NamedSharding(mesh, spec))
  tree = {"layer_0": {"k": leaf}, "layer_1": {"k": leaf}}
  stacked = layer_stacks.stack_layers(tree, "layer")["layer"]["k"]
  assert stacked.shape == (2, 4, 8)
  assert stacked.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp",
                                                             None)
  back = layer_stacks.unstack_layers({"layer": {"k": stacked}}, "layer")
  assert back["layer_1"]["k"].shape == (4, 8)
  assert back["layer_1"]["k"].sharding.spec == spec


def test_gaps_and_mixed_layouts_are_named_errors():
  with pytest.raises(ckpt_common.CheckpointError, match="without gaps"):
    layer_stacks.stack_layers({"layer_0": {}, "layer_2": {}}, "layer")
  with pytest.raises(ckpt_common.CheckpointError, match="mixes"):
    layer_stacks.stack_layers({"layer_0": {"k": np.ones(1)},
                               "layer": {"k": np.ones((1, 1))}}, "layer")
  with pytest.raises(ckpt_common.CheckpointError, match="differ"):
    layer_stacks.stack_layers({"layer_0": {"k": np.ones(1)},
                               "layer_1": {"q": np.ones(1)}}, "layer")


# ----------------------------------------------------- towers, forward --


def _bert_batch(vocab, batch=3, length=10):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  mask = (np.arange(length)[None] < np.array([10, 6, 2])[:, None]).astype(
      np.int32)
  return jnp.asarray(ids * mask), jnp.asarray(mask), jnp.zeros_like(ids)


@pytest.mark.parametrize("remat", [False, True])
def test_bert_scanned_equals_unrolled(remat):
  cfg = bert.get_bert_config("tiny", num_hidden_layers=3)
  ids, mask, types = _bert_batch(cfg.vocab_size)
  unrolled = bert.BertEncoder(cfg)
  scanned = bert.BertEncoder(cfg, scan_layers=True, remat=remat)
  params = _init(unrolled, ids)
  stacked = layer_stacks.stack_layers(params, "layer")
  # The scanned model's own parameter tree has exactly this layout.
  assert jax.tree.structure(stacked) == jax.tree.structure(
      jax.eval_shape(lambda: _init(scanned, ids)))
  want = unrolled.apply({"params": params}, ids, mask, types)
  got = scanned.apply({"params": stacked}, ids, mask, types)
  assert _max_diff(got, want) <= TOL


@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_vit_scanned_equals_unrolled(layer_scale):
  unrolled = vit.get_vit("tiny", depth=3, layer_scale_init=layer_scale)
  scanned = vit.get_vit("tiny", depth=3, layer_scale_init=layer_scale,
                        scan_layers=True, remat=True)
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1)
  params = _init(unrolled, images)
  stacked = layer_stacks.stack_layers(params, "encoderblock")
  assert jax.tree.structure(stacked) == jax.tree.structure(
      jax.eval_shape(lambda: _init(scanned, images)))
  want = unrolled.apply({"params": params}, images)
  got = scanned.apply({"params": stacked}, images)
  assert _max_diff(got, want) <= TOL


def test_scanned_weights_carry_the_layers_axis_name():
  model = bert.BertEncoder(bert.get_bert_config("tiny"), scan_layers=True)
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32)))["params"]
  kernel = boxed["encoder"]["layer"]["intermediate"]["dense"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp")


# ------------------------------------------- cross-modal train step --


def _cross_modal_config(scan):
  config = common.make_config("cross_modal", "demo")
  with config.unlocked():
    config.num_classes = 5
    config.model.scan_layers = scan
    # Dropout draws differ between the layouts; without it the step is
    # deterministic and must agree.
    config.text.dropout = config.fusion.dropout = 0.0
  return config


def _batch(config, n=4):
  rng = np.random.default_rng(0)
  length, size = config.text.max_length, config.image.size
  mask = (np.arange(length)[None] < rng.integers(2, length, (n, 1))).astype(
      np.int32)
  return {
      "input_ids": jnp.asarray(rng.integers(1, 100, (n, length)) * mask,
                               jnp.int32),
      "attention_mask": jnp.asarray(mask),
      "token_type_ids": jnp.zeros((n, length), jnp.int32),
      "image": jnp.asarray(rng.uniform(-1, 1, (n, size, size, 3)),
                           jnp.float32),
      "image_present": jnp.asarray([1, 0, 1, 1], jnp.int32),
      "label": jnp.asarray(rng.integers(0, 5, n), jnp.int32),
      "mask": jnp.ones((n,), jnp.float32),
  }


def _to_scanned(tree):
  return layer_stacks.to_layout(tree, {"layer": layer_stacks.STACKED,
                                       "encoderblock": layer_stacks.STACKED})


def _to_unrolled(tree):
  return layer_stacks.to_layout(tree, {"layer": layer_stacks.UNROLLED,
                                       "encoderblock": layer_stacks.UNROLLED})


def test_cross_modal_loss_and_grads_scanned_equal_unrolled():
  """The training loss (dropout on, rates 0) and every gradient."""
  results = {}
  for scan in (False, True):
    config = _cross_modal_config(scan)
    model = classifier.build_model(config)
    batch = _batch(config)
    if not scan:
      params = reference_params = _init(model, batch)
    else:
      params = _to_scanned(reference_params)

    def loss(p, model=model, batch=batch):
      logits, _ = model.apply({"params": p}, batch, train=True,
                              rngs={"dropout": jax.random.key(0)})
      return steps.weighted_xent(logits, batch["label"], batch["mask"],
                                 0.0).sum()

    results[scan] = jax.jit(jax.value_and_grad(loss))(params)
  (want_loss, want_grads), (got_loss, got_grads) = results[False], results[
      True]
  assert abs(float(got_loss) - float(want_loss)) <= TOL
  _assert_trees_close(_to_unrolled(got_grads), want_grads)
  assert _max_diff(want_grads["txt"]["encoder"]["layer_1"],
                   jax.tree.map(jnp.zeros_like,
                                want_grads["txt"]["encoder"]["layer_1"])) > 0


# ------------------------------------------------------------ loaders --


def _hf_bert_dir(tmp_path):
  config = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=3,
      num_attention_heads=2, intermediate_size=48,
      max_position_embeddings=40)
  torch.manual_seed(0)
  transformers.BertModel(config).eval().save_pretrained(tmp_path / "bert")
  return tmp_path / "bert"


def _npz_vit(tmp_path):
  """A Google-layout .npz: our unrolled names are Google's names."""
  model = vit.get_vit("tiny", depth=3)
  params = _init(model, jnp.zeros((1, 32, 32, 3)))
  flat = {k: np.asarray(v) + 0.01 for k, v in
          ckpt_common.flatten(params).items()}
  path = tmp_path / "vit.npz"
  np.savez(path, **flat)
  return str(path)


def _hf_dinov2_dir(tmp_path):
  config = transformers.Dinov2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      mlp_ratio=2, patch_size=8, image_size=32, layerscale_value=0.5)
  torch.manual_seed(0)
  transformers.Dinov2Model(config).eval().save_pretrained(tmp_path / "dino")
  return str(tmp_path / "dino")


def test_bert_loader_into_scanned_model_equals_stacked_unrolled(tmp_path):
  directory = _hf_bert_dir(tmp_path)
  model, params = bert_ckpt.load_bert(directory)
  s_model, s_params = bert_ckpt.load_bert(directory, scan_layers=True)
  _assert_trees_close(s_params, layer_stacks.stack_layers(params, "layer"),
                      atol=0)
  ids, mask, types = _bert_batch(99)
  assert _max_diff(s_model.apply({"params": s_params}, ids, mask, types),
                   model.apply({"params": params}, ids, mask, types)) <= TOL


@pytest.mark.parametrize("kind", ["npz", "dinov2"])
def test_vit_loader_into_scanned_model_equals_stacked_unrolled(tmp_path,
                                                                kind):
  source = _npz_vit(tmp_path) if kind == "npz" else _hf_dinov2_dir(tmp_path)
  model, params = vit_ckpt.load_vit(source, 32)
  s_model, s_params = vit_ckpt.load_vit(source, 32, scan_layers=True)
  assert s_model.config.scan_layers
  _assert_trees_close(s_params,
                      layer_stacks.stack_layers(params, "encoderblock"),
                      atol=0)
  images = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3), minval=-1)
  assert _max_diff(s_model.apply({"params": s_params}, images),
                   model.apply({"params": params}, images)) <= TOL


def test_run_loads_pretrained_towers_into_scanned_model(tmp_path):
  """towers.load_pretrained: the scanned run gets the stacked checkpoints."""
  bert_dir, npz = _hf_bert_dir(tmp_path), _npz_vit(tmp_path)
  got = {}
  for scan in (False, True):
    config = _cross_modal_config(scan)
    with config.unlocked():
      config.text.checkpoint = str(bert_dir)
      config.image.checkpoint = npz
    config = architecture.resolve(config)  # The checkpoints' architecture.
    model = classifier.build_model(config)
    params = _init(model, _batch(config))
    shardings = jax.tree.map(lambda x: x.sharding, params)
    got[scan], loaded = towers.load_pretrained(config, params, shardings)
    assert len(loaded) == 2
  _assert_trees_close(_to_unrolled(got[True])["txt"], got[False]["txt"],
                      atol=0)
  _assert_trees_close(_to_unrolled(got[True])["img"], got[False]["img"],
                      atol=0)


# -------------------------------------------------- Orbax checkpoints --


def _state(scan):
  config = _cross_modal_config(scan)
  model = classifier.build_model(config)
  params = _init(model, _batch(config))
  tx, _ = optimizer.make_optimizer(config.optim, params, 100)
  return steps.TrainState(jnp.int32(7), params, tx.init(params))


def _abstract(state):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)


def test_orbax_unscanned_checkpoint_restores_scanned_and_back(tmp_path):
  unrolled = _state(scan=False)
  # Make the optimizer moments non-trivial, so they are checked too.
  unrolled = unrolled.replace(opt_state=jax.tree.map(
      lambda x: x + 0.5 if x.ndim else x, unrolled.opt_state))
  scanned_target = _abstract(_state(scan=True))

  first = checkpointing.RunCheckpoints(str(tmp_path / "a"), keep=1,
                                       async_save=False)
  first.save_state(7, unrolled, force=True)
  first.save_best(7, unrolled.params, {checkpointing.BEST_METRIC: 0.5})
  first.wait()
  restored = first.restore_state(scanned_target)
  assert jax.tree.structure(restored) == jax.tree.structure(scanned_target)
  _assert_trees_close(restored, _to_scanned(unrolled), atol=0)
  _, best = first.restore_best(scanned_target.params)
  _assert_trees_close(best, _to_scanned(unrolled.params), atol=0)
  from_run = checkpointing.restore_params_from(str(tmp_path / "a"),
                                               scanned_target.params)
  _assert_trees_close(from_run, _to_scanned(unrolled.params), atol=0)
  first.close()

  # ... and the scanned state, saved, restores into an unrolled run.
  second = checkpointing.RunCheckpoints(str(tmp_path / "b"), keep=1,
                                        async_save=False)
  second.save_state(7, restored, force=True)
  second.wait()
  back = second.restore_state(_abstract(unrolled))
  _assert_trees_close(back, unrolled, atol=0)
  from_states = checkpointing.restore_params_from(
      str(tmp_path / "b" / "checkpoints"), _abstract(unrolled.params))
  _assert_trees_close(from_states, unrolled.params, atol=0)
  second.close()


# Every optimizer grouping the configs allow: frozen towers (their optimizer
# state is all optax.MaskedNode) and learning-rate groups (each group's
# moments are MaskedNode outside the group), alone and together.
GROUPINGS = [("", ""), ("", "txt=0.25"), ("img", ""), ("txt", ""),
             ("txt|img", ""), ("img", "txt=0.25,head=30"),
             ("img/Transformer", "fusion=2,txt=0.5")]


def _grouped_state(scan, freeze, multipliers, steps_taken=0, params=None):
  """A train state whose optimizer groups follow ``freeze`` and
  ``multipliers``, after ``steps_taken`` AdamW steps on fixed gradients."""
  config = _cross_modal_config(scan)
  with config.unlocked():
    config.optim.freeze = freeze
    config.optim.lr_multipliers = multipliers
  if params is None:
    params = _init(classifier.build_model(config), _batch(config))
  tx, _ = optimizer.make_optimizer(config.optim, params, 100)
  opt_state = tx.init(params)
  for i in range(steps_taken):
    grads = jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.01 * (i + 1)),
                         params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return steps.TrainState(jnp.int32(steps_taken), params, opt_state), tx


def _through_orbax(directory, state, like):
  """``state`` saved as a run's step 2 and restored into ``like``'s layout."""
  ckpts = checkpointing.RunCheckpoints(str(directory), keep=1,
                                       async_save=False)
  ckpts.save_state(2, state, force=True)
  ckpts.wait()
  restored = ckpts.restore_state(_abstract(like))
  ckpts.close()
  return restored


@pytest.mark.parametrize("freeze,multipliers", GROUPINGS)
def test_grouped_optimizer_state_resumes_scanned_and_back(tmp_path, freeze,
                                                          multipliers):
  """Unrolled -> scanned -> unrolled through real Orbax checkpoints, with
  the optimizer's masked subtrees, then one more step in each layout."""
  unrolled, tx_unrolled = _grouped_state(False, freeze, multipliers,
                                         steps_taken=2)
  scanned_target, tx_scanned = _grouped_state(True, freeze, multipliers)
  restored = _through_orbax(tmp_path / "a", unrolled, scanned_target)
  assert jax.tree.structure(restored) == jax.tree.structure(scanned_target)
  _assert_trees_close(restored, _to_scanned(unrolled), atol=0)
  back = _through_orbax(tmp_path / "b", restored, unrolled)
  _assert_trees_close(back, unrolled, atol=0)

  # The restored scanned state trains on like the unrolled one.
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.03), unrolled.params)
  updates, _ = tx_unrolled.update(grads, unrolled.opt_state, unrolled.params)
  scanned_updates, _ = tx_scanned.update(_to_scanned(grads),
                                         restored.opt_state, restored.params)
  _assert_trees_close(_to_unrolled(scanned_updates), updates)


# ------------------------------------------------- sharded, 8 devices --


def _trainer_config(scan, mesh):
  config = common.make_config("cross_modal", "demo")
  with config.unlocked():
    config.batch_size = 16
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    config.optim.warmup_steps = 0
    config.optim.eps = 1e-3  # As in test_sharding: float-noise gradients.
    config.model.scan_layers = scan
    config.text.dropout = config.fusion.dropout = 0.0
  return config


def _train(run, state, batches):
  step = trainer.jit_train_step(run, donate=False)
  batch_sharding = shd.batch_sharding(run.mesh, run.rules)
  losses = []
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    for batch in batches:
      state, metrics = step(state, shd.host_to_global(batch, batch_sharding))
      losses.append(float(metrics["train/loss"]))
  return state, losses


@pytest.mark.needs_8_devices
def test_sharded_scanned_run_resumes_unrolled_checkpoint_and_matches(
    tmp_path):
  """An unrolled one-device state, restored into a scanned run on a
  (2, 2, 2) mesh, trains to the same losses and parameters."""
  workdir = str(tmp_path / "run")
  reference = trainer.build_run(_trainer_config(False, (1, 1, 1)), workdir)
  ckpts = checkpointing.RunCheckpoints(str(tmp_path / "ckpt"), keep=1,
                                       async_save=False)
  state, _ = trainer.init_state(reference, ckpts)
  ckpts.save_state(0, state, force=True)
  ckpts.wait()
  it = pipeline.train_batches(reference.data_dir, batch_size=16,
                              image_size=reference.config.image.size, seed=0)
  batches = [next(it) for _ in range(2)]
  want_state, want_losses = _train(reference, state, batches)

  run = trainer.build_run(_trainer_config(True, (2, 2, 2)), workdir)
  layer_specs = {s.spec for s in jax.tree.leaves(
      run.state_shardings.params["txt"]["encoder"]["layer"])}
  assert all(spec[0] is None for spec in layer_specs), layer_specs
  assert any("fsdp" in str(s) for s in layer_specs), layer_specs
  assert any("tensor" in str(s) for s in layer_specs), layer_specs
  restored, how = trainer.init_state(run, ckpts)
  assert how.startswith("resumed")
  kernel = restored.params["img"]["Transformer"]["encoderblock"][
      "MlpBlock_3"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == run.state_shardings.params["img"][
      "Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"].spec
  got_state, losses = _train(run, restored, batches)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  _assert_trees_close(_to_unrolled(jax.device_get(got_state.params)),
                      jax.device_get(want_state.params))
  ckpts.close()


def test_weight_decay_skips_stacked_norms_and_biases():
  """AdamW's decay mask ignores the layer axis: one step on the stacked
  params equals one step on the unrolled params, stacked."""
  rng = np.random.default_rng(0)
  layers = {f"layer_{i}": {"norm": {"scale": rng.normal(size=4) + 1},
                           "dense": {"kernel": rng.normal(size=(4, 4))}}
            for i in range(2)}
  unrolled = {"txt": {"encoder": layers}}
  grads = jax.tree.map(lambda x: np.full_like(x, 0.1), unrolled)
  config = common.make_config("text_only", "demo")
  with config.unlocked():
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.5
  results = []
  for params, g in ((unrolled, grads), (_to_scanned(unrolled),
                                        _to_scanned(grads))):
    tx, _ = optimizer.make_optimizer(config.optim, params, 100)
    updates, _ = tx.update(g, tx.init(params), params)
    results.append(updates)
  _assert_trees_close(_to_unrolled(results[1]), results[0], atol=1e-7)
