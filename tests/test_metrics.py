"""Metrics against scikit-learn, and the late-fusion alpha search."""

from __future__ import annotations

import numpy as np
import pytest

from mic_jax.evaluation import metrics

sk_metrics = pytest.importorskip("sklearn.metrics")


def _random_case(seed, n=300, num_classes=9):
  """Labels that skip some classes and predictions that invent others."""
  rng = np.random.default_rng(seed)
  labels = rng.choice([0, 1, 2, 4, 5], size=n)           # 3, 6, 7, 8 absent.
  preds = np.where(rng.random(n) < 0.6, labels,
                   rng.choice([0, 1, 2, 3, 5, 6], size=n))  # 3, 6 invented.
  mask = (rng.random(n) < 0.8).astype(np.float32)
  return labels, preds, mask, num_classes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_mask", [False, True])
def test_report_matches_sklearn(seed, use_mask):
  labels, preds, mask, c = _random_case(seed)
  report = metrics.classification_report(labels, preds, c,
                                         mask=mask if use_mask else None)
  keep = mask > 0 if use_mask else np.ones_like(labels, bool)
  y, p = labels[keep], preds[keep]
  np.testing.assert_allclose(
      report["macro_f1"],
      sk_metrics.f1_score(y, p, average="macro", zero_division=0), atol=1e-12)
  np.testing.assert_allclose(
      report["micro_f1"],
      sk_metrics.f1_score(y, p, average="micro", zero_division=0), atol=1e-12)
  np.testing.assert_allclose(report["accuracy"],
                             sk_metrics.accuracy_score(y, p), atol=1e-12)
  everything = list(range(c))
  np.testing.assert_allclose(
      report["macro_f1_all_classes"],
      sk_metrics.f1_score(y, p, average="macro", labels=everything,
                          zero_division=0), atol=1e-12)
  np.testing.assert_allclose(
      report["macro_precision"],
      sk_metrics.precision_score(y, p, average="macro", zero_division=0),
      atol=1e-12)
  np.testing.assert_allclose(
      report["macro_recall"],
      sk_metrics.recall_score(y, p, average="macro", zero_division=0),
      atol=1e-12)
  prec, rec, f1, support = sk_metrics.precision_recall_fscore_support(
      y, p, labels=everything, zero_division=0)
  np.testing.assert_allclose(report["precision"], prec, atol=1e-12)
  np.testing.assert_allclose(report["recall"], rec, atol=1e-12)
  np.testing.assert_allclose(report["f1"], f1, atol=1e-12)
  np.testing.assert_array_equal(report["support"], support)
  np.testing.assert_array_equal(
      report["confusion_matrix"],
      sk_metrics.confusion_matrix(y, p, labels=everything))
  assert report["num_examples"] == keep.sum()
  assert report["classes_evaluated"] == sorted(set(y) | set(p))


def test_convention_on_a_hand_case():
  # Class 2 is predicted but absent: in the average with F1 0. Class 3 is
  # neither: out of the average.
  labels = np.array([0, 0, 1, 1])
  preds = np.array([0, 2, 1, 1])
  report = metrics.classification_report(labels, preds, num_classes=4)
  np.testing.assert_allclose(report["f1"], [2 / 3, 1.0, 0.0, 0.0])
  np.testing.assert_allclose(report["macro_f1"], (2 / 3 + 1.0 + 0.0) / 3)
  np.testing.assert_allclose(report["macro_f1_all_classes"],
                             (2 / 3 + 1.0) / 4)
  assert report["accuracy"] == 0.75 == report["micro_f1"]


def test_edge_cases_and_errors():
  empty = metrics.classification_report([], [], 3)
  assert empty["num_examples"] == 0 and empty["macro_f1"] == 0.0
  masked_out = metrics.classification_report([1, 2], [1, 2], 3, mask=[0, 0])
  assert masked_out["num_examples"] == 0
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    metrics.classification_report([0, 3], [0, 1], 3)
  with pytest.raises(ValueError, match="differ"):
    metrics.classification_report([0, 1], [0], 3)
  with pytest.raises(ValueError, match="mask"):
    metrics.classification_report([0, 1], [0, 1], 3, mask=[1])


def _probs(rng, n, c, correct, strength):
  """Probabilities whose argmax is ``correct`` where ``strength`` > 0."""
  logits = rng.normal(size=(n, c))
  logits[np.arange(n), correct] += strength
  e = np.exp(logits - logits.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def test_choose_alpha_picks_the_known_best():
  """Text is right on half the classes, the image on the other half.

  Constructed so only a mix around 0.5 gets everything right: the text
  model is confidently right (0.7) on classes 0-1 and mildly wrong (0.4 vs
  0.6 on a wrong class) on 2-3; the image model the reverse. At alpha = 0.5
  the correct class always has 0.55 against at most 0.45.
  """
  n, c = 200, 4
  labels = np.arange(n) % c
  wrong = (labels + 1) % c

  def model(strong_classes):
    p = np.zeros((n, c))
    strong = np.isin(labels, strong_classes)
    p[strong, labels[strong]] = 0.7
    p[strong, wrong[strong]] = 0.3
    p[~strong, labels[~strong]] = 0.4
    p[~strong, wrong[~strong]] = 0.6
    return p

  p_text, p_image = model([0, 1]), model([2, 3])
  alpha, f1, table = metrics.choose_alpha(p_text, p_image, labels)
  assert f1 == 1.0
  scores = dict(table)
  assert scores[0.0] < 1.0 and scores[1.0] < 1.0
  perfect = [a for a, s in table if s == 1.0]
  assert perfect and 0.5 in [round(a, 10) for a in perfect]
  assert abs(alpha - 0.5) < 1e-9  # Ties go to the most balanced mix.
  assert [round(a, 2) for a, _ in table] == [round(a, 2) for a in
                                             np.linspace(0, 1, 21)]


def test_choose_alpha_one_sided_and_masked():
  rng = np.random.default_rng(0)
  n, c = 300, 5
  labels = rng.integers(0, c, n)
  p_text = _probs(rng, n, c, labels, 4.0)               # Good.
  p_image = _probs(rng, n, c, rng.integers(0, c, n), 4.0)  # Noise.
  alpha, f1, table = metrics.choose_alpha(p_text, p_image, labels,
                                          grid=[0.0, 0.25, 0.5, 0.75, 1.0])
  assert alpha >= 0.75 and f1 == max(s for _, s in table)
  assert dict(table)[0.0] < 0.5
  # Masked rows are ignored: garbage rows with mask 0 change nothing.
  mask = np.ones(n + 50)
  mask[n:] = 0
  pad = lambda x, fill: np.concatenate([x, fill])
  alpha2, f1_2, _ = metrics.choose_alpha(
      pad(p_text, p_image[:50]), pad(p_image, p_text[:50]),
      pad(labels, (labels[:50] + 1) % c), mask=mask,
      grid=[0.0, 0.25, 0.5, 0.75, 1.0])
  assert (alpha2, f1_2) == (alpha, f1)
  with pytest.raises(ValueError, match="grid"):
    metrics.choose_alpha(p_text, p_image, labels, grid=[1.5])
  with pytest.raises(ValueError, match=r"\[N, C\]"):
    metrics.choose_alpha(p_text, p_image[:, :2], labels)
