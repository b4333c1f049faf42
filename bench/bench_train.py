"""Train-step throughput of every system, and our text model against HF's.

Part 1 builds each system of the ``small`` preset exactly as the trainer
does (``classifier.build``, ``optimizer.make_optimizer``,
``steps.make_train_step``, jitted with the state donated) and times its
train step on random batches of the real shapes: examples/s, and achieved
FLOP/s with the FLOPs counted by XLA for the compiled step.

Part 2 trains our text-only model and ``transformers.
BertForSequenceClassification`` built from the same MiniLM checkpoint the
same way: AdamW, float32, gradient clipping at 1.0, dropout on in both,
same batch and sequence length, interleaved repeats in one process, and
reports the ratio of median step times.

  python bench/bench_train.py [--steps=5] [--repeats=3] [--batch_size=64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from mic_jax.checkpoints import architecture
from mic_jax.models import classifier
from mic_jax.models import vit
from mic_jax.train import optimizer, steps

NUM_CLASSES = 133  # The fashion catalogue's articleType level.
SYSTEMS = {
    "text_only": ("text_only", "small"),
    "image_only (ViT)": ("image_only", "small"),
    "image_only (BiT)": ("image_only", "small,image=bit"),
    "early": ("early", "small"),
    "cross_modal": ("cross_modal", "small"),
}


def random_batch(config: Any, batch_size: int, seed: int = 0
                 ) -> dict[str, np.ndarray]:
  """A batch with the pipeline's keys, shapes and dtypes."""
  rng = np.random.default_rng(seed)
  length, size = config.text.max_length, config.image.size
  lengths = rng.integers(8, length + 1, (batch_size, 1))
  mask = (np.arange(length)[None] < lengths).astype(np.int32)
  return {
      "input_ids": (rng.integers(1000, 20000, (batch_size, length))
                    * mask).astype(np.int32),
      "attention_mask": mask,
      "token_type_ids": np.zeros((batch_size, length), np.int32),
      "image": rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(
          np.float32),
      "image_present": np.ones((batch_size,), np.int32),
      "label": rng.integers(0, NUM_CLASSES, (batch_size,)).astype(np.int32),
      "mask": np.ones((batch_size,), np.float32),
  }


def our_step(kind: str, arg: str, batch_size: int
             ) -> tuple[Callable[[], None], int, float, Any]:
  """(run one step, parameter count, XLA FLOPs per step, config)."""
  config = common.make_config(kind, arg)
  with config.unlocked():
    config.num_classes = NUM_CLASSES
    config.batch_size = batch_size
  model = classifier.build(architecture.resolve(config)).model
  batch = {k: jnp.asarray(v) for k, v in random_batch(config,
                                                      batch_size).items()}
  params = jax.jit(lambda: nn.meta.unbox(model.init(
      {"params": jax.random.key(0)}, batch)["params"]))()
  tx, schedule = optimizer.make_optimizer(config.optim, params, 10_000)
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  step = jax.jit(steps.make_train_step(
      model, tx, schedule, seed=0, grad_accum_steps=1,
      label_smoothing=0.0, loss_class_weights=np.ones(NUM_CLASSES,
                                                      np.float32)),
                 donate_argnums=(0,))
  compiled = step.lower(state, batch).compile()
  flops = float(_cost(compiled).get("flops", float("nan")))
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["train/loss"])

  return run, vit.count_params(params), flops, config


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else (cost or {})


def hf_step(text_dir: str, config: Any, batch_size: int
            ) -> Callable[[], None]:
  """One AdamW step of BertForSequenceClassification, trained like ours."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.BertForSequenceClassification.from_pretrained(
      text_dir, num_labels=NUM_CLASSES)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=config.optim.lr,
                          weight_decay=config.optim.weight_decay,
                          betas=(config.optim.b1, config.optim.b2),
                          eps=config.optim.eps)
  b = random_batch(config, batch_size)
  inputs = {k: torch.tensor(b[k], dtype=torch.long)
            for k in ("input_ids", "attention_mask", "token_type_ids")}
  labels = torch.tensor(b["label"], dtype=torch.long)

  def run():
    opt.zero_grad()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_norm)
    opt.step()

  return run


def timed(run: Callable[[], None], steps_: int) -> float:
  """Median seconds per step over ``steps_`` steps (after one warm-up)."""
  run()
  times = []
  for _ in range(steps_):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--systems", default=",".join(SYSTEMS))
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  # XLA's CPU client uses every core; give PyTorch the same.
  torch.set_num_threads(os.cpu_count() or 1)

  print(f"batch {args.batch_size}, {args.steps} timed steps x "
        f"{args.repeats} repeats, median; jax {jax.__version__}, "
        f"{jax.devices()[0].platform}")
  print("\n| system | params | step ms | examples/s | GFLOP/step (XLA) | "
        "achieved GFLOP/s |")
  print("|---|---:|---:|---:|---:|---:|")
  text_config = None
  ours_text = None
  for name in args.systems.split(","):
    kind, arg = SYSTEMS[name]
    run, count, flops, config = our_step(kind, arg, args.batch_size)
    seconds = statistics.median(timed(run, args.steps)
                                for _ in range(args.repeats))
    print(f"| {name} | {count / 1e6:.1f}M | {seconds * 1e3:.0f} | "
          f"{args.batch_size / seconds:.0f} | {flops / 1e9:.1f} | "
          f"{flops / seconds / 1e9:.0f} |", flush=True)
    if kind == "text_only":
      text_config, ours_text = config, run

  if ours_text is None:
    return
  theirs = hf_step(text_config.text.checkpoint, text_config, args.batch_size)
  ours_times, their_times = [], []
  for _ in range(args.repeats):  # Interleaved: both see the same machine.
    ours_times.append(timed(ours_text, args.steps))
    their_times.append(timed(theirs, args.steps))
  ours_s, theirs_s = statistics.median(ours_times), statistics.median(
      their_times)
  print(f"\nText-only (MiniLM 6x384, seq {text_config.text.max_length}, "
        f"batch {args.batch_size}, AdamW, f32, dropout on, clip 1.0):\n")
  print("| implementation | step ms | examples/s |")
  print("|---|---:|---:|")
  print(f"| mic_jax (JAX/XLA) | {ours_s * 1e3:.0f} | "
        f"{args.batch_size / ours_s:.0f} |")
  print(f"| transformers BertForSequenceClassification (PyTorch, "
        f"{torch.get_num_threads()} threads) | {theirs_s * 1e3:.0f} | "
        f"{args.batch_size / theirs_s:.0f} |")
  print(f"\nmic_jax is {theirs_s / ours_s:.2f}x the speed of the PyTorch "
        "reference.")


if __name__ == "__main__":
  main()
