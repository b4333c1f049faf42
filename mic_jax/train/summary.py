"""The console lines of a training run: what it is about to do, what it got.

The start summary says where the run stands (devices and mesh, the model
and its parameters per tower, the data, where outputs go); the end prints
the results of the best checkpoint as a small table and the files written.
The detail (every parameter's shape and sharding, library logs) is in the
run's log file; see :mod:`mic_jax.console`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import jax

from mic_jax import console

# What a run writes into its workdir, in the order a person looks for it.
OUTPUTS = ("results.json", "metrics.jsonl", "per_class_*.csv",
           "top_confusions_*.csv", "*.png",
           "calibration.json", "config.json", "checkpoints/", "best/")


TOWER_ORDER = ("txt", "img", "fusion", "head")


def parameters_per_tower(params: Any) -> dict[str, int]:
  """Parameter count of each top-level tower, in the order data flows."""
  rank = {name: i for i, name in enumerate(TOWER_ORDER)}
  return {name: sum(math.prod(x.shape) for x in jax.tree.leaves(params[name]))
          for name in sorted(params, key=lambda n: (rank.get(n, 99), n))}


def start(run: Any, how: str, start_step: int) -> None:
  """The start summary of a run (process 0 and others alike)."""
  config, mesh, info = run.config, run.mesh, run.info
  towers = parameters_per_tower(run.abstract_state.params)
  total = sum(towers.values())
  per_tower = ", ".join(f"{k} {console.count(v)}" for k, v in towers.items())
  splits = ", ".join(f"{s} {info.split_size(s):,}"
                     for s in ("train", "validation", "test")
                     if info.has_split(s))
  data = "built-in demo" if config.data.demo else run.data_dir
  session = console.active()
  console.say("mesh     %s over %d %s device(s)",
              " ".join(f"{k}={v}" for k, v in mesh.shape.items()),
              mesh.devices.size, jax.devices()[0].platform)
  console.say("model    %s: %s parameters (%s)", config.model.kind,
              console.count(total), per_tower)
  console.say("data     %s: %d classes; %s", data, info.num_classes, splits)
  console.say("train    steps %d..%d, batch %d, state %s", start_step,
              config.total_steps, config.batch_size, how)
  console.say("outputs  %s%s", run.workdir,
              f" (log: {session.log_path})" if session else "")


def evaluation_line(step: int, report: Mapping[str, Any]) -> None:
  console.say("step %d validation macro-F1 %.4f accuracy %.4f", step,
              report["macro_f1"], report["accuracy"])


def end(results: Mapping[str, Any], workdir: str) -> None:
  """The paths written, then the results table (the run's last lines)."""
  written = []
  local = None if "://" in workdir else workdir
  for pattern in OUTPUTS:
    if local is None or _exists(local, pattern):
      written.append(pattern)
  session = console.active()
  if session and local and (os.path.abspath(session.log_path.parent) ==
                            os.path.abspath(local)):
    written.append(session.log_path.name)
  console.say("wrote    %s: %s", workdir, ", ".join(written))
  title = f"best step {results.get('best_step')}"
  if "alpha" in results:
    title += f", alpha {results['alpha']:.2f}"
  console.say("results  %s (%s)", results.get("model", ""), title)
  console.results_table(results)


def _exists(directory: str, pattern: str) -> bool:
  import glob  # pylint: disable=g-import-not-at-top
  return bool(glob.glob(os.path.join(directory, pattern.rstrip("/"))))
