r"""Trains and evaluates one mic_jax system.

  python -m mic_jax.main --config=configs/cross_modal.py:demo --workdir=/tmp/demo
  python -m mic_jax.main --config=configs/cross_modal.py:small \
      --config.data.dir=PREPARED --workdir=runs/cross_modal

On a Cloud TPU pod slice or a multi-host GPU/CPU cluster, run the same command
on every host; ``jax.distributed`` is initialised when ``--multihost`` is set
(TPU VMs find their peers themselves; other clusters pass the coordinator).
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mic_jax import console
from mic_jax import hostmem

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines this program's flags (when it runs, never on import)."""
  config_flags.DEFINE_config_file(
      "config", None, "A configs/*.py file, optionally with ':argument'.",
      lock_config=True)
  flags.DEFINE_string(
      "workdir", None, "Directory for checkpoints, logs and results "
      "(local or gs://).")
  flags.DEFINE_bool(
      "multihost", False, "Call jax.distributed.initialize() before anything "
      "else (Cloud TPU pods detect their peers; GPU/CPU clusters also need "
      "--coordinator_address, --num_processes, --process_id).")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (non-TPU clusters).")
  flags.DEFINE_integer("num_processes", None,
                       "Number of processes (non-TPU).")
  flags.DEFINE_integer("process_id", None,
                       "This process's index (non-TPU).")
  flags.mark_flags_as_required(["config", "workdir"])
  console.define_verbose_flag()
  hostmem.define_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_config()  # Before the workdir, its log and JAX exist.
  process = FLAGS.process_id
  log_name = "train.log" if not process else f"train.process{process}.log"
  with console.session("train", FLAGS.workdir, log_name=log_name,
                       verbose=console.verbose_requested()):
    _train()


# Where the configs shipped with mic_jax live (listed when --config is wrong).
_REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def config_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The runnable configs in ``directory``: files that define get_config."""
  if not directory.is_dir():
    return []
  return sorted(p for p in directory.glob("*.py")
                if "def get_config" in p.read_text(encoding="utf-8",
                                                   errors="replace"))


def _short(path: pathlib.Path) -> str:
  """``path`` relative to the working directory when below it."""
  relative = os.path.relpath(path)
  return str(path) if relative.startswith("..") else relative


def _check_config() -> None:
  """Exits with one line when --config names no file or fails to load.

  ml_collections keeps a load error until the config is first read, which
  happens after the workdir is created and JAX has started, and then
  prints two chained tracebacks; a typo deserves one line instead.
  """
  given = FLAGS["config"].config_filename
  path = pathlib.Path(given.split(":", 1)[0])
  if not path.is_file():
    shown = config_files(path.parent)
    if not shown:  # E.g. run from elsewhere: the repository's configs.
      shown = config_files(_REPO_CONFIGS)
    names = ", ".join(str(path.parent / p.name) if path.parent.is_dir()
                      else _short(p) for p in shown)
    sys.exit(f"error: --config: no file {path}; the configs are: "
             f"{names or 'none found'}")
  try:
    FLAGS.config.get("model")
  except OSError as e:  # The file exists but could not be read.
    reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    sys.exit(f"error: --config: cannot load {path}: {reason}")


def _train():
  # Before TensorFlow and JAX start their threads (see mic_jax/hostmem.py).
  allocator = hostmem.configure(hostmem.flag_value())
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # tf.data must not grab the accelerators JAX is about to use.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.multihost or FLAGS.coordinator_address:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  console.say("JAX process %d/%d, %d local / %d global devices (%s)",
              jax.process_index(), jax.process_count(),
              jax.local_device_count(), jax.device_count(),
              jax.devices()[0].platform)
  logging.info("host allocator: %s", allocator)
  # pylint: disable=g-import-not-at-top
  from mic_jax import trainer
  from mic_jax.baselines import late_fusion
  from mic_jax.train import summary
  # pylint: enable=g-import-not-at-top
  # Late fusion is two runs and a mix, above the trainer; the rest is one.
  train = (late_fusion.run if FLAGS.config.model.kind == "late"
           else trainer.train_and_evaluate)
  try:
    results = train(FLAGS.config, FLAGS.workdir)
  except trainer.TrainingError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  summary.end(results, FLAGS.workdir)


def run():
  """Console-script entry point (``mic-jax-train``, ``mic-jax``)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
