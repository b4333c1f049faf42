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
import jax.numpy as jnp
import ml_collections
import numpy as np

from mic_jax import sharding as shd
from mic_jax.data import pipeline
from mic_jax.train import metrics as metrics_lib
from mic_jax.train import faults, plots, reporting, steps


def dummy_batch(config: ml_collections.ConfigDict, info: Any,
                batch_size: int = 1) -> dict[str, jnp.ndarray]:
  """A zero batch with the shapes the pipeline produces, for ``init``."""
  length, size = int(info.max_length), int(config.image.size)
  return {
      "input_ids": jnp.zeros((batch_size, length), jnp.int32),
      "attention_mask": jnp.ones((batch_size, length), jnp.int32),
      "token_type_ids": jnp.zeros((batch_size, length), jnp.int32),
      "image": jnp.zeros((batch_size, size, size, 3), jnp.float32),
      "image_present": jnp.ones((batch_size,), jnp.int32),
      "label": jnp.zeros((batch_size,), jnp.int32),
      "mask": jnp.ones((batch_size,), jnp.float32),
  }


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
    self._eval_step = jax.jit(steps.make_eval_step(run.model),
                              in_shardings=(run.state_shardings.params, None))
    self._sharding = shd.batch_sharding(run.mesh, run.rules)

  def predict(self, params: Any, split: str, *, withhold_images: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``[N, C]`` and labels ``[N]`` of every example of ``split``.

    ``withhold_images`` scores every product as one without a photo (zero
    image, ``image_present = 0``): how much a fused model leans on photos.
    """
    probs, labels = [], []
    features = getattr(self.run, "features", None)
    batches = pipeline.eval_batches(
        self.run.data_dir, split, batch_size=shd.per_host_batch_size(self.batch_size),
        image_size=self.run.config.image.size,
        image_keys=features is not None)
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
    return np.concatenate(probs), np.concatenate(labels)

  def evaluate(self, params: Any, split: str, *, withhold_images: bool = False
               ) -> dict[str, Any]:
    """The classification report of ``split`` (see :meth:`predict`)."""
    probs, labels = self.predict(params, split,
                                 withhold_images=withhold_images)
    return metrics_lib.classification_report(
        labels, probs.argmax(-1), self.run.info.num_classes)

  def final_report(self, checkpoints: Any) -> dict[str, Any]:
    """Best checkpoint on validation and test -> results, CSVs, plots."""
    run = self.run
    best_step, params = checkpoints.restore_best(run.abstract_state.params)
    results: dict[str, Any] = {"best_step": best_step,
                               "model": run.config.model.kind}
    for split in ("validation", "test"):
      if not run.info.has_split(split):
        logging.warning("no %s split in %s", split, run.data_dir)
        continue
      probs, labels = self.predict(params, split)
      report = metrics_lib.classification_report(
          labels, probs.argmax(-1), run.info.num_classes)
      results[split] = summarize(report)
      if run.config.data.demo:
        # What neither modality alone can reach (see mic_jax.data.demo).
        from mic_jax.data import demo  # pylint: disable=g-import-not-at-top
        results[split].update(demo.single_modality_ceilings(
            os.path.dirname(run.data_dir), split))
      write_split_report(run.workdir, split, report, run.info.labels)
    if reporting.is_writer():
      plots.training_curves(os.path.join(run.workdir, "training_curves.png"),
                            reporting.read_metrics(run.workdir))
      reporting.write_json(os.path.join(run.workdir, "results.json"), results)
    logging.info("results: %s", {k: v for k, v in results.items()})
    return results


def summarize(report: dict[str, Any]) -> dict[str, Any]:
  """The headline numbers of a report, as they go into results.json."""
  return {k: report[k] for k in ("macro_f1", "micro_f1", "accuracy",
                                 "num_examples") if k in report}


def write_split_report(workdir: str, split: str, report: dict[str, Any],
                       labels: list[str]) -> None:
  """Per-class CSV, confusion matrix and per-class F1 pictures of a split."""
  if not reporting.is_writer():
    return
  reporting.write_per_class_csv(
      os.path.join(workdir, f"per_class_{split}.csv"), report, labels)
  plots.confusion_matrix(os.path.join(workdir, f"confusion_{split}.png"),
                         report["confusion_matrix"], labels,
                         f"{split}: macro-F1 {report['macro_f1']:.3f}")
  plots.per_class_f1(os.path.join(workdir, f"per_class_f1_{split}.png"),
                     report, labels, f"{split} per-class F1")
