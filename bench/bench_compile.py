r"""Compile time of the paper config's train step, unrolled vs scanned layers.

  nice python bench/bench_compile.py [--preset=paper] [--batch_size=32]

Builds the cross-modal model of ``configs/cross_modal.py`` (paper preset:
BERT-base + ViT-L/16 at 224px) twice in one process, with
``config.model.scan_layers`` off and on, and times
``jax.jit(train_step).lower(abstract state, abstract batch)`` and
``.compile()`` for one CPU device. Nothing is allocated: the state and
batch are ``jax.ShapeDtypeStruct`` trees. The text tower is built from its
named size (BERT-base with the paper checkpoint's 32,000-token vocabulary)
so that no checkpoint is read. Prints one line per layout (wall time, and the process's CPU time, which
a busy shared machine distorts less) and the ratios;
``--json=FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import common  # noqa: E402
from mic_jax.tools import compile_check  # noqa: E402


def paper_config(preset: str, scan: bool, batch_size: int):
  """The cross-modal config of ``preset``, readable without checkpoints."""
  config = common.make_config("cross_modal", preset)
  config.unlock()
  config.text.checkpoint = ""
  if preset == "paper":
    config.text.vocab_size = 32000  # cl-tohoku/bert-base-japanese-wwm.
  config.image.checkpoint = ""
  config.num_classes = 1000
  config.batch_size = batch_size
  config.model.scan_layers = scan
  config.lock()
  return config


def compile_seconds(config) -> dict[str, float]:
  """Seconds to trace+lower and to compile the train step (abstract args)."""
  step, state, batch = compile_check.single_device_train_step(config)
  start, cpu_start = time.perf_counter(), time.process_time()
  lowered = step.lower(state, batch)
  lowered_at = time.perf_counter()
  lowered.compile()
  done, cpu_done = time.perf_counter(), time.process_time()
  return {"lower_seconds": lowered_at - start,
          "compile_seconds": done - lowered_at,
          "total_seconds": done - start,
          "cpu_seconds": cpu_done - cpu_start}


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  except OSError:
    return "unknown"
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="paper")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  print(f"cpu: {cpu_model()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; jax {jax.__version__}", flush=True)
  results = {}
  for scan in (False, True):
    config = paper_config(args.preset, scan, args.batch_size)
    name = "scanned" if scan else "unrolled"
    results[name] = compile_seconds(config)
    r = results[name]
    print(f"{name:9s} lower {r['lower_seconds']:7.1f} s  compile "
          f"{r['compile_seconds']:7.1f} s  total {r['total_seconds']:7.1f} s"
          f"  (process CPU time {r['cpu_seconds']:7.1f} s)", flush=True)
  ratio = (results["unrolled"]["total_seconds"]
           / results["scanned"]["total_seconds"])
  cpu_ratio = (results["unrolled"]["cpu_seconds"]
               / results["scanned"]["cpu_seconds"])
  print(f"unrolled / scanned (lower + compile): {ratio:.2f}x wall, "
        f"{cpu_ratio:.2f}x CPU time")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"preset": args.preset, "batch_size": args.batch_size,
                 "cpu": cpu_model(), **results, "ratio": ratio,
                 "cpu_ratio": cpu_ratio}, f, indent=2)


if __name__ == "__main__":
  main()
