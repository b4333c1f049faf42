"""MultimodalClassifier: every kind builds from the real config schema, has
the right towers, trains on a tiny batch, and runs in bf16 with f32 params.

Shapes and names are checked with ``jax.eval_shape`` (nothing compiled);
only the training and bf16 checks run real computations, on tiny towers.
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from mic_jax.models import classifier

C, B, L, S = 5, 8, 12, 32
# One BERT layer (the demo preset's "tiny" has two) keeps compiles short.
TINY_BERT = dict(vocab_size=256, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=32)


def _config(kind, image="vit", **fusion):
  config = common.make_config(kind, f"demo,image={image}")
  with config.unlocked():
    config.num_classes = C
    config.text.max_length = L
    config.image.size = S
    config.text.bert = TINY_BERT
    for key, value in fusion.items():
      setattr(config.fusion, key, value)
  return config


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, L + 1, B)
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  labels = np.arange(B) % C
  return {
      "input_ids": (rng.integers(5, 200, (B, L)) * mask).astype(np.int32),
      "attention_mask": mask,
      "token_type_ids": np.zeros((B, L), np.int32),
      "image": rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32),
      "image_present": np.array([1, 1, 0, 1, 1, 0, 1, 1], np.int32),
      "label": labels.astype(np.int32),
      "mask": np.ones(B, np.float32),
  }


def _init(model, batch):
  return model.init({"params": jax.random.key(0),
                     "dropout": jax.random.key(1)}, batch)


def _init_jit(model, batch):
  return jax.jit(lambda b: _init(model, b))(batch)


EXPECTED = {
    "text_only": {"txt", "head"},
    "image_only": {"img", "head"},
    "early": {"txt", "img", "fusion", "head"},
    "cross_modal": {"txt", "img", "fusion", "head"},
}


@pytest.mark.parametrize("image", ["vit", "bit"])
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_towers_names_and_shapes(kind, image):
  model = classifier.build_model(_config(kind, image))
  batch = _batch()
  variables = jax.eval_shape(lambda: _init(model, batch))
  params = nn.meta.unbox(variables["params"])
  assert set(params) == EXPECTED[kind] == set(classifier.towers_of(kind))
  logits, aux = jax.eval_shape(lambda v: model.apply(v, batch), variables)
  assert logits.shape == (B, C) and logits.dtype == jnp.float32
  assert aux["features"].shape[0] == B
  assert ("gate_mean" in aux) == (kind == "cross_modal")
  paths = ["/".join(str(k.key) for k in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  patterns = classifier.tower_patterns(kind)
  assert set(patterns) == EXPECTED[kind]
  for path in paths:  # Every parameter belongs to exactly one tower.
    assert sum(bool(re.fullmatch(p, path)) for p in patterns.values()) == 1
  # Weights carry logical axis names for sharding.
  boxed = jax.tree.leaves(variables["params"],
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in boxed)


def test_cross_modal_head_is_eq4_and_fusion_options():
  model = classifier.build_model(_config("cross_modal", heads=2, gate=False,
                                         pool="mean"))
  assert (model.fusion_heads, model.fusion_gate, model.fusion_pool) == (
      2, False, "mean")
  params = jax.eval_shape(lambda: _init(model, _batch()))["params"]
  assert set(params["head"]["output"]) == {"kernel"}  # W_3, no bias.
  assert "gate_text" not in params["fusion"]
  early = classifier.build_model(_config("early"))
  params = jax.eval_shape(lambda: _init(early, _batch()))["params"]
  assert set(params["head"]["output"]) == {"kernel", "bias"}
  dt = params["txt"]["pooler"]["dense"]["kernel"].value.shape[-1]
  dv = params["img"]["cls"].value.shape[-1]
  assert params["fusion"]["hidden"]["kernel"].value.shape == (
      dt + dv + 1, 64)


def test_text_repr_is_the_pooler_the_cls_state_or_the_masked_mean():
  batch = _batch(3)
  config = _config("text_only")
  model = classifier.build_model(config)
  params = _init(model, batch)["params"]
  seq, pooled = model.txt.apply({"params": params["txt"]},
                                batch["input_ids"], batch["attention_mask"],
                                batch["token_type_ids"])
  seq, mask = np.asarray(seq), batch["attention_mask"]
  expected = {
      "pooler": np.asarray(pooled),
      "cls": seq[:, 0],
      # The mean over real tokens only: padding must not dilute it.
      "mean": np.stack([seq[b, :mask[b].sum()].mean(0) for b in range(B)]),
  }
  for name, want in expected.items():
    with config.unlocked():
      config.model.text_repr = name
    model = classifier.build_model(config)
    _, aux = model.apply({"params": params}, batch)
    np.testing.assert_allclose(aux["features"], want, atol=1e-5, err_msg=name)
  with config.unlocked():
    config.model.text_repr = "max"
  with pytest.raises(ValueError, match="text_repr"):
    _init(classifier.build_model(config), batch)


def test_errors():
  with pytest.raises(ValueError, match="late fusion"):
    classifier.build_model(_config("late"))
  config = _config("text_only")
  with config.unlocked():
    config.num_classes = -1
  with pytest.raises(ValueError, match="num_classes"):
    classifier.build_model(config)
  with pytest.raises(ValueError, match="dtype"):
    classifier.compute_dtype("float8")


def test_text_config_from_checkpoint_dir(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "bert", "vocab_size": 99, "hidden_size": 24,
       "num_hidden_layers": 1, "num_attention_heads": 3,
       "intermediate_size": 48, "architectures": ["BertModel"]}))
  config = _config("text_only")
  with config.unlocked():
    config.text.bert = None  # An explicit architecture would win.
    config.text.checkpoint = str(tmp_path)
    config.text.dropout = 0.0
  from mic_jax.checkpoints import architecture  # pylint: disable=g-import-not-at-top
  bert = classifier.text_config(architecture.resolve(config))
  assert (bert.vocab_size, bert.hidden_size, bert.num_attention_heads) == (
      99, 24, 3)
  assert bert.hidden_dropout_prob == bert.attention_probs_dropout_prob == 0.0


def _train(model, batch, steps, lr):
  variables = _init_jit(model, batch)
  params = nn.meta.unbox(variables["params"])
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  def loss_fn(params, key):
    logits, _ = model.apply({"params": params}, batch, train=True,
                            rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]).mean()

  @jax.jit
  def step(params, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  losses = []
  for i in range(steps):
    params, opt_state, loss, grads = step(params, opt_state,
                                          jax.random.key(i))
    losses.append(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  return losses, params


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_a_few_steps_fit_a_tiny_batch(kind):
  """Honest check: the loss starts near log C and must clearly fall.

  The training loss (dropout on) of the last step is checked, on the batch
  being trained on: this tests that gradients reach the model and move it
  the right way, not generalisation.
  """
  model = classifier.build_model(_config(kind))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  # The untrained model, without dropout (its draw moved this by several
  # percent): near-uniform predictions. cross_modal's summed pooling starts
  # furthest from uniform (1.75 against log 5 = 1.61); a head initialised
  # at unit scale would start several times higher.
  logits, _ = model.apply(_init(model, batch), batch)
  start = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["label"]).mean()
  np.testing.assert_allclose(float(start), np.log(C), rtol=0.1)
  losses, _ = _train(model, batch, steps=10, lr=1e-2)
  assert losses[-1] < 0.5 * np.log(C), (kind, losses)


def test_bf16_compute_with_f32_params_and_no_image_invariance():
  config = _config("cross_modal", heads=2)
  with config.unlocked():
    config.dtype = "bfloat16"
  model = classifier.build_model(config)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  variables = _init_jit(model, batch)
  params = nn.meta.unbox(variables["params"])
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  apply = jax.jit(lambda p, b: model.apply({"params": p}, b))
  logits, aux = apply(params, batch)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert aux["features"].dtype == jnp.bfloat16
  assert 0.0 < float(aux["gate_mean"]) < 1.0
  # A product without a photo: its (placeholder) image changes nothing.
  other = dict(batch, image=batch["image"].at[2].set(0.9).at[5].set(-0.3))
  logits2, _ = apply(params, other)
  absent = np.asarray(batch["image_present"]) == 0
  np.testing.assert_array_equal(np.asarray(logits)[absent],
                                np.asarray(logits2)[absent])
  # bf16 is close to the same model computed in float32.
  f32 = classifier.build_model(_config("cross_modal", heads=2))
  ref, _ = jax.jit(lambda p, b: f32.apply({"params": p}, b))(params, batch)
  scale = np.abs(np.asarray(ref)).max()
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref),
                             atol=0.1 * scale + 1e-3)
