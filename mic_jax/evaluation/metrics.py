"""Classification metrics and the late-fusion weight, in plain NumPy.

The paper's headline metric is macro-F1 (4.1). Its value depends on which
classes are averaged over, so the convention is fixed here and tested
against scikit-learn:

  **macro-F1 averages the per-class F1 over the classes that occur in the
  labels or in the predictions** of the evaluated examples, exactly
  ``sklearn.metrics.f1_score(y, p, average="macro", zero_division=0)`` with
  its default ``labels`` (the union of ``y`` and ``p``).

Why: a class that is neither in the split nor predicted has an undefined
0/0 F1; counting it as 0 would make the score depend on how many rare
categories happen to be missing from a split (and would differ from the
scikit-learn default everyone compares with), while counting it as 1 would
reward nothing. A class that is predicted but absent from the labels stays
in the average with F1 = 0: those predictions are pure false positives.
``macro_f1_all_classes`` (absent classes as 0, all ``num_classes`` in the
mean) is reported too, for readers who use that convention.

Per-class precision / recall / F1 with a zero denominator are 0
(scikit-learn's ``zero_division=0``). Micro-F1 over all classes equals
accuracy for single-label classification; both are reported.

Everything works on host arrays after the eval padding was dropped, or takes
the pipeline's ``mask`` directly (rows with ``mask == 0`` are ignored).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

DEFAULT_ALPHA_GRID = np.linspace(0.0, 1.0, 21)


def _keep(mask: Any, n: int) -> np.ndarray:
  if mask is None:
    return np.ones(n, bool)
  mask = np.asarray(mask).reshape(-1)
  if mask.shape[0] != n:
    raise ValueError(f"mask has {mask.shape[0]} rows, expected {n}")
  return mask > 0


def _class_ids(x: Any, num_classes: int, what: str) -> np.ndarray:
  x = np.asarray(x).reshape(-1)
  if x.size and not np.issubdtype(x.dtype, np.integer):
    if not np.all(x == np.round(x)):
      raise ValueError(f"{what} must be integer class ids")
  x = x.astype(np.int64)
  if x.size and (x.min() < 0 or x.max() >= num_classes):
    raise ValueError(f"{what} must be in [0, {num_classes}), got values in "
                     f"[{x.min()}, {x.max()}]")
  return x


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def confusion_matrix(labels: Any, preds: Any, num_classes: int,
                     mask: Any = None) -> np.ndarray:
  """``[C, C]`` int64 counts; row = true class, column = predicted class."""
  labels = _class_ids(labels, num_classes, "labels")
  preds = _class_ids(preds, num_classes, "preds")
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ")
  keep = _keep(mask, labels.shape[0])
  flat = labels[keep] * num_classes + preds[keep]
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(
      num_classes, num_classes)


def report_from_confusion(confusion: np.ndarray) -> dict[str, Any]:
  """Every metric of :func:`classification_report` from a confusion matrix.

  Useful when counts are accumulated batch by batch instead of keeping all
  predictions.
  """
  confusion = np.asarray(confusion, np.int64)
  tp = np.diag(confusion).astype(np.float64)
  support = confusion.sum(axis=1)          # True examples per class.
  predicted = confusion.sum(axis=0)        # Predictions per class.
  total = int(confusion.sum())
  precision = _safe_divide(tp, predicted)
  recall = _safe_divide(tp, support)
  # 2TP / (2TP + FP + FN): the same as 2PR / (P + R), without 0/0 traps.
  f1 = _safe_divide(2 * tp, support + predicted)
  evaluated = np.flatnonzero((support + predicted) > 0)
  macro = (lambda x: float(x[evaluated].mean()) if evaluated.size else 0.0)
  accuracy = float(tp.sum() / total) if total else 0.0
  return {
      "num_examples": total,
      "accuracy": accuracy,
      "micro_f1": accuracy,
      "macro_f1": macro(f1),
      "macro_precision": macro(precision),
      "macro_recall": macro(recall),
      "macro_f1_all_classes": float(f1.mean()) if f1.size else 0.0,
      "classes_evaluated": evaluated.tolist(),
      "precision": precision,
      "recall": recall,
      "f1": f1,
      "support": support,
      "confusion_matrix": confusion,
  }


def classification_report(labels: Any, preds: Any, num_classes: int,
                          mask: Any = None) -> dict[str, Any]:
  """Macro/micro F1, accuracy, per-class figures and the confusion matrix.

  Args:
    labels: true class ids ``[N]``.
    preds: predicted class ids ``[N]`` (e.g. ``probs.argmax(-1)``).
    num_classes: ``C``; ids must lie in ``[0, C)``.
    mask: optional ``[N]``; rows with ``mask <= 0`` (eval padding) are
      ignored.

  Returns:
    A dict with scalars ``macro_f1`` (convention in the module docstring),
    ``micro_f1``, ``accuracy``, ``macro_precision``, ``macro_recall``,
    ``macro_f1_all_classes``, ``num_examples``; the list
    ``classes_evaluated`` (the classes in the macro average); per-class
    float64 arrays ``precision``, ``recall``, ``f1`` and int64 ``support``
    (length C); and ``confusion_matrix`` ``[C, C]`` (row = true class).
  """
  return report_from_confusion(
      confusion_matrix(labels, preds, num_classes, mask))


def late_mix(p_text: Any, p_image: Any, alpha: float) -> Any:
  """The late-fusion formula (paper 3.3.1), ``alpha p_text + (1 - alpha)
  p_image``, in the arrays' own type (numpy, or jax inside the exported
  function): the one place it is written."""
  return alpha * p_text + (1.0 - alpha) * p_image


def fuse(p_text: Any, p_image: Any, alpha: float) -> np.ndarray:
  """Late fusion of probability arrays, in float64 (:func:`late_mix`)."""
  return late_mix(np.asarray(p_text, np.float64),
                  np.asarray(p_image, np.float64), alpha)


def choose_alpha(p_text: Any, p_image: Any, labels: Any, mask: Any = None,
                 grid: Sequence[float] | np.ndarray = DEFAULT_ALPHA_GRID
                 ) -> tuple[float, float, list[tuple[float, float]]]:
  """Picks the late-fusion weight on held-out data by macro-F1 (paper 3.3.1).

  Every ``alpha`` in ``grid`` is scored by the macro-F1 of
  ``argmax(alpha p_text + (1 - alpha) p_image)``. Ties (common: macro-F1 is
  a step function of alpha) go to the alpha closest to 0.5, then the
  smaller one, so that of equally good mixes the least one-sided is kept and
  the choice does not depend on the grid's order.

  Args:
    p_text: text model probabilities ``[N, C]``.
    p_image: image model probabilities ``[N, C]``.
    labels: true class ids ``[N]``.
    mask: optional ``[N]``; rows with ``mask <= 0`` are ignored.
    grid: candidate alphas in [0, 1].

  Returns:
    ``(alpha, macro_f1, table)``, ``table`` being ``[(alpha, macro_f1)]``
    for every grid point in grid order (to store with the result).
  """
  p_text = np.asarray(p_text)
  p_image = np.asarray(p_image)
  if p_text.ndim != 2 or p_text.shape != p_image.shape:
    raise ValueError(f"p_text {p_text.shape} and p_image {p_image.shape} "
                     "must both be [N, C]")
  grid = np.asarray(grid, np.float64).reshape(-1)
  if not grid.size or grid.min() < 0 or grid.max() > 1:
    raise ValueError(f"alpha grid must be non-empty and inside [0, 1], got "
                     f"{grid}")
  num_classes = p_text.shape[1]
  labels = _class_ids(labels, num_classes, "labels")
  keep = _keep(mask, labels.shape[0])
  p_text, p_image, labels = p_text[keep], p_image[keep], labels[keep]
  table = []
  for alpha in grid:
    preds = fuse(p_text, p_image, alpha).argmax(axis=-1)
    score = classification_report(labels, preds, num_classes)["macro_f1"]
    table.append((float(alpha), float(score)))
  best = min(table, key=lambda row: (-row[1], abs(row[0] - 0.5), row[0]))
  return best[0], best[1], table


def top_k_accuracy(probs: Any, labels: Any, k: int = 5) -> float:
  """Fraction of examples whose true class is among the ``k`` top scores.

  Ties are broken towards the lower class id, as ``argmax`` does; with
  ``k >= C`` every example counts.
  """
  probs = np.asarray(probs)
  if probs.ndim != 2:
    raise ValueError(f"probs must be [N, C], got {probs.shape}")
  labels = _class_ids(labels, probs.shape[1], "labels")
  if labels.shape[0] != probs.shape[0]:
    raise ValueError(f"{labels.shape[0]} labels for {probs.shape[0]} rows")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if not labels.size:
    return 0.0
  top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  return float((top == labels[:, None]).any(axis=-1).mean())


def top_confusions(confusion: Any, k: int = 30) -> list[dict[str, Any]]:
  """The ``k`` largest off-diagonal cells of a confusion matrix.

  At a thousand classes the matrix itself cannot be read (a million cells,
  mostly zero); which true class is most often taken for which other is
  what a reader wants from it. Each entry: ``true``, ``predicted`` (class
  ids), ``count`` and ``fraction`` (of the true class's examples), largest
  count first, ties by fraction then by class ids; zero cells are left out.
  """
  confusion = np.asarray(confusion, np.int64)
  off = confusion.copy()
  np.fill_diagonal(off, 0)
  flat = off.reshape(-1)
  nonzero = np.flatnonzero(flat)
  if nonzero.size > k:  # argpartition: linear in the cells, not C^2 log.
    keep = np.argpartition(-flat[nonzero], k - 1)[:k]
    threshold = flat[nonzero[keep]].min()
    nonzero = nonzero[flat[nonzero] >= threshold]  # All ties of the last.
  support = confusion.sum(axis=1)
  rows = []
  for cell in nonzero.tolist():
    true, predicted = divmod(cell, confusion.shape[1])
    count = int(flat[cell])
    rows.append({"true": true, "predicted": predicted, "count": count,
                 "fraction": count / int(support[true])})
  rows.sort(key=lambda r: (-r["count"], -r["fraction"], r["true"],
                           r["predicted"]))
  return rows[:k]


def per_class_order(report: dict[str, Any]) -> np.ndarray:
  """Class ids in the order reports list them: worst F1 first.

  At a thousand classes a reader looks for the classes to fix, so they
  come first: F1 ascending, then support descending (of equally bad
  classes the most frequent first), then class id; classes absent from
  both the labels and the predictions (no F1 to speak of) go last.
  """
  f1 = np.asarray(report["f1"], np.float64)
  support = np.asarray(report["support"], np.int64)
  evaluated = np.zeros(f1.shape[0], bool)
  evaluated[np.asarray(report["classes_evaluated"], np.int64)] = True
  ids = np.arange(f1.shape[0])
  return np.lexsort((ids, -support, f1, ~evaluated))


FREQUENCY_GROUPS = ("head", "middle", "tail")


def frequency_groups(train_counts: Any) -> dict[str, np.ndarray]:
  """The class ids of the head, middle and tail thirds by training count.

  Classes are sorted by training count, most frequent first, ties by class
  id (a stable sort), and cut into three consecutive groups of
  ``C // 3`` classes; the ``C % 3`` remaining classes go one each to the
  head, then the middle (``np.array_split``), so the tail is never larger
  than the other groups and holds the rarest classes (including those with
  no training example).
  """
  counts = np.asarray(train_counts).reshape(-1)
  order = np.argsort(-counts, kind="stable")
  return dict(zip(FREQUENCY_GROUPS, np.array_split(order, 3)))


def macro_f1_by_frequency(report: dict[str, Any], train_counts: Any
                          ) -> dict[str, float | None]:
  """Macro-F1 within the head, middle and tail thirds of the classes.

  ``report`` is a :func:`classification_report`; each group's macro-F1
  follows the module's convention restricted to the group: the mean F1 of
  the group's classes that occur in the labels or the predictions. A group
  with no such class (or no class at all, for ``C < 3``) is ``None``.
  """
  f1 = np.asarray(report["f1"], np.float64)
  counts = np.asarray(train_counts).reshape(-1)
  if counts.shape[0] != f1.shape[0]:
    raise ValueError(f"train_counts has {counts.shape[0]} classes, the "
                     f"report {f1.shape[0]}")
  evaluated = np.zeros(f1.shape[0], bool)
  evaluated[np.asarray(report["classes_evaluated"], np.int64)] = True
  out: dict[str, float | None] = {}
  for name, ids in frequency_groups(counts).items():
    ids = ids[evaluated[ids]]
    out[name] = float(f1[ids].mean()) if ids.size else None
  return out
