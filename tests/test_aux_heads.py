"""Per-modality auxiliary heads (``model.aux_loss_weight``).

A fused model may carry a title-only and a photo-only classifier on its
towers' vectors, trained with their own losses so that neither tower idles
while the other fits the data. They must change nothing else: the fused
logits are those of the same model without them, the loss is exactly the
fused loss plus the weighted per-modality losses (the photo's only over
products that have a photo), and the exported model does not carry them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import demo_configs
from mic_jax import export
from mic_jax import trainer
from mic_jax.models import classifier
from mic_jax.train import checkpointing, steps

from test_classifier import _batch, _config, _init, C

WEIGHT = 0.3


def _models(kind="cross_modal"):
  plain = _config(kind)
  with_aux = _config(kind)
  with with_aux.unlocked():
    with_aux.model.aux_loss_weight = WEIGHT
  return classifier.build_model(plain), classifier.build_model(with_aux)


@pytest.mark.parametrize("kind", ["cross_modal", "early"])
def test_aux_heads_add_parameters_and_change_no_fused_logit(kind):
  plain, with_aux = _models(kind)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  params = nn.unbox(_init(with_aux, batch)["params"])
  assert set(classifier.AUX_HEADS) <= set(params)
  logits, aux = with_aux.apply({"params": params}, batch)
  assert aux["text_logits"].shape == aux["image_logits"].shape == (len(
      batch["label"]), C)
  shared = {k: v for k, v in params.items() if k not in classifier.AUX_HEADS}
  want, _ = plain.apply({"params": shared}, batch)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
  # Each head reads its own tower's vector.
  text_head = params["aux_text_head"]
  np.testing.assert_allclose(
      np.asarray(aux["text_logits"]),
      np.asarray(aux["text_cls"] @ text_head["output"]["kernel"]
                 + text_head["output"]["bias"]), rtol=1e-5, atol=1e-5)


def test_loss_is_the_fused_loss_plus_the_weighted_modality_losses():
  _, model = _models()
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  params = nn.unbox(_init(model, batch)["params"])
  tx = optax.sgd(0.0)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
  step = steps.make_train_step(
      model, tx, optax.constant_schedule(0.0), seed=0, grad_accum_steps=1,
      label_smoothing=0.0, loss_class_weights=np.ones(C, np.float32),
      aux_loss_weight=WEIGHT)
  _, metrics = step(state, batch)
  # By hand, with the dropout key the step uses (the demo's rates are not 0).
  key = jax.random.fold_in(jax.random.key(0), 0)
  logits, aux = model.apply({"params": params}, batch, train=True,
                            rngs={"dropout": key})

  def xent(z, keep):
    logp = jax.nn.log_softmax(z)
    return -np.sum(np.take_along_axis(np.asarray(logp), np.asarray(
        batch["label"])[:, None], axis=1)[:, 0] * keep)

  ones = np.ones(len(batch["label"]))
  photo = (np.asarray(batch["image_present"]) > 0).astype(float)
  assert 0 < photo.sum() < len(photo)  # Both kinds of product are present.
  want = (xent(logits, ones) + WEIGHT * xent(aux["text_logits"], ones)
          + WEIGHT * xent(aux["image_logits"], photo)) / len(ones)
  np.testing.assert_allclose(float(metrics["train/loss"]), want, rtol=1e-5)
  # And without the photo mask it would differ: the check can fail.
  wrong = want + WEIGHT * xent(aux["image_logits"], 1 - photo) / len(ones)
  assert abs(float(metrics["train/loss"]) - wrong) > 1e-4


def test_aux_heads_need_a_fused_model():
  model = _models("text_only")[1]
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  with pytest.raises(ValueError, match="fused model"):
    _init(model, batch)
  with pytest.raises(ValueError, match="aux_loss_weight"):
    steps.make_train_step(
        model, optax.sgd(0.0), optax.constant_schedule(0.0), seed=0,
        grad_accum_steps=1, label_smoothing=0.0,
        loss_class_weights=np.ones(C, np.float32), aux_loss_weight=-1.0)


def test_trained_run_exports_without_the_aux_heads(tmp_path):
  workdir = tmp_path / "run"
  config = demo_configs.short_demo("cross_modal", total_steps=3, log_every=1,
                                   eval_every=3,
                                   **{"model.aux_loss_weight": WEIGHT})
  trainer.train_and_evaluate(config, str(workdir))
  model, params, _, _ = export.restore(workdir)
  assert not model.aux_heads
  assert not set(classifier.AUX_HEADS) & set(params)
  # The stripped model scores as the trained one does.
  run = trainer.build_run(config, str(workdir))
  assert run.model.aux_heads
  full = checkpointing.restore_params_from(str(workdir / "best"),
                                           run.abstract_state.params)
  assert set(classifier.AUX_HEADS) <= set(full)
  batch = dict(classifier.example_batch(run.config, batch_size=2))
  batch["input_ids"] = jnp.asarray(np.random.default_rng(0).integers(
      1, 20, batch["input_ids"].shape), jnp.int32)
  got, _ = model.apply({"params": params}, batch)
  want, _ = run.model.apply({"params": full}, batch)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-6)
