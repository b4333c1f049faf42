r"""Forward and train-step time of the image towers, with achieved FLOP/s.

  python bench/bench_image_towers.py --models=B/16,L/16 --batch=8

For each model: a jitted forward pass (tokens out, as the fusion layers use
it) and a jitted AdamW train step (forward, backward and update with a
1000-class head on the global token), both on random weights and random
images at 224x224, float32. Each is compiled and run once before timing; the
median of ``--steps`` runs is reported.

FLOPs are given two ways: the analytic count of the forward pass
(multiply-add = 2 FLOPs; matmuls and convolutions only), and XLA's own count
for the compiled forward and train step (``cost_analysis``), from which the
achieved FLOP/s is computed. On a shared machine the times are noisy: treat
them as a lower bound on what the hardware can do.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402

from mic_jax.models import bit, vit  # noqa: E402


def vit_forward_flops(cfg: vit.ViTConfig, image_size: int) -> float:
  """Analytic forward FLOPs of one image (matmuls and the patch conv)."""
  n = (image_size // cfg.patch_size) ** 2
  t = n + (1 if cfg.classifier == "token" else 0)
  d, m = cfg.width, cfg.mlp_dim
  patch = 2 * n * cfg.patch_size ** 2 * 3 * d
  per_layer = 8 * t * d * d + 4 * t * t * d + 4 * t * d * m
  return patch + cfg.depth * per_layer


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _time(fn, args, steps: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _build(name: str):
  if name.startswith("R"):
    return bit.get_bit(name, num_classes=1000), bit.get_bit(name), None
  tower = vit.get_vit(name)
  return vit.get_vit(name, num_classes=1000), tower, tower.config


def bench(name: str, batch: int, image_size: int, steps: int) -> dict:
  classifier, tower, cfg = _build(name)
  images = jax.random.uniform(jax.random.key(1),
                              (batch, image_size, image_size, 3),
                              minval=-1.0, maxval=1.0)
  labels = jax.random.randint(jax.random.key(2), (batch,), 0, 1000)
  params = jax.jit(lambda: nn.meta.unbox(classifier.init(
      jax.random.key(0), images[:1])["params"]))()
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  tower_params = {k: v for k, v in params.items() if k != "head"}
  if name.startswith("R"):
    tower_params = {"resnet": {k: v for k, v in params["resnet"].items()
                               if k != "head"}}

  forward = jax.jit(lambda p, x: tower.apply({"params": p}, x))
  fwd_compiled = forward.lower(tower_params, images).compile()

  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)

  def train_step(p, s, x, y):
    def loss_fn(p):
      logits = classifier.apply({"params": p}, x, train=True,
                                rngs={"dropout": jax.random.key(3)})
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  step_compiled = step.lower(params, opt_state, images, labels).compile()

  fwd_time = _time(fwd_compiled, (tower_params, images), steps)
  # The step donates its state: thread it through the timed calls.
  state = [params, opt_state]

  def run_step():
    state[0], state[1], loss = step_compiled(state[0], state[1], images,
                                             labels)
    return loss
  step_time = _time(run_step, (), steps)

  fwd_flops = _xla_flops(fwd_compiled)
  step_flops = _xla_flops(step_compiled)
  analytic = vit_forward_flops(cfg, image_size) * batch if cfg else float(
      "nan")
  return dict(name=name, params=n_params, fwd_time=fwd_time,
              step_time=step_time, analytic=analytic, fwd_flops=fwd_flops,
              step_flops=step_flops)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="B/16,L/16",
                 help="comma-separated ViT (B/16, L/16, ...) or BiT (R50x1) "
                 "names")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--steps", type=int, default=3,
                 help="timed runs after one untimed run")
  args = p.parse_args()

  print(f"# {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"backend {jax.default_backend()}, batch {args.batch}, "
        f"{args.image_size}px, float32")
  print("| model | params | fwd FLOPs (analytic) | fwd FLOPs (XLA) | "
        "fwd time | fwd FLOP/s | train-step FLOPs (XLA) | step time | "
        "step FLOP/s | images/s (train) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    r = bench(name.strip(), args.batch, args.image_size, args.steps)
    g = 1e9
    print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | "
          f"{r['analytic'] / g:,.0f} G | {r['fwd_flops'] / g:,.0f} G | "
          f"{r['fwd_time']:.2f} s | {r['fwd_flops'] / r['fwd_time'] / g:.0f} "
          f"G/s | {r['step_flops'] / g:,.0f} G | {r['step_time']:.2f} s | "
          f"{r['step_flops'] / r['step_time'] / g:.0f} G/s | "
          f"{args.batch / r['step_time']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
