"""Two JAX processes on one machine train exactly like one process.

``python -m mic_jax.main`` runs twice with ``--coordinator_address`` (4 fake
CPU devices each, 8 global), as it would on two hosts of a pod slice. Each
process reads its own part of the data (``pipeline.train_batches`` with its
``process_index``); the reference is this single process with 8 devices fed
the two host streams side by side as one global batch. Equal losses show
that global-batch assembly, the sharded step and its collectives are the
same computation; the eval count shows every example is scored exactly
once across hosts; the files show only process 0 writes.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from mic_jax import sharding as shd
from mic_jax.data import pipeline
from mic_jax.train import checkpointing, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
BATCH = 16

pytestmark = pytest.mark.needs_8_devices


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  workdir = tmp_path / "two"
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  args = [sys.executable, "-m", "mic_jax.main",
          "--config=configs/cross_modal.py:demo", f"--workdir={workdir}",
          f"--config.total_steps={STEPS}", f"--config.batch_size={BATCH}",
          "--config.log_every_steps=1", "--config.eval_every_steps=1000",
          f"--config.checkpoint_every_steps={STEPS}",
          f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  procs = [subprocess.Popen(args + [f"--process_id={i}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out.decode(errors="replace"))
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
    assert f"JAX process {i}/2, 4 local / 8 global devices" in out

  lines = [json.loads(l) for l in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/loss" in l]
  # Written by process 0 alone: one line per step, no duplicates.
  assert [l["step"] for l in train] == list(range(1, STEPS + 1))
  results = json.loads((workdir / "results.json").read_text())
  data_dir = workdir / "demo_data" / "prepared"
  info = pipeline.DatasetInfo.load(str(data_dir))
  for split in ("validation", "test"):
    assert results[split]["num_examples"] == info.split_size(split)

  # The same steps in this process: 8 devices, the hosts' batches side by side.
  config = common.make_config("cross_modal", "demo")
  with config.unlocked():
    config.data.demo, config.data.dir = False, str(data_dir)
    config.total_steps, config.batch_size = STEPS, BATCH
  run = trainer.build_run(config, str(tmp_path / "one"))
  state, _ = trainer.init_state(run, checkpointing.RunCheckpoints(
      str(tmp_path / "one"), keep=1, async_save=False))
  hosts = [pipeline.train_batches(str(data_dir), batch_size=BATCH // 2,
                                  image_size=config.image.size, seed=0,
                                  process_index=i, process_count=2)
           for i in range(2)]
  step = trainer.jit_train_step(run)
  sharding = shd.batch_sharding(run.mesh, run.rules)
  losses = []
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    for _ in range(STEPS):
      parts = [next(h) for h in hosts]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      state, metrics = step(state, shd.host_to_global(batch, sharding))
      losses.append(float(metrics["train/loss"]))
  np.testing.assert_allclose([l["train/loss"] for l in train], losses,
                             rtol=1e-5)
