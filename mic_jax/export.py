r"""Exports a trained run as a self-contained serving directory.

  python -m mic_jax.export --workdir=runs/cross_modal --output=exports/v1 \
      [--step=N] [--dtype=float32|bfloat16] [--target_precision=0.95]

A thin program: flags, then one call of :func:`mic_jax.exporter.export_run`
(the export logic, importable without flags); the bundle's format is owned
by :mod:`mic_jax.serving.bundle`. The exporter's public names stay
importable from here. Flags are defined only when this runs as a program,
so importing it beside other programs (main, the tools) defines none.
"""


from __future__ import annotations

import pathlib
import sys
from typing import Any

from absl import app
from absl import flags

from mic_jax import console
# pylint: disable=unused-import
from mic_jax.exporter import abstain_threshold
from mic_jax.exporter import data_dir_of
from mic_jax.exporter import export_run
from mic_jax.exporter import ExportError
from mic_jax.exporter import file_digests
from mic_jax.exporter import inference_fn
from mic_jax.exporter import MANIFEST
from mic_jax.exporter import read_calibration
from mic_jax.exporter import restore
from mic_jax.exporter import tempered
from mic_jax.exporter import write_params
from mic_jax.exporter import write_saved_model
# pylint: enable=unused-import

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The trained run.")
  flags.DEFINE_string("output", None, "The export directory.")
  flags.DEFINE_integer("step", None, "A step of checkpoints/ instead of the "
                       "best checkpoint.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Parameter dtype of the export.")
  flags.DEFINE_float("target_precision", 0.95, "Precision the abstain "
                     "threshold aims for on validation.")
  flags.DEFINE_bool("overwrite", False, "Replace --output if it is an export "
                    "bundle (never a run directory or other files).")
  flags.DEFINE_bool("saved_model", False, "Also write a TF SavedModel "
                    "(jax2tf) for TF Serving.")
  flags.mark_flags_as_required(["workdir", "output"])
  console.define_verbose_flag()


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output)
  # The export directory holds only what its manifest lists: the log sits
  # beside it (exports/v1 -> exports/v1.log).
  with console.session("export", out.parent, log_name=f"{out.name}.log",
                       verbose=console.verbose_requested()) as session:
    console.say("export   %s (%s) -> %s (log: %s)", FLAGS.workdir,
                "best checkpoint" if FLAGS.step is None
                else f"checkpoints/{FLAGS.step}", out, session.log_path)
    try:
      manifest = export_run(FLAGS.workdir, FLAGS.output, step=FLAGS.step,
                            dtype=FLAGS.dtype,
                            target_precision=FLAGS.target_precision,
                            overwrite=FLAGS.overwrite,
                            saved_model=FLAGS.saved_model)
    except ExportError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    report(manifest, out)


def report(manifest: dict[str, Any], out: pathlib.Path) -> None:
  """What was exported, for the console: files, abstain rule, metrics."""
  files = manifest["files"]
  size = sum(f["bytes"] for f in files.values())
  tops = sorted({name.split("/")[0] + ("/" if "/" in name else "")
                 for name in files})
  console.say("wrote    %s (%.1f MB): %s, %s", out, size / 2**20,
              ", ".join(tops), MANIFEST)
  console.say("serves   %s on %s, %s parameters, temperature %.3f",
              manifest["model"], ", ".join(manifest["platforms"]),
              manifest["params_dtype"],
              manifest["calibration"]["temperature"])
  abstain = manifest["abstain"]
  if abstain["validation_precision"] is None:
    console.say("abstain  below %.3f (no validation precision)",
                abstain["threshold"])
  else:
    console.say("abstain  below probability %.3f: validation precision "
                "%.3f, coverage %.3f", abstain["threshold"],
                abstain["validation_precision"],
                abstain["validation_coverage"])
  console.results_table(manifest["metrics"])


def run():
  """Console-script entry point (``mic-jax-export``)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
