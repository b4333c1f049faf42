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
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mic_jax import console
from mic_jax import hostmem

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally with ':argument'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and results "
    "(local or gs://).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() before anything "
    "else (Cloud TPU pods detect their peers; GPU/CPU clusters also need "
    "--coordinator_address, --num_processes, --process_id).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (non-TPU clusters).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (non-TPU).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (non-TPU).")
flags.mark_flags_as_required(["config", "workdir"])
console.define_verbose_flag()
hostmem.define_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  process = _PROCESS_ID.value
  log_name = "train.log" if not process else f"train.process{process}.log"
  with console.session("train", _WORKDIR.value, log_name=log_name,
                       verbose=console.verbose_requested()):
    _train()


def _train():
  # Before TensorFlow and JAX start their threads (see mic_jax/hostmem.py).
  allocator = hostmem.configure(hostmem.flag_value())
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # tf.data must not grab the accelerators JAX is about to use.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top
  if _MULTIHOST.value or _COORDINATOR.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  console.say("JAX process %d/%d, %d local / %d global devices (%s)",
              jax.process_index(), jax.process_count(),
              jax.local_device_count(), jax.device_count(),
              jax.devices()[0].platform)
  logging.info("host allocator: %s", allocator)
  # pylint: disable=g-import-not-at-top
  from mic_jax.train import late_fusion, summary, trainer
  # pylint: enable=g-import-not-at-top
  # Late fusion is two runs and a mix, above the trainer; the rest is one.
  train = (late_fusion.run if _CONFIG.value.model.kind == "late"
           else trainer.train_and_evaluate)
  try:
    results = train(_CONFIG.value, _WORKDIR.value)
  except trainer.TrainingError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  summary.end(results, _WORKDIR.value)


def run():
  """Console-script entry point (``mic-jax-train``, ``mic-jax``)."""
  app.run(main)


if __name__ == "__main__":
  run()
