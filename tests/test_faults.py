"""Fault injection: a run killed anywhere, or left with broken checkpoints,
ends exactly like a run never interrupted.

Kill anywhere: ``python -m mic_jax.main`` on a tiny demo-sized run (6 steps,
evaluations every 2, state saves every 3, so an evaluation falls between
saves) is SIGKILLed at named moments through ``MIC_JAX_FAULT`` (see
``mic_jax/train/faults.py``), each time started again with the same command,
until it finishes. Its final params, best params, ``results.json`` and
``metrics.jsonl`` (every logged step once, same values) must equal those of
one uninterrupted run. Each launch must die by SIGKILL at its point (so the
chain really visits it).

Corrupt files: the latest state step truncated or with a file deleted; the
rerun warns, moves it aside, resumes from the previous step and ends with
the same params as the intact run.
"""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from mic_jax import trainer
from mic_jax.train import checkpointing, faults

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The demo data set, made once and shared by every run of this module."""
  from mic_jax.data import demo  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("fault_data")
  return demo.ensure_demo_dataset(root / "demo", max_length=16, image_size=32,
                                  seed=0)


# Titles of the demo are 5..7 tokens: buckets 6 and 16 both get batches.
BUCKETS = ["--config.data.length_buckets=6,16"]


def _command(data_dir, workdir, extra=()):
  return [sys.executable, "-m", "mic_jax.main",
          "--config=configs/cross_modal.py:demo", f"--workdir={workdir}",
          "--config.data.demo=False", f"--config.data.dir={data_dir}",
          f"--config.total_steps={TOTAL_STEPS}", "--config.batch_size=8",
          "--config.log_every_steps=1", "--config.eval_every_steps=2",
          "--config.checkpoint_every_steps=3", "--config.keep_checkpoints=3",
          "--config.data.eval_batch_size=64", *extra]


def _launch(data_dir, workdir, fault=None, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop(faults.ENV, None)
  if fault:
    env[faults.ENV] = fault
  # The timeout only catches a hang: a launch takes ~30 s on a free 2-core
  # CPU (raise MIC_JAX_TEST_TIMEOUT on a machine shared with other jobs).
  return subprocess.run(_command(data_dir, workdir, extra), env=env, cwd=REPO,
                        timeout=int(os.environ.get("MIC_JAX_TEST_TIMEOUT",
                                                   "600")),
                        capture_output=True)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """One uninterrupted run of the same command."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  proc = _launch(data_dir, workdir)
  assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
  return workdir


def _restore(workdir, sub):
  """(step, tree) of the latest state or the best params of a run."""
  checkpoints = checkpointing.RunCheckpoints(str(workdir), keep=1)
  if sub == "best":
    step, manager = checkpoints.best_step(), checkpoints.best
  else:
    step, manager = checkpoints.latest_step(), checkpoints.latest
  tree = manager.restore(step)
  checkpoints.close()
  return step, tree


def _assert_same_run(got, want):
  assert (got / "results.json").read_bytes() == (
      want / "results.json").read_bytes()
  for sub in ("checkpoints", "best"):
    step_a, tree_a = _restore(got, sub)
    step_b, tree_b = _restore(want, sub)
    assert step_a == step_b, sub
    leaves_a = jax.tree_util.tree_flatten_with_path(tree_a)[0]
    leaves_b = jax.tree.leaves(tree_b)
    assert len(leaves_a) == len(leaves_b)
    for (path, a), b in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                    err_msg=f"{sub} {jax.tree_util.keystr(path)}")
  # Every logged step once, with the same values (timings aside).
  timing = ("train/steps_per_sec", "train/examples_per_sec", "eta_seconds")

  def records(workdir):
    lines = [json.loads(l) for l in
             (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in l.items() if k not in timing} for l in lines]

  got_records, want_records = records(got), records(want)
  for kind in ("train/loss", "validation/macro_f1"):
    steps = [r["step"] for r in got_records if kind in r]
    assert len(steps) == len(set(steps)), (kind, steps)
  key = lambda r: (r["step"], "train/loss" in r)
  assert sorted(got_records, key=key) == sorted(want_records, key=key)


def _kill_chain(data_dir, workdir, points, extra=()):
  """Kills one launch at each point in turn, then lets one finish."""
  for point in points:
    proc = _launch(data_dir, workdir, fault=f"{point}:KILL", extra=extra)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, (
        f"{point}: exit {proc.returncode}, not killed there:\n{err[-3000:]}")
    assert f"{faults.ENV}: KILL at {point.split(':')[0]}" in err
  proc = _launch(data_dir, workdir, extra=extra)
  assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]


def test_killed_between_and_during_saves_and_eval_ends_identical(
    data_dir, reference, tmp_path):
  """Kill between a best save and the state save, during an asynchronous
  state save, during an evaluation."""
  workdir = tmp_path / "run"
  _kill_chain(data_dir, workdir, ["before_state_save:1", "state_saving:1",
                                  "eval_batch:8"])
  _assert_same_run(workdir, reference)


@pytest.fixture(scope="module")
def bucketed_reference(data_dir, tmp_path_factory):
  """One uninterrupted run in length buckets."""
  workdir = tmp_path_factory.mktemp("bucketed_reference") / "run"
  proc = _launch(data_dir, workdir, extra=BUCKETS)
  assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["length_buckets"] == "6,16"
  return workdir


def test_killed_in_length_buckets_ends_identical(data_dir, bucketed_reference,
                                                 tmp_path):
  """Kill between steps and during a state save of a bucketed run: the
  bucket schedule and each bucket's stream resume exactly."""
  workdir = tmp_path / "run"
  _kill_chain(data_dir, workdir, ["after_step:4", "state_saving:1"],
              extra=BUCKETS)
  _assert_same_run(workdir, bucketed_reference)


@pytest.mark.slow
def test_killed_at_nine_more_moments_ends_identical(data_dir, reference,
                                                    tmp_path):
  """During the first best save, between steps, after an evaluation is
  logged, during a later best save, between the last best save and the last
  state save, during the last state save, after training, during the final
  report, after results.json."""
  workdir = tmp_path / "run"
  _kill_chain(data_dir, workdir, [
      "best_saving:1", "after_step:2", "after_eval:2", "best_saving:3",
      "before_state_save:1",
      "state_saving:1", "trained:1", "eval_batch:9", "after_results:1"])
  _assert_same_run(workdir, reference)


# ------------------------------------------------------ corrupt files --


def _config(data_dir):
  config = common.make_config("cross_modal", "demo")
  with config.unlocked():
    config.data.demo, config.data.dir = False, str(data_dir)
    config.total_steps, config.batch_size = 4, 8
    config.log_every_steps, config.eval_every_steps = 2, 100
    config.checkpoint_every_steps, config.keep_checkpoints = 2, 3
  return config


@pytest.fixture(scope="module")
def intact(data_dir, tmp_path_factory):
  """An in-process 4-step run with state steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("intact") / "run"
  trainer.train_and_evaluate(_config(data_dir), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
  return workdir


def _truncate_largest(step_dir):
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)


def _delete_data(step_dir):
  for p in step_dir.rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.unlink()


@pytest.mark.parametrize("damage", [_truncate_largest, _delete_data],
                         ids=["truncated", "deleted"])
def test_broken_latest_step_falls_back_to_previous(damage, data_dir, intact,
                                                   tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(intact, workdir)
  damage(workdir / "checkpoints" / "4")
  (workdir / "results.json").unlink()
  with caplog.at_level(logging.WARNING):
    results = trainer.train_and_evaluate(_config(data_dir), str(workdir))
  assert "checkpoint step 4" in caplog.text and "unusable" in caplog.text
  moved = list((workdir / "corrupt_checkpoints").iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["4"]
  assert results == json.loads((intact / "results.json").read_text())
  _, params = _restore(workdir, "checkpoints")
  _, want = _restore(intact, "checkpoints")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_restorable_step_is_an_error_and_moves_nothing(data_dir, intact,
                                                          tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(intact, workdir)
  for step in ("2", "4"):
    _delete_data(workdir / "checkpoints" / step)
  with pytest.raises(RuntimeError, match="(?s)no restorable train state "
                     ".*step 4.*step 2.*nothing was moved"):
    trainer.train_and_evaluate(_config(data_dir), str(workdir))
  assert not (workdir / "corrupt_checkpoints").exists()
