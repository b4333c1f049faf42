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

import json
import sys

from absl import app
from absl import flags

# pylint: disable=unused-import
from mic_jax.exporter import abstain_threshold
from mic_jax.exporter import data_dir_of
from mic_jax.exporter import export_run
from mic_jax.exporter import ExportError
from mic_jax.exporter import file_digests
from mic_jax.exporter import inference_fn
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
  flags.DEFINE_bool("overwrite", False, "Replace --output.")
  flags.DEFINE_bool("saved_model", False, "Also write a TF SavedModel "
                    "(jax2tf) for TF Serving.")
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  del argv
  try:
    manifest = export_run(FLAGS.workdir, FLAGS.output, step=FLAGS.step,
                          dtype=FLAGS.dtype,
                          target_precision=FLAGS.target_precision,
                          overwrite=FLAGS.overwrite,
                          saved_model=FLAGS.saved_model)
  except ExportError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({"output": FLAGS.output, "model": manifest["model"],
                    "platforms": manifest["platforms"],
                    "abstain": manifest["abstain"]}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
