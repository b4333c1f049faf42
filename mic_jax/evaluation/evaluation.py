"""Evaluation: every example exactly once, metrics, and the end-of-run report.

The eval pipeline pads the last batch and marks padding with ``mask = 0``;
probabilities are gathered from all hosts and padding rows are dropped
before any metric is computed, so the figures do not depend on the batch
size or the number of hosts.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow as tf

from mic_jax import sharding as shd
from mic_jax.data import pipeline
from mic_jax.evaluation import calibration
from mic_jax.evaluation import metrics as metrics_lib
from mic_jax.evaluation import plots, reporting
from mic_jax.train import faults, rundir, steps

# Written at the end of every run; the export reads its "temperature".
CALIBRATION_FILE = rundir.CALIBRATION


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
  """Runs a trained model over a split; writes the final report."""

  def __init__(self, run: Any):
    self.run = run
    config = run.config
    self.batch_size = int(config.data.eval_batch_size or config.batch_size)
    self._eval_step = jax.jit(steps.make_eval_step(run.model, log_probs=True),
                              in_shardings=(run.state_shardings.params, None))
    self._sharding = shd.batch_sharding(run.mesh, run.rules)
    # A model trained with every photo withheld (``image_dropout = 1``) is
    # scored the way it was trained: shown a photo for the first time, its
    # untrained cross-attention and gate would add noise (measured on the
    # real catalogue: 0.595 test macro-F1 with photos, 0.895 without).
    self.photos_withheld = float(config.model.get("image_dropout", 0.0)) >= 1.0

  def predict(self, params: Any, split: str, *, withhold_images: bool = False,
              log_probs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``[N, C]`` and labels ``[N]`` of every example of ``split``.

    ``withhold_images`` scores every product as one without a photo (zero
    image, ``image_present = 0``): how much a fused model leans on photos.
    A model trained with ``image_dropout = 1`` is always scored so.
    ``log_probs`` returns log-probabilities (what calibration fits on).
    """
    withhold_images = withhold_images or self.photos_withheld
    probs, labels = [], []
    features = getattr(self.run, "features", None)
    batches = pipeline.eval_batches(
        self.run.data_dir, split, batch_size=shd.per_host_batch_size(self.batch_size),
        image_size=self.run.config.image.size,
        image_keys=features is not None,
        length_buckets=getattr(self.run, "buckets", ()),
        packing=getattr(self.run, "packing", None),
        info=getattr(self.run, "info", None))
    if features is not None:
      batches = features.attach(batches, withhold=withhold_images)
    for batch in batches:
      if withhold_images and features is None:
        batch["image"] = np.zeros_like(batch["image"])
        batch["image_present"] = np.zeros_like(batch["image_present"])
      arrays = shd.host_to_global(batch, self._sharding)
      p = self._eval_step(params, arrays)
      keep = _to_host(arrays["mask"]) > 0
      probs.append(_to_host(p)[keep])
      labels.append(_to_host(arrays["label"])[keep])
      faults.point("eval_batch")
    if not probs:
      raise ValueError(f"split {split!r} of {self.run.data_dir} is empty")
    scores = np.concatenate(probs)
    return (scores if log_probs else np.exp(scores)), np.concatenate(labels)

  def evaluate(self, params: Any, split: str, *, withhold_images: bool = False
               ) -> dict[str, Any]:
    """The classification report of ``split`` (see :meth:`predict`)."""
    probs, labels = self.predict(params, split,
                                 withhold_images=withhold_images)
    return metrics_lib.classification_report(
        labels, probs.argmax(-1), self.run.info.num_classes)

  def final_report(self, checkpoints: Any) -> dict[str, Any]:
    """Best checkpoint on validation and test -> results, CSVs, plots.

    A temperature is fitted on validation
    (:mod:`mic_jax.evaluation.calibration`) and stored as
    ``calibration.json``; every split reports its figures before and after
    it.
    """
    run = self.run
    best_step, params = checkpoints.restore_best(run.abstract_state.params)
    results: dict[str, Any] = {"best_step": best_step,
                               "model": run.config.model.kind}
    scored = {}
    for split in ("validation", "test"):
      if not run.info.has_split(split):
        logging.warning("no %s split in %s", split, run.data_dir)
        continue
      scored[split] = self.predict(params, split, log_probs=True)
    temperature = fit_validation_temperature(scored, run.workdir)
    train_counts = run.info.class_counts("train")
    for split, (log_probs, labels) in scored.items():
      results[split], report = score_split(
          log_probs, labels, temperature, train_counts, run.info.num_classes)
      if run.config.data.demo:
        # What neither modality alone can reach (see mic_jax.data.demo).
        from mic_jax.data import demo  # pylint: disable=g-import-not-at-top
        results[split].update(demo.single_modality_ceilings(
            os.path.dirname(run.data_dir), split))
      write_split_report(run.workdir, split, report, run.info.labels)
      write_reliability(run.workdir, split, log_probs, labels, temperature)
    if reporting.is_writer():
      plots.training_curves(os.path.join(run.workdir, "training_curves.png"),
                            reporting.read_metrics(run.workdir))
      reporting.write_json(rundir.path(run.workdir, rundir.RESULTS), results)
    logging.info("results: %s", {k: v for k, v in results.items()})
    return results


def fit_validation_temperature(scored: dict[str, tuple[np.ndarray, np.ndarray]],
                               workdir: str, **extra: Any) -> float:
  """Fits T on ``scored["validation"]`` and writes ``calibration.json``.

  ``scored`` maps a split to ``(log_probs, labels)``. Without a validation
  split nothing is fitted, no file is written (readers take T = 1) and 1 is
  returned. ``extra`` goes into the file (late fusion's member temperatures).
  """
  path = os.path.join(workdir, CALIBRATION_FILE)
  if "validation" not in scored:
    logging.warning("no validation split: not calibrating (temperature 1)")
    if reporting.is_writer() and tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)  # A stale file from an earlier run would lie.
    return 1.0
  temperature = calibration.fit_temperature(*scored["validation"])
  logging.info("calibration: temperature %.4f fitted on validation",
               temperature)
  if reporting.is_writer():
    reporting.write_json(path,
                         calibration.calibration_record(temperature, **extra))
  return temperature


def score_split(log_probs: np.ndarray, labels: np.ndarray, temperature: float,
                train_counts: np.ndarray, num_classes: int
                ) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(results.json entry, classification report)`` of one split.

  The entry holds the headline numbers, ``top5_accuracy``,
  ``macro_f1_by_frequency`` and the ``calibration`` block; argmax-based
  figures do not depend on the temperature.
  """
  report = metrics_lib.classification_report(labels, log_probs.argmax(-1),
                                             num_classes)
  entry = summarize(report)
  entry["top5_accuracy"] = metrics_lib.top_k_accuracy(log_probs, labels, 5)
  entry["macro_f1_by_frequency"] = metrics_lib.macro_f1_by_frequency(
      report, train_counts)
  entry["calibration"] = calibration.summary(log_probs, labels, temperature)
  return entry, report


def write_reliability(workdir: str, split: str, log_probs: np.ndarray,
                      labels: np.ndarray, temperature: float) -> None:
  """``reliability_<split>.png``: the reliability diagram before and after."""
  if not reporting.is_writer():
    return
  before = calibration.reliability(calibration.scale(log_probs, 1.0), labels)
  after = calibration.reliability(calibration.scale(log_probs, temperature),
                                  labels)
  plots.reliability_diagram(
      os.path.join(workdir, f"reliability_{split}.png"), before, after,
      f"{split}: temperature {temperature:.3f}")


def summarize(report: dict[str, Any]) -> dict[str, Any]:
  """The headline numbers of a report, as they go into results.json."""
  return {k: report[k] for k in ("macro_f1", "micro_f1", "accuracy",
                                 "num_examples") if k in report}


def write_split_report(workdir: str, split: str, report: dict[str, Any],
                       labels: list[str]) -> None:
  """Per-class CSV (worst first), top confusions CSV, confusion matrix (the
  top confusions past 50 classes) and per-class F1 pictures of a split."""
  if not reporting.is_writer():
    return
  reporting.write_per_class_csv(
      os.path.join(workdir, f"per_class_{split}.csv"), report, labels)
  reporting.write_top_confusions_csv(
      os.path.join(workdir, f"top_confusions_{split}.csv"),
      metrics_lib.top_confusions(report["confusion_matrix"], 100), labels)
  plots.confusion_matrix(os.path.join(workdir, f"confusion_{split}.png"),
                         report["confusion_matrix"], labels,
                         f"{split}: macro-F1 {report['macro_f1']:.3f}")
  plots.per_class_f1(os.path.join(workdir, f"per_class_f1_{split}.png"),
                     report, labels, f"{split} per-class F1")
