"""How much of the CPU our train step uses (issue 16, item 5).

For the text-only and cross-modal ``small`` steps (the trainer's model,
optimizer and step, jitted with the state donated; ``bench_train.our_step``)
it reports the achieved FLOP/s, XLA's FLOP count of the compiled step over
the measured median step time, divided by the float32 matmul FLOP/s that a
plain ``jnp.dot`` of two square matrices reaches in the same process: the
ceiling a step made only of large matmuls could reach on this machine.
The machine's CPU model (``lscpu``) and load average are printed with the
figures: on a shared, busy machine every time is an upper bound.

  python bench/bench_cpu_use.py [--steps=5] [--batch_size=64] [--matmul=2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from mic_jax import hostmem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402  pylint: disable=g-import-not-at-top

SYSTEMS = (("text_only", "small"), ("cross_modal", "small"))


def matmul_flops_per_second(n: int, repeats: int) -> float:
  """Median f32 FLOP/s of an ``n x n`` by ``n x n`` ``jnp.dot``."""
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (n, n), jnp.float32)
  b = jax.random.normal(keys[1], (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * n**3 / statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--matmul", type=int, default=2048)
  parser.add_argument("--host_malloc", default="auto", choices=hostmem.MODES,
                      help="This process's allocator (mic_jax/hostmem.py).")
  args = parser.parse_args()
  allocator = hostmem.configure(args.host_malloc)
  print(f"CPU: {bench_train.cpu_description()}; load average at "
        f"start {os.getloadavg()[0]:.1f}; jax {jax.__version__}; host "
        f"allocator {allocator}")
  peak = matmul_flops_per_second(args.matmul, 2 * args.steps)
  print(f"f32 matmul {args.matmul}^3: {peak / 1e9:.1f} GFLOP/s")
  print("\n| system | step ms | GFLOP/step (XLA) | achieved GFLOP/s | "
        "achieved / matmul |")
  print("|---|---:|---:|---:|---:|")
  for kind, arg in SYSTEMS:
    step = bench_train.our_step(kind, arg, args.batch_size)
    seconds = bench_train.timed(step.run, args.steps)
    flops = step.flops
    achieved = flops / seconds
    print(f"| {kind}:{arg} | {seconds * 1e3:.0f} | {flops / 1e9:.1f} | "
          f"{achieved / 1e9:.1f} | {achieved / peak:.2f} |")
  # Measured again at the end: on a shared machine the ceiling moves too.
  late = matmul_flops_per_second(args.matmul, 2 * args.steps)
  print(f"\nf32 matmul again at the end: {late / 1e9:.1f} GFLOP/s; load "
        f"average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
