"""Late fusion: ``p = alpha * p_text + (1 - alpha) * p_image`` (paper, 3.3.1).

Two single-modality runs are trained (or taken from
``config.late.text_workdir`` / ``config.late.image_workdir``); each is
rebuilt from its own ``config.json`` (the forward pass it was trained with)
and its best checkpoint predicts the validation and test splits. Each
member is temperature-scaled on validation, alpha is chosen on validation
by macro-F1 over a grid of the calibrated members, the mix gets its own
temperature, and the test split is scored with that alpha. The chosen
alpha, the whole grid and the temperatures are stored in ``results.json``
and ``calibration.json``.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from configs import common
from mic_jax.evaluation import calibration, evaluation, metrics, reporting
from mic_jax.train import checkpointing, rundir


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


# What the late-fusion config decides for its members: where the data is and
# how this machine lays out a batch. Everything else (the towers, text_repr,
# dtype, ...) comes from the member run's own config.json.
_PLACEMENT_FIELDS = ("batch_size", "grad_accum_steps", "mesh",
                     "data.eval_batch_size")


def member_config(config: ml_collections.ConfigDict, member_workdir: str,
                  kind: str, data_dir: str) -> ml_collections.ConfigDict:
  """The config a member is scored with: its own ``config.json``.

  Late fusion must score a member with the forward pass it was trained with
  (a text run trained with ``text_repr=mean`` is not a pooler model), so
  the model comes from the run's saved config; only the data location and
  the batch layout (``_PLACEMENT_FIELDS``) come from ``config``.
  """
  member = reporting.read_config(member_workdir)
  if member.model.kind != kind:
    raise ValueError(f"late fusion: {member_workdir} is a "
                     f"{member.model.kind!r} run, expected {kind!r}")
  for key in _PLACEMENT_FIELDS:
    common.override(member, key, common.get_field(config, key))
  member.data.dir = data_dir
  member.data.demo = False
  return member


def _trained_run(config: ml_collections.ConfigDict, workdir: str,
                 data_dir: str):
  """Trains ``workdir`` unless it already has results; returns its run."""
  from mic_jax import trainer  # pylint: disable=g-import-not-at-top
  kind = config.model.kind
  if not rundir.has_results(workdir):
    logging.info("late fusion: training %s in %s", kind, workdir)
    trainer.train_and_evaluate(config, workdir)
  run = trainer.build_run(member_config(config, workdir, kind, data_dir),
                          workdir)
  trained_classes = int(reporting.read_config(workdir).num_classes)
  if trained_classes != run.info.num_classes:
    raise ValueError(f"late fusion: {workdir} was trained on "
                     f"{trained_classes} classes, {data_dir} has "
                     f"{run.info.num_classes}")
  checkpoints = checkpointing.RunCheckpoints(workdir, keep=1)
  step, params = checkpoints.restore_best(run.abstract_state.params)
  checkpoints.close()
  trainer.attach_image_features(run, params)  # A frozen, cached photo tower.
  return run, params, step


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains/loads both towers, picks alpha on validation, scores test.

  Each member is calibrated on validation first (its own temperature),
  alpha is chosen on the calibrated members, and a last temperature is
  fitted on the mix: ``p = alpha p_text' + (1 - alpha) p_image'``, then
  ``p'`` proportional to ``p^(1 / T_mix)``. ``calibration.json`` holds
  ``T_mix`` and the members' temperatures.
  """
  from mic_jax import trainer  # pylint: disable=g-import-not-at-top
  reporting.ensure_dir(workdir)
  data_dir, info = trainer.resolve_data(config, workdir)
  text_dir = config.late.text_workdir or os.path.join(workdir, "text_only")
  image_dir = config.late.image_workdir or os.path.join(workdir, "image_only")
  text_run, text_params, text_step = _trained_run(
      _sub_config(config, "text_only", data_dir), text_dir, data_dir)
  image_run, image_params, image_step = _trained_run(
      _sub_config(config, "image_only", data_dir), image_dir, data_dir)
  text_eval = evaluation.Evaluator(text_run)
  image_eval = evaluation.Evaluator(image_run)
  grid = np.linspace(0.0, 1.0, int(config.late.alpha_steps))

  log_probs = {}
  for split in ("validation", "test"):
    if not text_run.info.has_split(split):
      continue
    lp_text, labels = text_eval.predict(text_params, split, log_probs=True)
    lp_image, labels_image = image_eval.predict(image_params, split,
                                                log_probs=True)
    if not np.array_equal(labels, labels_image):
      raise RuntimeError(f"{split}: the text and image runs saw the examples "
                         "in different orders; they must use the same data")
    log_probs[split] = (lp_text, lp_image, labels)
  if "validation" not in log_probs:
    raise ValueError(f"late fusion needs a validation split in {data_dir} "
                     "to choose alpha")

  lp_text, lp_image, labels = log_probs["validation"]
  t_text = calibration.fit_temperature(lp_text, labels)
  t_image = calibration.fit_temperature(lp_image, labels)
  logging.info("late fusion: member temperatures text %.4f image %.4f",
               t_text, t_image)
  calibrated = {
      split: (calibration.scale(lt, t_text), calibration.scale(li, t_image), y)
      for split, (lt, li, y) in log_probs.items()}
  p_text, p_image, labels = calibrated["validation"]
  alpha, val_f1, table = metrics.choose_alpha(p_text, p_image, labels,
                                              grid=grid)
  logging.info("late fusion: alpha %.2f (validation macro-F1 %.4f)", alpha,
               val_f1)
  mixed = {split: (calibration.log_probs(metrics.fuse(pt, pi, alpha)), y)
           for split, (pt, pi, y) in calibrated.items()}
  t_mix = evaluation.fit_validation_temperature(
      mixed, workdir, members={"text": t_text, "image": t_image})
  results: dict[str, Any] = {
      "model": "late", "alpha": float(alpha),
      "alpha_grid": [[float(a), float(f)] for a, f in table],
      "text_run": {"workdir": text_dir, "best_step": text_step,
                   "temperature": t_text},
      "image_run": {"workdir": image_dir, "best_step": image_step,
                    "temperature": t_image},
  }
  num_classes = info.num_classes
  train_counts = info.class_counts("train")
  for split, (lp_mix, y) in mixed.items():
    results[split], report = evaluation.score_split(
        lp_mix, y, t_mix, train_counts, num_classes)
    results[split]["alpha"] = float(alpha)
    evaluation.write_split_report(workdir, split, report, info.labels)
    evaluation.write_reliability(workdir, split, lp_mix, y, t_mix)
  ablation = _photo_ablation(image_eval, image_params, log_probs, calibrated,
                             (t_text, t_image), alpha, num_classes)
  if reporting.is_writer():
    reporting.write_json(rundir.path(workdir, rundir.PHOTO_ABLATION),
                         {"model": "late", **ablation})
    reporting.write_json(rundir.path(workdir, rundir.RESULTS), results)
  return results


def _photo_ablation(image_eval, image_params, log_probs, calibrated,
                    temperatures, alpha, num_classes) -> dict[str, Any]:
  """``{split: {"with_photos", "photos_withheld"}}`` of the fused model.

  Withheld: the image member scores every product as one without a photo,
  the text member is unchanged, and the mix uses the same alpha and
  temperatures (see :mod:`mic_jax.tools.photo_ablation`).
  """
  t_text, t_image = temperatures
  out: dict[str, Any] = {}
  for split, (lp_text, _, labels) in log_probs.items():
    lp_image, _ = image_eval.predict(image_params, split, log_probs=True,
                                     withhold_images=True)
    p_text, p_image, _ = calibrated[split]
    without = metrics.fuse(calibration.scale(lp_text, t_text),
                           calibration.scale(lp_image, t_image), alpha)
    with_photos = metrics.fuse(p_text, p_image, alpha)
    out[split] = {
        name: evaluation.summarize(metrics.classification_report(
            labels, p.argmax(-1), num_classes))
        for name, p in (("with_photos", with_photos),
                        ("photos_withheld", without))}
  return out
