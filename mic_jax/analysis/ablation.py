"""Does a trained fused model use the photos? Its figures without them.

Restores a run's best checkpoint and evaluates each split twice: as
trained, and with every photo withheld (zero image, ``image/present = 0``,
exactly what the model sees for a product that has no photo). A fused
model whose figures do not move has learned to ignore the photos, however
well it scores. The program is ``python -m mic_jax.tools.photo_ablation``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from mic_jax import trainer
from mic_jax.evaluation import evaluation, reporting
from mic_jax.models import classifier
from mic_jax.train import checkpointing, rundir

WAYS = (("with_photos", False), ("photos_withheld", True))


@dataclasses.dataclass(frozen=True)
class BestModel:
  """A fused run's best checkpoint, ready to score (feature cache attached)."""
  run: trainer.Run
  step: int
  params: Any
  evaluator: evaluation.Evaluator

  def reports(self, split: str) -> dict[str, dict[str, Any]]:
    """``{"with_photos": report, "photos_withheld": report}`` of ``split``."""
    return {name: self.evaluator.evaluate(self.params, split,
                                          withhold_images=withhold)
            for name, withhold in WAYS}


def restore_best(workdir: str) -> BestModel:
  """The best checkpoint of a run whose model reads photos."""
  config = reporting.read_config(workdir)
  kind = config.model.kind
  if not classifier.uses_image(kind):  # text_only, or late (two runs).
    raise ValueError(f"{workdir} is a {kind!r} run; the photo ablation needs "
                     "one model that reads photos (image_only, early, "
                     "cross_modal)")
  run = trainer.build_run(config, workdir)
  checkpoints = checkpointing.RunCheckpoints(workdir, keep=1,
                                             async_save=False)
  try:
    step, params = checkpoints.restore_best(run.abstract_state.params)
  finally:
    checkpoints.close()
  trainer.attach_image_features(run, params)
  return BestModel(run, step, params, evaluation.Evaluator(run))


def photo_ablation(workdir: str, splits: Sequence[str] = ("validation", "test")
                   ) -> dict[str, Any]:
  """``{split: {"with_photos": {...}, "photos_withheld": {...}}}`` of a run.

  Each inner dict holds ``macro_f1``, ``micro_f1``, ``accuracy`` and
  ``num_examples`` of the best checkpoint. Also written as
  ``workdir/photo_ablation.json``.
  """
  best = restore_best(workdir)
  results: dict[str, Any] = {"model": best.run.config.model.kind,
                             "best_step": best.step}
  for split in splits:
    results[split] = {name: evaluation.summarize(report)
                      for name, report in best.reports(split).items()}
  if reporting.is_writer():
    reporting.write_json(rundir.path(workdir, rundir.PHOTO_ABLATION),
                         results)
  return results


def markdown(results: dict[str, Any], splits: Sequence[str]) -> str:
  """One row per split: macro-F1 and accuracy with and without photos."""
  lines = ["| split | macro-F1 with photos | photos withheld | accuracy with "
           "photos | photos withheld |", "|---|---:|---:|---:|---:|"]
  for split in splits:
    a, b = results[split]["with_photos"], results[split]["photos_withheld"]
    lines.append(f"| {split} | {a['macro_f1']:.3f} | {b['macro_f1']:.3f} | "
                 f"{a['accuracy']:.3f} | {b['accuracy']:.3f} |")
  return "\n".join(lines)
