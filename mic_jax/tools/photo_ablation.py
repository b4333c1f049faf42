r"""Does a trained fused model use the photos? Score it with and without them.

  python -m mic_jax.tools.photo_ablation --workdir=runs/table2/cross_modal \
      [--splits=validation,test]

Restores the run's best checkpoint and evaluates each split twice: as
trained, and with every photo withheld (zero image, ``image/present = 0``,
exactly what the model sees for a product that has no photo). A fused
model whose figures do not move has learned to ignore the photos, however
well it scores: its gain over text-only comes from elsewhere. Prints a
markdown table and writes ``WORKDIR/photo_ablation.json``.

Like the other programs the console shows only that; Orbax's, absl's and
TensorFlow's lines go to ``WORKDIR/photo_ablation.log`` (``--verbose``
shows them too).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from mic_jax import console
from mic_jax import hostmem

# The library is mic_jax.analysis.ablation (also used by
# mic_jax.reproduce); it is imported in main, after the console session
# sends TensorFlow's and JAX's start-up lines to the log file.

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The program's flags, defined only when it runs as a program: other
  programs (mic_jax.main) own a --workdir too, and a notebook may import
  several of them."""
  flags.DEFINE_string("workdir", None, "A finished training run.")
  flags.DEFINE_list("splits", ["validation", "test"], "Splits to evaluate.")
  flags.mark_flag_as_required("workdir")
  console.define_verbose_flag()
  hostmem.define_flag()


def main(argv):
  del argv
  workdir, splits = FLAGS.workdir, FLAGS.splits
  with console.session("photo_ablation", workdir,
                       verbose=console.verbose_requested()) as session:
    console.say("photo_ablation %s (log: %s)", workdir, session.log_path)
    # Before TensorFlow and JAX start their threads (see mic_jax/hostmem.py).
    hostmem.configure(hostmem.flag_value())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mic_jax.analysis import ablation  # pylint: disable=g-import-not-at-top
    results = ablation.photo_ablation(workdir, splits)
    console.say("%s run %s, best step %s\n", results["model"], workdir,
                results["best_step"])
    console.say("%s", ablation.markdown(results, splits))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
