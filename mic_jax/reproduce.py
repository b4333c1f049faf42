r"""Trains the paper's five systems on one prepared data set: Table 2.

  python -m mic_jax.reproduce --preset=small --data_dir=PREPARED \
      --workdir=runs/table2 [--set=total_steps=1500 --set=seed=1]

Writes ``WORKDIR/<system>/`` (a normal run each; late fusion reuses the
text-only and image-only runs) and ``WORKDIR/table2.md``, a markdown table of
validation and test macro-F1 and accuracy. Finished runs (with a
``results.json``) are not trained again, so an interrupted reproduction
continues where it stopped.

Besides the paper's five systems the table has

* the linear anchors a practitioner tries first
  (:mod:`mic_jax.baselines.linear_baseline`): logistic regression on the title's
  TF-IDF (word 1-2 grams), on the frozen photo tower's class token, and on
  both side by side; every deep row must beat them. The photo rows need a
  pretrained, frozen photo tower (they read the shared feature cache);
  without one they are left out;
* for every fused system, its test macro-F1 with every photo withheld
  (:mod:`mic_jax.tools.photo_ablation`): how much the photos count;
* a cross-modal model trained with every photo withheld
  (``model.image_dropout=1``): the same architecture without photos, which
  separates the extra attention layer's gain from the photos' gain.

With a pretrained photo tower (``--set=image.checkpoint=DIR
--set=image.size=112 --set=optim.freeze=img``) the frozen tower's outputs
are computed once and shared by every system (see README).
"""

from __future__ import annotations

import dataclasses
import importlib
import os

from absl import app
from absl import flags
from absl import logging

from configs import common
from mic_jax import console
from mic_jax import hostmem
from mic_jax.train import rundir


@dataclasses.dataclass(frozen=True)
class System:
  """One row of the table."""
  name: str          # Row label.
  module: str        # configs/<module>.py, or "linear" (arg: the features).
  subdir: str        # Run directory under the root.
  arg: str = ""      # Extra config argument, e.g. "image=bit".
  overrides: tuple[tuple[str, object], ...] = ()

  @property
  def fused(self) -> bool:
    return self.module in ("late_fusion", "early_fusion", "cross_modal")


SYSTEMS = (
    System("Title TF-IDF + logistic regression", "linear", "title_baseline",
           arg="title"),
    System("Photo class token + logistic regression", "linear",
           "linear_photo", arg="photo"),
    System("Title TF-IDF + photo class token, one logistic regression",
           "linear", "linear_title_photo", arg="title+photo"),
    System("Text-BERT", "text_only", "text_only"),
    System("Image-ViT", "image_only", "image_only"),
    System("Fusion-late", "late_fusion", "late_fusion"),
    System("Fusion-early", "early_fusion", "early_fusion"),
    System("Fusion cross-modal", "cross_modal", "cross_modal"),
    System("Fusion cross-modal, photos withheld in training", "cross_modal",
           "cross_modal_no_photos", overrides=(("model.image_dropout", 1.0),)),
)
IMAGE_ONLY = next(s for s in SYSTEMS if s.subdir == "image_only")
BIT = System("Image-BiT", "image_only", "image_only_bit", arg="image=bit")

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The program's flags; defined only when run as a program, so importing
  this module beside other programs (export, main) defines no flag twice."""
  flags.DEFINE_enum("preset", "small", ["paper", "small", "demo"],
                    "Config preset for every system.")
  flags.DEFINE_string("data_dir", "", "Prepared data (data_prep output); empty "
                      "only for the demo preset.")
  flags.DEFINE_string("workdir", None, "Root of the runs.")
  flags.DEFINE_bool("with_bit", False, "Also train image-only BiT.")
  flags.DEFINE_multi_string("set", [], "Config overrides KEY=VALUE applied to "
                            "every system, e.g. seed=1.")
  flags.DEFINE_list("systems", [], "Only these run directories (e.g. "
                    "text_only,title_baseline); default: all.")
  flags.DEFINE_bool("ablate_photos", True, "Score every fused system with its "
                    "photos withheld too.")
  console.define_verbose_flag()
  hostmem.define_flag()


def parse_value(old: object, text: str) -> object:
  """``text`` as the type of the field it overrides."""
  if isinstance(old, bool):
    return text.lower() in ("1", "true", "yes")
  return type(old)(text)


def system_config(system: System, preset: str, data_dir: str, root: str,
                  sets: list[str]):
  """The full config of one system: preset, data, overrides."""
  arg = ",".join(filter(None, [preset, system.arg]))
  config = importlib.import_module(f"configs.{system.module}").get_config(arg)
  with config.unlocked():
    if data_dir:
      config.data.dir = data_dir
      config.data.demo = False
    if system.module == "late_fusion":
      config.late.text_workdir = os.path.join(root, "text_only")
      config.late.image_workdir = os.path.join(root, "image_only")
  for item in sets:
    key, value = item.split("=", 1)
    common.override(config, key, parse_value(common.get_field(config, key),
                                             value))  # Raises on a typo.
  for key, value in system.overrides:
    common.override(config, key, value)
  return config


def photo_rows_possible(config) -> bool:
  """Whether the photo linear rows can run: a pretrained tower, frozen and
  cached (what :func:`mic_jax.baselines.linear_baseline.photo_vectors`
  reads)."""
  config = common.resolve_auto(config)
  return bool(config.image.checkpoint and config.image.cache_features and
              common.freezes_image_tower(config))


def run_system(system: System, root: str) -> dict:
  """Trains (unless finished) and returns the system's results.json."""
  # pylint: disable=g-import-not-at-top
  from mic_jax import trainer
  from mic_jax.baselines import late_fusion, linear_baseline
  # pylint: enable=g-import-not-at-top
  workdir = os.path.join(root, system.subdir)
  if not rundir.has_results(workdir):
    console.say("=== %s -> %s", system.name, workdir)
    if system.module == "linear":
      # The photo rows read the image-only system's frozen tower.
      photo = system_config(IMAGE_ONLY, FLAGS.preset, FLAGS.data_dir, root,
                            FLAGS.set)
      # They read the frozen tower's own output (its class token), also
      # when the deep rows fine-tune its top blocks.
      common.override(photo, "image.train_top_blocks", 0)
      data_dir = trainer.resolve_data(photo, workdir)[0]
      linear_baseline.train_and_evaluate(
          data_dir, workdir, features=system.arg,
          photo_config=photo if "photo" in system.arg else None)
    else:
      config = system_config(system, FLAGS.preset, FLAGS.data_dir, root,
                             FLAGS.set)
      # Late fusion is two runs and a mix, above the trainer.
      train = (late_fusion.run if config.model.kind == "late"
               else trainer.train_and_evaluate)
      train(config, workdir)
  return rundir.read_results(workdir)


def photo_ablation(system: System, root: str) -> dict | None:
  """Test figures of a fused run with every photo withheld (cached)."""
  if not (system.fused and FLAGS.ablate_photos):
    return None
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from mic_jax.analysis import ablation
  # pylint: enable=g-import-not-at-top
  workdir = os.path.join(root, system.subdir)
  if tf.io.gfile.exists(rundir.path(workdir, rundir.PHOTO_ABLATION)):
    return rundir.read_json(workdir, rundir.PHOTO_ABLATION)
  if system.module == "late_fusion":
    return None  # Written by the late-fusion run itself.
  return ablation.photo_ablation(workdir)


def markdown(rows: list[tuple[System, dict, dict | None]]) -> str:
  """The table: one row per system, photo-ablation column for fused ones."""
  lines = ["| Model | val macro-F1 | test macro-F1 | test accuracy | test "
           "macro-F1, photos withheld |", "|---|---:|---:|---:|---:|"]
  for system, r, ablation in rows:
    extra = f" (alpha={r['alpha']:.2f})" if "alpha" in r else ""
    withheld = (f"{ablation['test']['photos_withheld']['macro_f1']:.3f}"
                if ablation and "test" in ablation else "")
    lines.append(f"| {system.name}{extra} | {r['validation']['macro_f1']:.3f}"
                 f" | {r['test']['macro_f1']:.3f} | "
                 f"{r['test']['accuracy']:.3f} | {withheld} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  with console.session("reproduce", FLAGS.workdir,
                       verbose=console.verbose_requested()) as session:
    console.say("reproduce  preset %s, data %s -> %s (log: %s)", FLAGS.preset,
                FLAGS.data_dir or "built-in demo", FLAGS.workdir,
                session.log_path)
    _reproduce()


def _reproduce():
  # Before TensorFlow and JAX start their threads (see mic_jax/hostmem.py).
  logging.info("host allocator: %s", hostmem.configure(hostmem.flag_value()))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = FLAGS.workdir
  tf.io.gfile.makedirs(root)
  systems = list(SYSTEMS) + ([BIT] if FLAGS.with_bit else [])
  known = {s.subdir for s in systems}
  unknown = sorted(set(FLAGS.systems) - known)
  if unknown:
    raise app.UsageError(f"unknown --systems {unknown}; known: "
                         f"{sorted(known)}")
  if FLAGS.systems:
    systems = [s for s in systems if s.subdir in FLAGS.systems]
  elif not photo_rows_possible(system_config(
      IMAGE_ONLY, FLAGS.preset, FLAGS.data_dir, root, FLAGS.set)):
    console.say("photo linear rows left out: they need a pretrained, frozen "
                "photo tower (--set=image.checkpoint=DIR)")
    systems = [s for s in systems
               if not (s.module == "linear" and "photo" in s.arg)]
  rows = []
  for system in systems:
    results = run_system(system, root)
    rows.append((system, results, photo_ablation(system, root)))
    console.say("%s: validation macro-F1 %.4f, test macro-F1 %.4f (%s)",
                system.name, results["validation"]["macro_f1"],
                results["test"]["macro_f1"], os.path.join(root, system.subdir))
  table = markdown(rows)
  name = "table2.md" if not FLAGS.systems else "table2_partial.md"
  with tf.io.gfile.GFile(os.path.join(root, name), "w") as f:
    f.write(table)
  console.say("wrote    %s", os.path.join(root, name))
  for line in table.splitlines():
    console.say("%s", line)


def run():
  """Console-script entry point (``mic-jax-reproduce``)."""
  _define_flags()
  flags.mark_flag_as_required("workdir")
  app.run(main)


if __name__ == "__main__":
  run()
