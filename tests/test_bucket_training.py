"""Length buckets reach the models unchanged: a batch cut to its bucket
trains and scores like the same batch padded to ``max_length`` (masked
positions never mattered), and jit compiles one step per bucket."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import demo_configs
from configs import common
from mic_jax import trainer
from mic_jax.data import pipeline
from mic_jax.evaluation import evaluation
from mic_jax.models import classifier
from mic_jax.train import optimizer, steps, towers

NO_DROPOUT = {"text.dropout": 0.0, "fusion.dropout": 0.0, "num_classes": 8,
              "optim.warmup_steps": 0, "optim.eps": 1e-3}


def _config(kind, **overrides):
  return demo_configs.short_demo(kind, total_steps=6, log_every=2,
                                 eval_every=3, **{**NO_DROPOUT, **overrides})


def _batch(config, rng, b=8, longest=7):
  length, size = config.text.max_length, config.image.size
  used = rng.integers(2, longest + 1, (b, 1))
  mask = (np.arange(length)[None] < used).astype(np.int32)
  return {
      "input_ids": rng.integers(5, 40, (b, length)).astype(np.int32) * mask,
      "attention_mask": mask,
      "token_type_ids": np.zeros((b, length), np.int32),
      "image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
      "image_present": np.array([1, 0, 1, 1, 1, 1, 0, 1], np.int32)[:b],
      "label": rng.integers(0, 8, (b,)).astype(np.int32),
      "mask": np.ones((b,), np.float32),
  }


def _cut(batch, width):
  return {k: v[:, :width] if k in pipeline.TOKEN_KEYS else v
          for k, v in batch.items()}


@pytest.mark.parametrize("kind,text_repr", [
    ("cross_modal", "pooler"), ("text_only", "mean"), ("early", "pooler")])
def test_bucketed_train_steps_equal_padded_steps(kind, text_repr):
  """Three updates on a batch cut to 8 of 16 positions: same losses, grad
  norms and parameters as on the padded batch; one compile per length."""
  config = _config(kind, **{"model.text_repr": text_repr})
  model = towers.build_model(config)
  rng = np.random.default_rng(0)
  batch = _batch(config, rng)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  tx, schedule = optimizer.make_optimizer(config.optim, params, 10)
  step = jax.jit(steps.make_train_step(
      model, tx, schedule, seed=0, grad_accum_steps=1, label_smoothing=0.1,
      loss_class_weights=np.ones(8, np.float32)))
  start = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  out = {}
  for width in (16, 8):
    state, history = start, []
    for _ in range(3):
      state, metrics = step(state, _cut(batch, width))
      history.append(jax.device_get(metrics))
    out[width] = state, history
  assert step._cache_size() == 2  # pylint: disable=protected-access
  for got, want in zip(out[8][1], out[16][1]):
    np.testing.assert_allclose(got["train/loss"], want["train/loss"],
                               rtol=2e-5)
    np.testing.assert_allclose(got["train/grad_norm"],
                               want["train/grad_norm"], rtol=2e-4)
  moved = 0.0
  for a, b, c in zip(jax.tree.leaves(out[8][0].params),
                     jax.tree.leaves(out[16][0].params),
                     jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    moved = max(moved, float(np.abs(np.asarray(b) - np.asarray(c)).max()))
  assert moved > 1e-4, moved  # The comparison above is not vacuous.
  # Scoring: the same logits whatever the padding.
  eval_step = jax.jit(steps.make_eval_step(model, log_probs=True))
  np.testing.assert_allclose(
      np.asarray(eval_step(params, _cut(batch, 8))),
      np.asarray(eval_step(params, batch)), atol=2e-5)


# A one-layer BERT and precomputed photo tokens: compiles in seconds.
TINY_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=16)


def _tiny_model(kind, text_repr, rate):
  config = common.make_config(kind, "demo")
  with config.unlocked():
    config.num_classes = 8
    config.text.max_length = 16
    config.text.bert = TINY_BERT
    config.text.dropout = config.fusion.dropout = rate
    config.model.text_repr = text_repr
  return classifier.build_model(config), config


@pytest.mark.parametrize("kind,text_repr", [
    ("cross_modal", "pooler"), ("text_only", "mean"), ("early", "cls")])
def test_bucketed_loss_and_grads_equal_padded_with_dropout(kind, text_repr):
  """Dropout on (BERT, fusion and head 0.3): the same products padded to 16
  tokens or cut to 8 draw the same masks at every real position, so the
  training loss and every gradient agree up to float rounding."""
  model, config = _tiny_model(kind, text_repr, rate=0.3)
  rng = np.random.default_rng(1)
  batch = _batch(config, rng)
  del batch["image"]
  batch["image_tokens"] = rng.normal(size=(8, 5, 24)).astype(np.float32)
  params = nn.meta.unbox(jax.jit(lambda b: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, b))(
          batch)["params"])

  def loss(params, batch, key, train=True):
    logits, _ = model.apply({"params": params}, batch, train=train,
                            rngs={"dropout": key})
    return steps.weighted_xent(logits, batch["label"], batch["mask"],
                               0.0).mean()

  grad = jax.jit(jax.value_and_grad(loss))
  for seed in (0, 1):
    key = jax.random.key(seed)
    want_loss, want = grad(params, batch, key)
    got_loss, got = grad(params, _cut(batch, 8), key)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                            jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5,
                                 rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  # Not vacuous: dropout changed the loss.
  assert abs(float(loss(params, batch, key, train=False)) - float(
      want_loss)) > 1e-3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from mic_jax.data import demo  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("bucket_data")
  return demo.ensure_demo_dataset(root / "demo", max_length=16, image_size=32,
                                  seed=0)


def test_bucketed_evaluation_equals_padded(data_dir, tmp_path):
  """The Evaluator over buckets 6/16 (the demo's titles are 5..7 tokens):
  the same report and the same scores, in bucket order."""
  def run_with(buckets):
    config = _config("cross_modal", **{"data.demo": False,
                                        "data.dir": str(data_dir),
                                        "data.length_buckets": buckets})
    run = trainer.build_run(config, str(tmp_path / (buckets or "padded")))
    return run
  padded, bucketed = run_with(""), run_with("6,16")
  assert padded.buckets == () and bucketed.buckets == (6, 16)
  assert bucketed.config.data.length_buckets == "6,16"
  params = jax.jit(lambda: padded.spec.init_params(0))()
  results = {}
  for name, run in (("padded", padded), ("bucketed", bucketed)):
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      evaluator = evaluation.Evaluator(run)
      results[name] = evaluator.predict(params, "validation", log_probs=True)
  (lp_a, labels_a), (lp_b, labels_b) = results["padded"], results["bucketed"]
  assert len(labels_a) == len(labels_b) == 349
  np.testing.assert_array_equal(np.sort(labels_a), np.sort(labels_b))
  assert not np.array_equal(labels_a, labels_b)  # Really another order.
  np.testing.assert_allclose(np.sort(lp_a, axis=0), np.sort(lp_b, axis=0),
                             atol=2e-5)
  # The (label, argmax) pairs are the same multiset: equal reports.
  pairs = lambda lp, y: sorted(zip(y.tolist(), lp.argmax(-1).tolist()))
  assert pairs(lp_a, labels_a) == pairs(lp_b, labels_b)
