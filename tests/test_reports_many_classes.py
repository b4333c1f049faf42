"""Reports stay readable at 1,000 classes (issue 36 item 2).

A synthetic prediction set (no training): 1,000 classes with a long-tailed
frequency, about 80% right, and three planted confusions far larger than
the rest. The confusion picture must then be the top-confusions bars (a
figure of bounded size whose first bars are the planted pairs), not a
1,000 x 1,000 matrix; the per-class CSV worst F1 first; the frequency-band
macro-F1 as before; and a small label set still gets its matrix.
"""

import csv
import json

import numpy as np
from PIL import Image
import pytest

from mic_jax.evaluation import evaluation, metrics, plots

C = 1000
PLANTED = [(3, 7, 60), (10, 11, 50), (500, 2, 40)]  # true, predicted, count


@pytest.fixture(scope="module")
def synthetic():
  rng = np.random.default_rng(0)
  weights = 1.0 / np.arange(1, C + 1)  # Zipf: a head and a long tail.
  labels = rng.choice(C, size=30_000, p=weights / weights.sum())
  preds = labels.copy()
  wrong = rng.random(labels.size) < 0.2
  preds[wrong] = rng.integers(0, C, wrong.sum())
  extra_true, extra_pred = [], []
  for true, predicted, count in PLANTED:
    extra_true += [true] * count
    extra_pred += [predicted] * count
  labels = np.concatenate([labels, extra_true])
  preds = np.concatenate([preds, extra_pred])
  names = [f"root > department {i // 100} > category {i}" for i in range(C)]
  train_counts = np.bincount(labels, minlength=C)
  return labels, preds, names, train_counts


def test_thousand_class_reports_are_readable(synthetic, tmp_path):
  labels, preds, names, train_counts = synthetic
  report = metrics.classification_report(labels, preds, C)
  evaluation.write_split_report(str(tmp_path), "test", report, names)

  # Not a matrix: bars of the top confusions, a picture of bounded size.
  with Image.open(tmp_path / "confusion_test.png") as image:
    width, height = image.size
  assert width < 1500 and height < 1500, (width, height)
  with open(tmp_path / "top_confusions_test.csv") as f:
    top = list(csv.DictReader(f))
  assert len(top) == 100
  assert [(int(r["true_id"]), int(r["predicted_id"])) for r in top[:3]] == [
      (t, p) for t, p, _ in PLANTED]
  assert top[0]["true"] == names[3] and top[0]["predicted"] == names[7]
  counts = [int(r["count"]) for r in top]
  assert counts == sorted(counts, reverse=True) and counts[0] >= 60
  assert all(r["true_id"] != r["predicted_id"] for r in top)

  # Every class once, worst F1 first, ties most frequent first.
  with open(tmp_path / "per_class_test.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted(int(r["label_id"]) for r in rows) == list(range(C))
  evaluated = set(np.asarray(report["classes_evaluated"]).tolist())
  scored = [r for r in rows if int(r["label_id"]) in evaluated]
  assert rows[:len(scored)] == scored  # Classes never seen go last.
  keys = [(float(r["f1"]), -int(r["support"])) for r in scored]
  assert keys == sorted(keys)
  f1 = np.asarray(report["f1"])
  assert float(rows[0]["f1"]) == pytest.approx(f1[sorted(evaluated)].min(),
                                               abs=1e-6)

  # The per-class F1 picture: the worst and best 30 bars, not 1,000.
  with Image.open(tmp_path / "per_class_f1_test.png") as image:
    assert image.size[1] < 1500, image.size

  # Frequency bands as before: three thirds of 1,000 classes.
  bands = metrics.macro_f1_by_frequency(report, train_counts)
  assert set(bands) == {"head", "middle", "tail"}
  assert bands["head"] > bands["tail"]
  json.dumps(bands)


def test_per_class_f1_plot_shows_worst_and_best(monkeypatch, synthetic):
  labels, preds, names, _ = synthetic
  report = metrics.classification_report(labels, preds, C)
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
  plots.per_class_f1("unused.png", report, names, "test")
  (fig,) = figures
  (ax,) = fig.axes
  assert len(ax.patches) == 2 * plots.F1_BARS_EACH_END
  assert "worst and best" in ax.get_title()
  plots.plt.close(fig)


def test_small_label_sets_keep_the_matrix(monkeypatch):
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
  n = plots.MATRIX_MAX_CLASSES
  plots.confusion_matrix("unused.png", np.eye(n, dtype=int) * 3,
                         [str(i) for i in range(n)], "small")
  plots.confusion_matrix("unused.png", np.eye(n + 1, dtype=int) * 3,
                         [str(i) for i in range(n + 1)], "large")
  small, large = figures
  assert small.axes[0].images  # The matrix (imshow).
  assert not large.axes[0].images and "no confusions" in [
      t.get_text() for t in large.axes[0].texts]
  for fig in figures:
    plots.plt.close(fig)


def test_top_confusions_order_and_ties():
  confusion = np.array([[5, 2, 2], [4, 1, 0], [0, 2, 9]])
  rows = metrics.top_confusions(confusion, 3)
  # (1 -> 0) 4; then the three 2s: fraction 2/9 of class 0 twice, 2/11
  # of class 2; ties by class ids.
  assert [(r["true"], r["predicted"], r["count"]) for r in rows] == [
      (1, 0, 4), (0, 1, 2), (0, 2, 2)]
  assert rows[0]["fraction"] == pytest.approx(0.8)
  assert metrics.top_confusions(np.eye(4, dtype=int), 5) == []
