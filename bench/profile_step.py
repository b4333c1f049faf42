"""Where a ``small`` train step's time goes, on the CPU (issue 16, items 4-5).

Two views of the same step (``bench_train.our_step``: the trainer's model,
optimizer and jitted step, batch 64, float32, dropout on):

1. **CPU accounting**, ours and the PyTorch user's model (``bench_train``'s
   reference) in one process: wall time per step, user and system CPU time
   per step (``getrusage``) and minor page faults per step. System time is
   the kernel zeroing fresh pages; user time is the arithmetic. The host
   allocator setting (``--host_malloc``, ``mic_jax/hostmem.py``) applies to
   both sides.
2. **XLA's ops**, from a ``jax.profiler`` trace of a few steps with XLA:CPU's
   per-op trace events on (``--xla_cpu_enable_xprof_traceme``): every op's
   time, attributed by the layer names in its HLO metadata to matmuls,
   attention, GELU, LayerNorm, dropout, embeddings and the optimizer, and the
   time in which no XLA op ran at all. Ops of one step can overlap (XLA runs
   independent ops concurrently), so the column sums to about the step time,
   not exactly. The trace directory opens in TensorBoard's profile plugin or
   Perfetto (``perfetto_trace.json.gz``).

3. **Where each dot runs** (``--dots=float32,bfloat16``, compile only, no
   timing): every ``dot`` of the compiled step by operand dtypes, kind
   (dense layer or attention; forward or backward) and where XLA:CPU runs
   it: inside a YNNPACK fusion (``__ynn_fusion``), a oneDNN custom call, or
   as a plain dot (XLA's own dot thunk, Eigen).

  python bench/profile_step.py [--kind=text_only] [--steps=3]
      [--host_malloc=auto|tuned|system] [--trace_dir=DIR] [--top=12]
  python bench/profile_step.py --kind=text_only --dots=float32,bfloat16
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import resource
import sys
import tempfile
import time
from typing import Any, Callable, Iterable

from mic_jax import hostmem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (category, pattern on the op's HLO metadata op_name), first match wins;
# matmul ops are told apart by their einsum spec first (see categorize).
CATEGORIES = (
    ("dropout (random bits, masks)", r"Dropout|bernoulli|random_bits|"
                                     r"threefry|_uniform"),
    ("GELU", r"erf|gelu"),
    ("LayerNorm", r"LayerNorm|layer_norm|/ln|norm"),
    ("attention: softmax, masks, layout", r"attention|Attention|attn"),
    ("embeddings (lookup, gradient scatter)", r"embedding|_take|Embed"),
)
MATMUL_DENSE = "matmul: projections, MLP, head, patch conv"
MATMUL_ATTENTION = "matmul: attention scores, weighted sum"
OPTIMIZER = "optimizer (AdamW, clipping) and loss"
OTHER = "other element-wise, copies, transposes"


def categorize(name: str, hlo_line: str) -> str:
  """The category of one XLA op from its HLO instruction line."""
  op_name = re.search(r'op_name="([^"]*)"', hlo_line)
  op_name = op_name.group(1) if op_name else ""
  is_matmul = (" dot(" in hlo_line or " convolution(" in hlo_line
               or "__ynn_fusion" in hlo_line or "__onednn" in hlo_line) and "reduce" not in op_name.rsplit(
                   "/", 1)[-1]
  if is_matmul:
    if re.search(r"->|bqhd|bhqk|bkhd", op_name):
      return MATMUL_ATTENTION
    if "jvp(" in op_name:
      return MATMUL_DENSE
  if "jvp(" not in op_name:  # Outside the model's forward and backward.
    return OPTIMIZER
  for category, pattern in CATEGORIES:
    if re.search(pattern, op_name):
      return category
  return OTHER


def hlo_lines(hlo_text: str) -> dict[str, str]:
  """Instruction name -> its line, for the instructions of ``hlo_text``."""
  lines = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = ", line)
    if match:
      lines.setdefault(match.group(1), line)
  return lines


def dot_census(hlo_text: str) -> collections.Counter:
  """``(lhs dtype, rhs dtype, dense|attention, fwd|bwd, where) -> count``
  over every ``dot`` of a compiled module's HLO text."""
  ynn = set(re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo_text))
  onednn = set(re.findall(r"calls=%([\w.\-]+)[^\n]*onednn", hlo_text))
  census: collections.Counter = collections.Counter()
  for computation in re.split(r"\n(?=\S)", hlo_text):
    lines = computation.splitlines()
    if not lines:
      continue
    name = lines[0].split()[0].lstrip("%") if lines[0].split() else ""
    dtypes = dict(re.findall(r"%?([\w.\-]+): (\w+)\[", lines[0]))
    for line in lines:
      match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
      if match:
        dtypes[match.group(1)] = match.group(2)
    for line in lines:
      match = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
      if not match:
        continue
      op_name = re.search(r'op_name="([^"]*)"', line)
      op_name = op_name.group(1) if op_name else ""
      kind = ("attention" if re.search(r"->|bqhd|bhqk|bkhd", op_name)
              else "dense")
      where = ("YNNPACK fusion" if name in ynn else
               "oneDNN" if name in onednn else "plain dot (Eigen)")
      census[(dtypes.get(match.group(1), "?"), dtypes.get(match.group(2), "?"),
              kind, "bwd" if "transpose(" in op_name else "fwd", where)] += 1
  census.update({("?", "?", "oneDNN call", "", "oneDNN"): len(re.findall(
      r'custom_call_target="__onednn', hlo_text))} if "__onednn" in hlo_text
                else {})
  return census


def print_dots(kind: str, batch_size: int, dtypes: list[str]) -> None:
  """Part 3's table for each compute dtype."""
  import bench_train  # pylint: disable=g-import-not-at-top
  print(f"CPU: {bench_train.cpu_description()}")
  print(f"\nDots of the {kind}:small train step, batch {batch_size}:\n")
  print("| compute dtype | lhs x rhs | kind | pass | where | dots |")
  print("|---|---|---|---|---|---:|")
  for dtype in dtypes:
    step = bench_train.our_step(kind, "small", batch_size, dtype)
    for (lhs, rhs, what, when, where), n in sorted(
        dot_census(step.compiled.as_text()).items()):
      print(f"| {dtype} | {lhs} x {rhs} | {what} | {when} | {where} | {n} |",
            flush=True)


def trace_events(trace_dir: str) -> list[dict[str, Any]]:
  """The complete ('X') events of the newest Perfetto trace under a dir."""
  files = sorted(pathlib.Path(trace_dir).rglob("*perfetto_trace.json.gz"),
                 key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X"]


def _covered(intervals: Iterable[tuple[float, float]]) -> float:
  """Length of the union of ``(start, end)`` intervals."""
  total, end = 0.0, None
  for start, stop in sorted(intervals):
    if end is None or start > end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def op_breakdown(events: list[dict[str, Any]], lines: dict[str, str],
                 steps: int) -> tuple[dict[str, float], list, float]:
  """(microseconds per step by category, top ops, idle us per step).

  Idle is the time inside the traced steps' span during which no XLA op
  was running (executor scheduling, buffer allocation, page faults).
  """
  ops = [e for e in events if e["name"] in lines]
  by_category: collections.Counter = collections.Counter()
  by_op: collections.Counter = collections.Counter()
  for e in ops:
    by_category[categorize(e["name"], lines[e["name"]])] += e["dur"]
    by_op[e["name"]] += e["dur"]
  span = (max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops))
  busy = _covered((e["ts"], e["ts"] + e["dur"]) for e in ops)
  per_step = {k: v / steps for k, v in by_category.items()}
  top = [(name, us / steps, categorize(name, lines[name]),
          lines[name].split(" = ", 1)[1].split(" ", 1)[0])
         for name, us in by_op.most_common()]
  return per_step, top, (span - busy) / steps


def cpu_accounting(run: Callable[[], None], steps: int,
                   warmup: int = 3) -> dict[str, float]:
  """Wall ms, user and system CPU ms and minor faults, per step.

  ``warmup`` steps run first: a tuned heap takes a few steps to settle.
  """
  for _ in range(warmup):
    run()
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(steps):
    run()
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {"wall_ms": wall / steps * 1e3,
          "user_ms": (after.ru_utime - before.ru_utime) / steps * 1e3,
          "sys_ms": (after.ru_stime - before.ru_stime) / steps * 1e3,
          "faults": (after.ru_minflt - before.ru_minflt) / steps}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--kind", default="text_only",
                      choices=("text_only", "cross_modal"))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--host_malloc", default="auto", choices=hostmem.MODES)
  parser.add_argument("--trace_dir", default="",
                      help="Keep the trace here (default: a temporary dir).")
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--dots", default="",
                      help="Only list where each dot of the compiled step "
                      "runs, for these compute dtypes (no timing).")
  args = parser.parse_args()
  allocator = hostmem.configure(args.host_malloc)
  if args.dots:
    print_dots(args.kind, args.batch_size, args.dots.split(","))
    return
  # Per-op trace events; read by XLA when JAX creates its CPU client.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_enable_xprof_traceme=true").strip()
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import bench_train  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)

  ours = bench_train.our_step(args.kind, "small", args.batch_size)
  theirs = bench_train.torch_step(args.kind, ours.config, args.batch_size,
                                  "float32")
  cores = os.cpu_count() or 1
  print(f"CPU: {bench_train.cpu_description()}; jax {jax.__version__}, "
        f"torch {torch.__version__}; host allocator {allocator}")
  print(f"\n{args.kind}:small train step, batch {args.batch_size}, float32, "
        f"{args.steps} steps each, one process\n")
  print("| implementation | step ms | user CPU ms | system CPU ms | "
        "CPU busy (of 2 x wall) | minor page faults (MiB of 4 KiB pages) |"
        .replace("2 x", f"{cores} x"))
  print("|---|---:|---:|---:|---:|---:|")
  for name, run in (("mic_jax (XLA)", ours.run), ("PyTorch", theirs)):
    acc = cpu_accounting(run, args.steps)
    busy = (acc["user_ms"] + acc["sys_ms"]) / (acc["wall_ms"] * cores)
    print(f"| {name} | {acc['wall_ms']:.0f} | {acc['user_ms']:.0f} | "
          f"{acc['sys_ms']:.0f} | {busy:.0%} | {acc['faults']:,.0f} "
          f"({acc['faults'] * 4 / 1024:,.0f}) |", flush=True)

  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
  ours.run()
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      ours.run()
  traced_ms = (time.perf_counter() - start) / args.steps * 1e3
  per_step, top, idle = op_breakdown(trace_events(trace_dir),
                                     hlo_lines(ours.compiled.as_text()),
                                     args.steps)
  print(f"\nXLA ops of our step, ms per step (traced step {traced_ms:.0f} ms;"
        f" trace in {trace_dir}):\n")
  print("| where | ms per step | share of op time |")
  print("|---|---:|---:|")
  total = sum(per_step.values())
  for category, us in sorted(per_step.items(), key=lambda kv: -kv[1]):
    print(f"| {category} | {us / 1e3:.1f} | {us / total:.0%} |")
  print(f"| (no XLA op running) | {idle / 1e3:.1f} | |")
  print(f"\nThe {args.top} longest ops:\n")
  print("| op | ms per step | where | shape |")
  print("|---|---:|---|---|")
  for name, us, category, shape in top[:args.top]:
    print(f"| {name} | {us / 1e3:.1f} | {category} | `{shape}` |")


if __name__ == "__main__":
  main()
