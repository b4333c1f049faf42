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

from absl import app
from absl import flags

# The library (also used by mic_jax.reproduce); re-exported for callers.
from mic_jax.train.photo_ablation import markdown
from mic_jax.train.photo_ablation import photo_ablation

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The program's flags, defined only when it runs as a program: other
  programs (mic_jax.main) own a --workdir too, and a notebook may import
  several of them."""
  flags.DEFINE_string("workdir", None, "A finished training run.")
  flags.DEFINE_list("splits", ["validation", "test"], "Splits to evaluate.")
  flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  workdir, splits = FLAGS.workdir, FLAGS.splits
  results = photo_ablation(workdir, splits)
  print(f"{results['model']} run {workdir}, best step "
        f"{results['best_step']}\n")
  print(markdown(results, splits))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
