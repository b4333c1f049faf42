r"""What the photo contributes to a trained fused run (gate, per class, linear).

  python -m mic_jax.tools.photo_contribution --workdir=runs/hm/cross_modal \
      [--split=validation] [--photo_linear=runs/hm/linear_photo]

Prints the findings (see :mod:`mic_jax.analysis.contribution`) and writes
``WORKDIR/photo_contribution_<split>.{json,md,png}``. Validation is the
default split: findings that lead to a choice must not come from test.
"""

from __future__ import annotations

from absl import app
from absl import flags

from mic_jax import console

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program (other programs own --workdir)."""
  flags.DEFINE_string("workdir", None, "A finished fused training run.")
  flags.DEFINE_string("split", "validation", "The split to analyse.")
  flags.DEFINE_string("photo_linear", "", "A photo-only linear run "
                      "(mic_jax.reproduce's linear_photo) to compare with.")
  flags.mark_flag_as_required("workdir")
  console.define_verbose_flag()


def main(argv):
  del argv
  with console.session("photo_contribution", FLAGS.workdir,
                       verbose=console.verbose_requested()) as session:
    # pylint: disable=g-import-not-at-top
    from mic_jax.analysis import contribution
    # pylint: enable=g-import-not-at-top
    console.say("photo contribution  %s (%s; log: %s)", FLAGS.workdir,
                FLAGS.split, session.log_path)
    results = contribution.photo_contribution(
        FLAGS.workdir, FLAGS.split, FLAGS.photo_linear)
    for line in contribution.markdown(results).splitlines():
      console.say("%s", line)


def run():
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
