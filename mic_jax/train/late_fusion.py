"""Late fusion: ``p = alpha * p_text + (1 - alpha) * p_image`` (paper, 3.3.1).

Two single-modality runs are trained (or taken from
``config.late.text_workdir`` / ``config.late.image_workdir``), their best
checkpoints predict the validation and test splits, alpha is chosen on
validation by macro-F1 over a grid, and the test split is scored with that
alpha. The chosen alpha and the whole grid are stored in ``results.json``.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from mic_jax.train import checkpointing, evaluation, metrics, reporting


def _sub_config(config: ml_collections.ConfigDict, kind: str, data_dir: str
                ) -> ml_collections.ConfigDict:
  """The single-modality config; both read the same prepared data."""
  sub = config.copy_and_resolve_references()
  with sub.unlocked():
    sub.model.kind = kind
    sub.data.demo = False
    sub.data.dir = data_dir
  sub.lock()
  return sub


def _trained_run(config: ml_collections.ConfigDict, workdir: str):
  """Trains ``workdir`` unless it already has results; returns its run."""
  from mic_jax.train import trainer  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(os.path.join(workdir, "results.json")):
    logging.info("late fusion: training %s in %s", config.model.kind, workdir)
    trainer.train_and_evaluate(config, workdir)
  run = trainer.build_run(config, workdir)
  checkpoints = checkpointing.RunCheckpoints(workdir, keep=1)
  step, params = checkpoints.restore_best(run.abstract_state.params)
  checkpoints.close()
  return run, params, step


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains/loads both towers, picks alpha on validation, scores test."""
  from mic_jax.train import trainer  # pylint: disable=g-import-not-at-top
  reporting.ensure_dir(workdir)
  data_dir, _ = trainer.resolve_data(config, workdir)
  text_dir = config.late.text_workdir or os.path.join(workdir, "text_only")
  image_dir = config.late.image_workdir or os.path.join(workdir, "image_only")
  text_run, text_params, text_step = _trained_run(
      _sub_config(config, "text_only", data_dir), text_dir)
  image_run, image_params, image_step = _trained_run(
      _sub_config(config, "image_only", data_dir), image_dir)
  text_eval = evaluation.Evaluator(text_run)
  image_eval = evaluation.Evaluator(image_run)
  grid = np.linspace(0.0, 1.0, int(config.late.alpha_steps))

  probs = {}
  for split in ("validation", "test"):
    if not text_run.info.has_split(split):
      continue
    p_text, labels = text_eval.predict(text_params, split)
    p_image, labels_image = image_eval.predict(image_params, split)
    if not np.array_equal(labels, labels_image):
      raise RuntimeError(f"{split}: the text and image runs saw the examples "
                         "in different orders; they must use the same data")
    probs[split] = (p_text, p_image, labels)

  p_text, p_image, labels = probs["validation"]
  alpha, val_f1, table = metrics.choose_alpha(p_text, p_image, labels,
                                              grid=grid)
  logging.info("late fusion: alpha %.2f (validation macro-F1 %.4f)", alpha,
               val_f1)
  results: dict[str, Any] = {
      "model": "late", "alpha": float(alpha),
      "alpha_grid": [[float(a), float(f)] for a, f in table],
      "text_run": {"workdir": text_dir, "best_step": text_step},
      "image_run": {"workdir": image_dir, "best_step": image_step},
  }
  num_classes = text_run.info.num_classes
  for split, (pt, pi, y) in probs.items():
    fused = alpha * pt + (1 - alpha) * pi
    report = metrics.classification_report(y, fused.argmax(-1), num_classes)
    results[split] = evaluation.summarize(report)
    results[split]["alpha"] = float(alpha)
    evaluation.write_split_report(workdir, split, report,
                                  text_run.info.labels)
  if reporting.is_writer():
    reporting.write_json(os.path.join(workdir, "results.json"), results)
  return results
