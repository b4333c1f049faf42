"""Pictures of a run: confusion matrix, per-class F1, training curves.

A 141-class confusion matrix or a per-class F1 table is read faster as a
picture than as numbers. Rows of the confusion matrix are normalised by
class support so rare classes are as visible as frequent ones.

Past :data:`MATRIX_MAX_CLASSES` classes a matrix is a grey square (a
thousand classes: a million cells in a few hundred pixels), so
:func:`confusion_matrix` draws the largest confusions as labelled bars
instead, and :func:`per_class_f1` the worst and best classes only; the
CSVs (``per_class_*``, ``top_confusions_*``) keep every number.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mic_jax.evaluation import metrics  # noqa: E402


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  tmp = f"{path}.tmp"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(buf.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)


MATRIX_MAX_CLASSES = 50   # Above: the top confusions, not the matrix.
TOP_CONFUSIONS = 30       # Bars of that figure.
F1_BARS_EACH_END = 30     # Above twice this many classes: worst and best.


def confusion_matrix(path: str, matrix: np.ndarray, labels: Sequence[str],
                     title: str) -> None:
  """Row-normalised confusion matrix, class names shown; past
  :data:`MATRIX_MAX_CLASSES` classes the top confusions instead."""
  if len(labels) > MATRIX_MAX_CLASSES:
    top_confusions(path, matrix, labels, title)
    return
  matrix = np.asarray(matrix, np.float64)
  rows = matrix.sum(axis=1, keepdims=True)
  norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
  n = len(labels)
  size = min(max(6.0, n * 0.18), 22.0)
  fig, ax = plt.subplots(figsize=(size + 1.5, size))
  im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of row")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  if n <= 60:
    ax.set_xticks(range(n), labels, rotation=90, fontsize=max(4, 9 - n // 10))
    ax.set_yticks(range(n), labels, fontsize=max(4, 9 - n // 10))
  if n <= 15:
    for i in range(n):
      for j in range(n):
        if matrix[i, j]:
          ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                  fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
  _save(fig, path)


def top_confusions(path: str, matrix: np.ndarray, labels: Sequence[str],
                   title: str, k: int = TOP_CONFUSIONS) -> None:
  """Bars of the ``k`` largest off-diagonal cells, "true -> predicted",
  each with its share of the true class's examples."""
  rows = metrics.top_confusions(matrix, k)
  fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * len(rows) + 1.2)))
  if rows:
    ax.barh(range(len(rows)), [r["count"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [
        f"{_short(labels[r['true']])} -> {_short(labels[r['predicted']])}"
        for r in rows], fontsize=8)
    for i, r in enumerate(rows):
      ax.text(r["count"], i, f" {r['count']} ({100 * r['fraction']:.0f}%)",
              va="center", fontsize=7)
    ax.invert_yaxis()  # Largest on top.
  else:
    ax.text(0.5, 0.5, "no confusions", ha="center", va="center",
            transform=ax.transAxes)
  ax.set_xlabel("examples (share of the true class)")
  ax.set_title(f"{title}\n{len(rows)} largest confusions of {len(labels)} "
               "classes (true -> predicted)", fontsize=10)
  _save(fig, path)


def _short(name: str, width: int = 40) -> str:
  """A label cut to ``width`` characters: long category paths would
  otherwise take the whole figure's width."""
  return name if len(name) <= width else "..." + name[-(width - 3):]


def _legend_outside(ax) -> None:
  """The legend right of the axes: bars reach every corner of the plot."""
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
            fontsize=8)


def per_class_f1(path: str, report: Mapping[str, Any], labels: Sequence[str],
                 title: str) -> None:
  """Horizontal bars of F1 per class, sorted, with support in the label;
  past twice :data:`F1_BARS_EACH_END` classes only the worst and the best
  that many (the CSV has all of them)."""
  f1 = np.asarray(report["f1"], np.float64)
  support = np.asarray(report["support"])
  order = [i for i in np.argsort(f1, kind="stable") if support[i] > 0]
  shown = len(order)
  if shown > 2 * F1_BARS_EACH_END:
    order = order[:F1_BARS_EACH_END] + order[-F1_BARS_EACH_END:]
    title = (f"{title}: the {F1_BARS_EACH_END} worst and best of {shown} "
             "classes")
  height = min(max(3.0, 0.16 * len(order) + 1), 30.0)
  fig, ax = plt.subplots(figsize=(8, height))
  ax.barh(range(len(order)), f1[order], color="tab:blue")
  ax.set_yticks(range(len(order)),
                [f"{_short(labels[i])} (n={support[i]})" for i in order],
                fontsize=max(4, 9 - len(order) // 25))
  ax.set_xlim(0, 1)
  ax.axvline(report["macro_f1"], color="tab:red", linestyle="--",
             label=f"macro-F1 {report['macro_f1']:.3f}")
  ax.set_xlabel("F1")
  ax.set_title(title)
  _legend_outside(ax)
  _save(fig, path)


def training_curves(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  """Train loss, learning rate and validation macro-F1 against step."""
  def series(key):
    pts = [(r["step"], r[key]) for r in records if key in r]
    return (zip(*pts) if pts else ((), ()))

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, key, name in zip(
      axes, ("train/loss", "train/learning_rate", "validation/macro_f1"),
      ("train loss", "learning rate", "validation macro-F1")):
    xs, ys = series(key)
    ax.plot(list(xs), list(ys), marker="o" if key.startswith("val") else None,
            markersize=3)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  _save(fig, path)


def reliability_diagram(path: str, before: Mapping[str, Any],
                        after: Mapping[str, Any], title: str) -> None:
  """Accuracy against confidence per bin, before and after calibration.

  ``before`` / ``after`` are :func:`mic_jax.evaluation.calibration.reliability`
  results; a perfectly calibrated model lies on the diagonal. Empty bins are
  not drawn; the lower panel shows how many examples each bin holds.
  """
  edges = np.asarray(before["edges"], np.float64)
  centers = (edges[:-1] + edges[1:]) / 2
  width = edges[1] - edges[0]
  fig, (ax, hist) = plt.subplots(
      2, 1, figsize=(6, 7), sharex=True,
      gridspec_kw={"height_ratios": [3, 1]})
  ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect")
  for r, name, color in ((before, "before", "tab:red"),
                         (after, "after", "tab:blue")):
    count = np.asarray(r["count"])
    full = count > 0
    ax.plot(np.asarray(r["confidence"])[full],
            np.asarray(r["accuracy"])[full], marker="o", color=color,
            label=f"{name} (ECE {r.get('ece', float('nan')):.3f})")
    hist.bar(centers + (-width / 4 if name == "before" else width / 4),
             count, width=width / 2, color=color, alpha=0.7, label=name)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left")
  hist.set_xlabel("confidence (top probability)")
  hist.set_ylabel("examples")
  hist.set_yscale("symlog")
  _save(fig, path)


def photo_contribution(path: str, results: Mapping[str, Any]) -> None:
  """Gate histogram (when there is one) and per-class F1 with / without photos."""
  rows = sorted(results["per_class"], key=lambda r: r["f1_with_photos"])
  gate = results.get("gate")
  height = min(max(3.0, 0.16 * len(rows) + 1), 30.0)
  fig, axes = plt.subplots(1, 2 if gate else 1, figsize=(13 if gate else 8,
                                                          height),
                           squeeze=False)
  ax = axes[0, 0]
  y = np.arange(len(rows))
  ax.barh(y, [r["f1_with_photos"] for r in rows], color="tab:blue",
          label="with photos")
  ax.scatter([r["f1_photos_withheld"] for r in rows], y, color="tab:red",
             marker="|", s=60, label="photos withheld", zorder=3)
  ax.set_yticks(y, [f"{r['label']} (n={r['support']})" for r in rows],
                fontsize=max(4, 9 - len(rows) // 25))
  ax.set_xlim(0, 1)
  ax.set_xlabel("F1")
  ax.set_title(f"{results['split']}: macro-F1 "
               f"{results['macro_f1_with_photos']:.3f} with photos, "
               f"{results['macro_f1_photos_withheld']:.3f} withheld")
  _legend_outside(ax)
  if gate:
    ax = axes[0, 1]
    edges = np.asarray(gate["histogram"]["edges"])
    ax.bar(edges[:-1], gate["histogram"]["counts"], width=np.diff(edges),
           align="edge", color="tab:green")
    ax.set_xlabel("visual gate (eq. 3), mean over a product's title tokens")
    ax.set_ylabel("products")
    ax.set_title(f"gate mean {gate['mean']:.3f}")
  _save(fig, path)
