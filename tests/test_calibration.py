"""Temperature scaling, ECE, top-5, macro-F1 by class frequency, focal loss."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mic_jax.evaluation import calibration, metrics
from mic_jax.train import steps

def _sampled(seed, n=600, num_classes=12, sharpen=1.0):
  """Logits and labels drawn from softmax(logits): calibrated at T = 1.

  ``sharpen`` multiplies the logits after the labels were drawn: a model
  that is over-confident by exactly that factor (best T = sharpen).
  """
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, num_classes)) * 2.5
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  labels = np.array([rng.choice(num_classes, p=row) for row in p])
  return logits * sharpen, labels


@pytest.mark.parametrize("seed,sharpen", [(0, 1.0), (1, 3.0), (2, 0.4),
                                          (3, 8.0)])
def test_temperature_matches_scipy(seed, sharpen):
  # Only this test needs scipy (the test extra declares it; calibration
  # itself does not use it), so a missing scipy fails here, nowhere else.
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  logits, labels = _sampled(seed, sharpen=sharpen)
  got = calibration.fit_temperature(logits, labels)
  ref = optimize.minimize_scalar(
      lambda log_t: calibration.nll(logits, labels, np.exp(log_t)),
      bounds=(np.log(calibration.T_MIN), np.log(calibration.T_MAX)),
      method="bounded", options={"xatol": 1e-10})
  assert abs(got - np.exp(ref.x)) < 1e-3
  # A sharpened model is over-confident by about its factor.
  assert got == pytest.approx(sharpen, rel=0.25)


def test_log_probabilities_fit_the_same_temperature_as_logits():
  logits, labels = _sampled(4, sharpen=2.0)
  probs = calibration.scale(logits, 1.0)
  t_logits = calibration.fit_temperature(logits, labels)
  t_probs = calibration.fit_temperature(calibration.log_probs(probs), labels)
  assert abs(t_logits - t_probs) < 1e-5
  np.testing.assert_allclose(calibration.scale(logits, 1.7),
                             calibration.scale(np.log(probs), 1.7), atol=1e-12)


def test_log_of_zero_probability_is_guarded():
  probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
  labels = np.array([0, 2, 1])   # One confident mistake on a p = 0 class.
  logp = calibration.log_probs(probs)
  assert np.all(np.isfinite(logp))
  t = calibration.fit_temperature(logp, labels)
  assert np.isfinite(t) and t > 1


def test_over_confident_model_gets_lower_ece_and_nll():
  logits, labels = _sampled(5, sharpen=4.0)
  t = calibration.fit_temperature(logits, labels)
  s = calibration.summary(logits, labels, t)
  assert s["temperature"] == t > 2
  assert s["nll_after"] < s["nll_before"]
  assert s["ece_after"] < s["ece_before"] / 2
  assert s["ece_before"] > 0.1


@pytest.mark.parametrize("t", [0.05, 0.5, 1.0, 3.0, 50.0])
def test_temperature_never_changes_the_argmax(t):
  logits, _ = _sampled(6, n=2000)
  np.testing.assert_array_equal(calibration.scale(logits, t).argmax(-1),
                                logits.argmax(-1))
  # ... and divides: softmax(logits / t), by hand for logits (0, log 4).
  two = np.array([[0.0, np.log(4.0)]])
  p = 4.0 ** (1 / t) / (1 + 4.0 ** (1 / t))
  np.testing.assert_allclose(calibration.scale(two, t), [[1 - p, p]],
                             rtol=1e-12)


def test_ece_by_hand():
  # Confidences 0.9 (right), 0.8 (wrong), 0.55 (right), 0.34 (wrong, class 2).
  probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1],
                    [0.45, 0.55, 0.0], [0.33, 0.33, 0.34]])
  labels = np.array([0, 1, 1, 0])
  # 15 bins of width 1/15: 0.9 -> bin 13 (0.8667, 0.9333], 0.8 -> bin 11
  # (0.7333, 0.8], 0.55 -> bin 8 (0.5333, 0.6], 0.34 -> bin 5 (0.3333, 0.4].
  # Each bin holds one example: ECE = mean |correct - confidence|.
  want = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.55) + abs(0 - 0.34)) / 4
  assert calibration.ece(probs, labels) == pytest.approx(want, abs=1e-12)
  r = calibration.reliability(probs, labels)
  assert np.flatnonzero(r["count"]).tolist() == [5, 8, 11, 13]
  # Two examples in bin 10 (0.6667, 0.7333], one right and one wrong:
  # |mean accuracy - mean confidence| weighted 2/3.
  probs = np.array([[0.68, 0.32], [0.72, 0.28], [0.95, 0.05]])
  labels = np.array([0, 1, 0])
  want = 2 / 3 * abs(0.5 - 0.70) + 1 / 3 * abs(1 - 0.95)
  assert calibration.ece(probs, labels) == pytest.approx(want, abs=1e-12)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="labels must be in"):
    calibration.fit_temperature(np.zeros((2, 3)), [0, 3])
  with pytest.raises(ValueError, match="no examples"):
    calibration.ece(np.zeros((0, 3)), [])
  with pytest.raises(ValueError, match="non-finite"):
    calibration.nll(np.array([[0.0, np.nan]]), [0])


def test_top5_accuracy_matches_sklearn():
  sk_metrics = pytest.importorskip("sklearn.metrics")
  logits, labels = _sampled(7, num_classes=9)
  probs = calibration.scale(logits, 1.0)
  for k in (1, 3, 5):
    assert metrics.top_k_accuracy(probs, labels, k) == pytest.approx(
        sk_metrics.top_k_accuracy_score(labels, probs, k=k,
                                        labels=np.arange(9)))
  assert metrics.top_k_accuracy(probs, labels, 9) == 1.0


def test_frequency_thirds_and_their_macro_f1():
  # 8 classes; training counts make the order 3, 0, 5 | 1, 6, 7 | 2, 4
  # (ties 6 and 7 by class id; 8 = 3 + 3 + 2, the remainder goes to the head
  # and the middle).
  counts = np.array([50, 20, 5, 90, 0, 40, 20, 20])
  groups = metrics.frequency_groups(counts)
  assert [g.tolist() for g in groups.values()] == [[3, 0, 5], [1, 6, 7],
                                                   [2, 4]]
  labels = np.array([3, 3, 0, 0, 5, 1, 6, 6, 2, 2])
  preds = np.array([3, 0, 0, 0, 5, 6, 6, 1, 2, 4])
  report = metrics.classification_report(labels, preds, 8)
  f1 = report["f1"]
  got = metrics.macro_f1_by_frequency(report, counts)
  assert got["head"] == pytest.approx(np.mean(f1[[3, 0, 5]]))
  # Class 7 is neither a label nor predicted: out of the middle's average.
  assert got["middle"] == pytest.approx(np.mean(f1[[1, 6]]))
  # Class 4 has no label but is predicted: in the tail with F1 0.
  assert got["tail"] == pytest.approx(np.mean([f1[2], 0.0]))
  assert got["tail"] == pytest.approx(np.mean([2 / 3, 0.0]))
  nothing = metrics.classification_report([0], [0], 8)
  assert metrics.macro_f1_by_frequency(nothing, counts)["tail"] is None
  with pytest.raises(ValueError, match="train_counts has 3 classes"):
    metrics.macro_f1_by_frequency(report, counts[:3])


def _focal_numpy(logits, labels, weights, smoothing, gamma):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  c = logits.shape[-1]
  q = np.eye(c)[labels] * (1 - smoothing) + smoothing / c
  per_example = -(q * (1 - np.exp(logp)) ** gamma * logp).sum(-1)
  return float((per_example * weights).sum())


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_loss_is_its_formula(gamma, smoothing):
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(16, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, size=16)
  weights = rng.random(16).astype(np.float32) * (rng.random(16) > 0.2)
  got = steps.weighted_loss(jnp.asarray(logits), jnp.asarray(labels),
                            jnp.asarray(weights), smoothing, "focal", gamma)
  want = _focal_numpy(logits.astype(np.float64), labels, weights, smoothing,
                      gamma)
  assert float(got) == pytest.approx(want, rel=1e-5)
  if gamma == 0:
    xent = steps.weighted_loss(jnp.asarray(logits), jnp.asarray(labels),
                               jnp.asarray(weights), smoothing, "xent")
    assert float(got) == pytest.approx(float(xent), rel=1e-6)
  else:
    assert float(got) < float(steps.weighted_xent(
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights),
        smoothing))


def test_focal_gradient_is_finite_when_a_probability_is_one():
  import jax  # pylint: disable=g-import-not-at-top
  logits = jnp.array([[200.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
  grad = jax.grad(lambda z: steps.weighted_loss(
      z, jnp.array([0, 2]), jnp.ones(2), 0.0, "focal", 0.5))(logits)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_unknown_loss_kind_and_bad_gamma_raise():
  with pytest.raises(ValueError, match="config.loss.kind"):
    steps.weighted_loss(jnp.zeros((1, 2)), jnp.zeros(1, jnp.int32),
                        jnp.ones(1), 0.0, "hinge")
  with pytest.raises(ValueError, match="config.loss.kind"):
    steps.make_train_step(None, None, None, seed=0, grad_accum_steps=1,
                          label_smoothing=0.0,
                          loss_class_weights=np.ones(2), loss_kind="hinge")
  with pytest.raises(ValueError, match="focal_gamma"):
    steps.make_train_step(None, None, None, seed=0, grad_accum_steps=1,
                          label_smoothing=0.0,
                          loss_class_weights=np.ones(2), loss_kind="focal",
                          focal_gamma=-1.0)


def test_calibration_file_round_trips_through_its_reader():
  """What training writes to calibration.json is what the export reads."""
  record = calibration.calibration_record(
      1.7, members={"text": 0.9, "image": 2.5})
  assert calibration.parse_record(record, "c.json", late=True) == {
      "temperature": 1.7, "fitted_on": "validation",
      "members": {"image": 2.5, "text": 0.9}}
  single = calibration.parse_record(calibration.calibration_record(0.8),
                                    "c.json", late=False)
  assert single == {"temperature": 0.8, "fitted_on": "validation"}
  # No file: every temperature is 1.
  assert calibration.parse_record(None, "c.json", late=True)["members"] == {
      "image": 1.0, "text": 1.0}


@pytest.mark.parametrize("record, late, match", [
    ({"temperature": 0}, False, "c.json: temperature: .*positive finite"),
    ({"temperature": float("nan")}, False, "positive finite"),
    ({"temperature": True}, False, "positive finite"),
    ([1.0], False, "expected .*temperature"),
    ({"fitted_on": "validation"}, False, "expected .*temperature"),
    ({"temperature": 1.0, "members": {"text": 1.0}}, True,
     "members.* must be"),
    ({"temperature": 1.0, "members": {"text": 1.0, "image": -2}}, True,
     "members.image: a temperature must be"),
])
def test_a_bad_calibration_record_names_the_file_and_field(record, late,
                                                           match):
  with pytest.raises(ValueError, match=match):
    calibration.parse_record(record, "c.json", late=late)
