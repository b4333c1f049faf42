"""Temperature scaling and calibration error, in plain NumPy.

A marketplace routes a product to a person when the model's confidence is
low, so the confidence must mean what it says. Temperature scaling (Guo et
al., 2017) divides the logits by one scalar ``T > 0`` fitted on the
validation split by minimising the negative log-likelihood; ``T > 1``
softens an over-confident model. Dividing every logit by the same positive
number never changes the argmax, so accuracy and macro-F1 are untouched.

Logits or log-probabilities: ``softmax(log_softmax(z) / T) = softmax(z / T)``
because ``log_softmax(z)`` differs from ``z`` by a per-row constant, so the
fit and the scaling work on either. Probabilities are turned into
log-probabilities with :func:`log_probs` (zeros clipped to the smallest
positive float32, so ``log(0)`` never appears).

The fit: the NLL is convex in ``beta = 1 / T``, so it is unimodal in
``log T`` too; a golden-section search over ``log T`` in
``[log T_MIN, log T_MAX]`` finds the minimum deterministically (no random
start, no gradient), to far below the 1e-3 the tests ask for. A model whose
NLL keeps falling as ``T`` grows (its scores carry no information) ends at
``T_MAX``.

ECE (expected calibration error): confidences (the top probability) are put
into ``num_bins`` equal-width bins with edges ``linspace(0, 1, num_bins +
1)``, a bin holding the confidences in ``(lo, hi]``; ECE is
``sum_b n_b / N * |accuracy_b - mean confidence_b|``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

T_MIN = 1e-2
T_MAX = 1e2
NUM_BINS = 15
_TINY = float(np.finfo(np.float32).tiny)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _check(scores: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).reshape(-1)
  if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
    raise ValueError(f"{what} must be [N, C] with N = len(labels) = "
                     f"{labels.shape[0]}, got {scores.shape}")
  if not scores.shape[0]:
    raise ValueError(f"{what}: no examples")
  if labels.min() < 0 or labels.max() >= scores.shape[1]:
    raise ValueError(f"labels must be in [0, {scores.shape[1]}), got values "
                     f"in [{labels.min()}, {labels.max()}]")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{what} has non-finite values")
  return scores, labels.astype(np.int64)


def log_probs(probs: Any) -> np.ndarray:
  """``log(p)`` (float64) with zeros clipped to the tiniest float32."""
  return np.log(np.maximum(np.asarray(probs, np.float64), _TINY))


def log_softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
  """``log softmax(logits / temperature)`` in float64."""
  z = np.asarray(logits, np.float64) / float(temperature)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def scale(logits: Any, temperature: float) -> np.ndarray:
  """Calibrated probabilities ``softmax(logits / temperature)`` (float64)."""
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  return np.exp(log_softmax(logits, temperature))


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
  """Mean negative log-likelihood of ``softmax(logits / temperature)``."""
  logits, labels = _check(logits, labels, "logits")
  logp = log_softmax(logits, temperature)
  return float(-logp[np.arange(labels.shape[0]), labels].mean())


def fit_temperature(logits: Any, labels: Any, *, t_min: float = T_MIN,
                    t_max: float = T_MAX, tol: float = 1e-7) -> float:
  """The ``T`` in ``[t_min, t_max]`` minimising :func:`nll` (golden section).

  Args:
    logits: ``[N, C]`` logits or log-probabilities of held-out examples.
    labels: their true class ids ``[N]``.
    t_min, t_max: the search interval of ``T``.
    tol: stop when the bracket of ``log T`` is narrower than this.
  """
  logits, labels = _check(logits, labels, "logits")
  if not 0 < t_min < t_max:
    raise ValueError(f"need 0 < t_min < t_max, got {t_min}, {t_max}")
  rows = np.arange(labels.shape[0])
  # Shift rows once: the NLL is invariant to per-row constants.
  logits = logits - logits.max(axis=-1, keepdims=True)
  target = logits[rows, labels]

  def objective(log_t: float) -> float:
    z = logits / math.exp(log_t)
    top = z.max(axis=-1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=-1))
    return float((lse - target / math.exp(log_t)).mean())

  a, b = math.log(t_min), math.log(t_max)
  c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
  fc, fd = objective(c), objective(d)
  while b - a > tol:
    if fc <= fd:
      b, d, fd = d, c, fc
      c = b - _GOLDEN * (b - a)
      fc = objective(c)
    else:
      a, c, fc = c, d, fd
      d = a + _GOLDEN * (b - a)
      fd = objective(d)
  return float(math.exp((a + b) / 2))


def reliability(probs: Any, labels: Any, num_bins: int = NUM_BINS
                ) -> dict[str, np.ndarray]:
  """Per-bin counts, accuracy and mean confidence of the top prediction.

  Returns ``edges [num_bins + 1]``, ``count``, ``accuracy`` and
  ``confidence`` (``[num_bins]``; 0 for empty bins) and the scalar ``ece``;
  bins as in the module docstring.
  """
  probs, labels = _check(probs, labels, "probs")
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  confidence = probs.max(axis=-1)
  correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # side="left": a confidence equal to an inner edge goes to the lower bin.
  bins = np.clip(np.searchsorted(edges[1:-1], confidence, side="left"), 0,
                 num_bins - 1)
  count = np.bincount(bins, minlength=num_bins).astype(np.int64)
  safe = np.maximum(count, 1)
  accuracy = np.bincount(bins, correct, num_bins) / safe
  mean_confidence = np.bincount(bins, confidence, num_bins) / safe
  weights = count / count.sum()
  return {
      "edges": edges,
      "count": count,
      "accuracy": accuracy,
      "confidence": mean_confidence,
      "ece": float(np.sum(weights * np.abs(accuracy - mean_confidence))),
  }


def ece(probs: Any, labels: Any, num_bins: int = NUM_BINS) -> float:
  """Expected calibration error over ``num_bins`` equal-width bins."""
  return reliability(probs, labels, num_bins)["ece"]


def summary(logits: Any, labels: Any, temperature: float) -> dict[str, float]:
  """``results.json``'s ``calibration`` block of one split."""
  before = scale(logits, 1.0)
  after = scale(logits, temperature)
  return {
      "temperature": float(temperature),
      "nll_before": nll(logits, labels, 1.0),
      "nll_after": nll(logits, labels, temperature),
      "ece_before": ece(before, labels),
      "ece_after": ece(after, labels),
  }


def calibration_record(temperature: float, **extra: Any) -> dict[str, Any]:
  """What ``calibration.json`` holds (:func:`parse_record` reads it back).

  ``extra`` is late fusion's ``members={"text": T, "image": T}``.
  """
  return {"temperature": float(temperature), "fitted_on": "validation",
          **extra}


def _temperature(value: Any, where: str) -> float:
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or
      not math.isfinite(value) or value <= 0):
    raise ValueError(f"{where}: a temperature must be a positive finite "
                     f"number, got {value!r}")
  return float(value)


def parse_record(record: Any, where: str, late: bool) -> dict[str, Any]:
  """Checks a loaded ``calibration.json`` and returns its temperatures.

  The reader of what :func:`calibration_record` writes, so the file's keys
  are known in one module. ``record`` is the parsed JSON (``None``: no file,
  a run from before calibration, so every temperature is 1); ``where`` names
  the file in errors. Returns ``{"temperature": T, "fitted_on": ...}`` plus
  ``"members": {"image": T, "text": T}`` when ``late``.

  Raises:
    ValueError: not an object with a positive finite ``temperature``, or a
      late-fusion record whose ``members`` are not the two towers'.
  """
  if record is None:
    record = {"temperature": 1.0}
  if not isinstance(record, dict) or "temperature" not in record:
    raise ValueError(f'{where}: expected {{"temperature": T, ...}}, got '
                     f"{record!r}"[:300])
  parsed = {"temperature": _temperature(record["temperature"],
                                        f"{where}: temperature"),
            "fitted_on": record.get("fitted_on")}
  if late:
    members = record.get("members", {"text": 1.0, "image": 1.0})
    if not isinstance(members, dict) or set(members) != {"text", "image"}:
      raise ValueError(f'{where}: "members" must be {{"text": T, "image": '
                       f"T}} for a late-fusion run, got {members!r}")
    parsed["members"] = {k: _temperature(v, f"{where}: members.{k}")
                         for k, v in sorted(members.items())}
  return parsed
