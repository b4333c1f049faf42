r"""Does a trained fused model use the photos? Score it with and without them.

  python -m mic_jax.tools.photo_ablation --workdir=runs/table2/cross_modal \
      [--splits=validation,test]

Restores the run's best checkpoint and evaluates each split twice: as
trained, and with every photo withheld (zero image, ``image/present = 0``,
exactly what the model sees for a product that has no photo). A fused
model whose figures do not move has learned to ignore the photos, however
well it scores: its gain over text-only comes from elsewhere. Prints a
markdown table and writes ``WORKDIR/photo_ablation.json``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import app
from absl import flags

from mic_jax.models import classifier
from mic_jax.train import checkpointing, evaluation, reporting, trainer

def photo_ablation(workdir: str, splits: Sequence[str] = ("validation", "test")
                   ) -> dict[str, Any]:
  """``{split: {"with_photos": {...}, "photos_withheld": {...}}}`` of a run.

  Each inner dict holds ``macro_f1``, ``micro_f1``, ``accuracy`` and
  ``num_examples`` of the best checkpoint. Also written as
  ``workdir/photo_ablation.json``.
  """
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
  evaluator = evaluation.Evaluator(run)
  results: dict[str, Any] = {"model": kind, "best_step": step}
  for split in splits:
    results[split] = {}
    for name, withhold in (("with_photos", False), ("photos_withheld", True)):
      results[split][name] = evaluation.summarize(evaluator.evaluate(
          params, split, withhold_images=withhold))
  if reporting.is_writer():
    reporting.write_json(os.path.join(workdir, "photo_ablation.json"),
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


def main(argv):
  del argv
  workdir, splits = flags.FLAGS.workdir, flags.FLAGS.splits
  results = photo_ablation(workdir, splits)
  print(f"{results['model']} run {workdir}, best step "
        f"{results['best_step']}\n")
  print(markdown(results, splits))


if __name__ == "__main__":
  # Defined only when run as a program: the library function above is
  # imported next to other tools (export) that own a --workdir flag too.
  flags.DEFINE_string("workdir", None, "A finished training run.")
  flags.DEFINE_list("splits", ["validation", "test"], "Splits to evaluate.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
