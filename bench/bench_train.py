"""Train-step throughput of every system, and our text model against HF's.

Part 1 builds each system of the ``small`` preset exactly as the trainer
does (``classifier.build``, ``optimizer.make_optimizer``,
``steps.make_train_step``, jitted with the state donated) and times its
train step on random batches of the real shapes: examples/s, and achieved
FLOP/s with the FLOPs counted by XLA for the compiled step.

Part 2 trains our models against PyTorch ones written the way a PyTorch
user would, in float32 and in bfloat16 (``torch.autocast`` on their side,
``config.dtype`` on ours), trained the same way: AdamW, gradient clipping at
1.0, dropout on in both, same batch and shapes, interleaved repeats in one
process; it reports the ratio of median step times.

* text-only: ``transformers.BertForSequenceClassification`` from the same
  MiniLM checkpoint;
* cross-modal: ``bench/torch_cross_modal.py`` (HF ``BertModel`` from MiniLM,
  an HF ``ViTModel`` of the ``small-scratch`` size, eqs. (1)-(4) as a
  ``torch.nn.Module``).

Part 3 (``--real_lengths``) does the same on batches of *real* title
lengths, against PyTorch as users run it: titles of the fashion catalogue
(``productDisplayName``) and of H&M (``title``) from ``../shared/data``,
tokenized with the MiniLM tokenizer at ``max_length`` 32. Four ways to
batch the same catalogue, each over the same number of steps:

* ours padded: every batch padded to ``max_length`` (one compile);
* ours in length buckets: ``data.length_buckets='auto'`` chosen from the
  catalogue's histogram; each batch is drawn from one bucket with the
  bucket's share of the titles and cut to its length (one compile per
  bucket, compiled before timing), as :mod:`mic_jax.data.pipeline` does;
* PyTorch with dynamic padding: random batches padded to their longest
  title (what ``transformers.DataCollatorWithPadding`` does);
* PyTorch with length-grouped sampling (``group_by_length``): mega-batches
  of 50 batches sorted by length and cut into batches, each padded to its
  longest title (what ``LengthGroupedSampler`` does; the order of the
  batches does not change the mean step time).

Times are the mean step time over the same sequence of batches (lengths
vary, so the mean, not the median, is what a run pays).

The CPU model and its bf16 support (``lscpu``) head the output and end
every row, since a ratio measured on one CPU does not carry to another.

  python bench/bench_train.py [--steps=5] [--repeats=3] [--batch_size=64]
      [--systems=...] [--compare=text_only,cross_modal] [--dtypes=float32,bfloat16]
      [--real_lengths=fashion,hm] [--host_malloc=auto|tuned|system]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import pathlib
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from mic_jax import hostmem
from mic_jax.checkpoints import architecture
from mic_jax.data import buckets as buckets_lib
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


class OurStep(NamedTuple):
  """One of our train steps, compiled and ready to time."""
  run: Callable[[], None]  # One step on the fixed batch, blocking.
  num_params: int
  flops: float             # XLA's count for the compiled step.
  config: Any
  compiled: Any            # The jax.stages.Compiled step (its HLO, costs).


def _jitted_step(kind: str, arg: str, batch_size: int, dtype: str):
  """``(jitted step, state, random batch, config)`` of our ``kind`` model
  as the trainer builds it (state donated)."""
  config = common.make_config(kind, arg)
  with config.unlocked():
    config.num_classes = NUM_CLASSES
    config.batch_size = batch_size
    config.dtype = dtype
    # The PyTorch peers are the paper's: eq. (4)'s head on the fused text
    # alone and BERT's pooler (the preset's photo token in the head and mean
    # of token states are issue 31's choices for pretrained towers).
    config.fusion.image_to_head = False
    config.model.text_repr = "pooler"
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
  return step, state, batch, config


def our_step(kind: str, arg: str, batch_size: int, dtype: str = "float32"
             ) -> OurStep:
  """Our ``kind`` model's train step as the trainer builds it."""
  step, state, batch, config = _jitted_step(kind, arg, batch_size, dtype)
  params = state.params
  compiled = step.lower(state, batch).compile()
  flops = float(_cost(compiled).get("flops", float("nan")))
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["train/loss"])

  return OurStep(run, vit.count_params(params), flops, config, compiled)


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else (cost or {})


def _torch_trainer(model: Any, config: Any, dtype: str
                   ) -> Callable[[dict[str, Any], Any], None]:
  """``step(inputs, labels)``: one AdamW step of a torch model, with our
  optimizer settings (one optimizer, made here, for every step)."""
  import torch  # pylint: disable=g-import-not-at-top
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=config.optim.lr,
                          weight_decay=config.optim.weight_decay,
                          betas=(config.optim.b1, config.optim.b2),
                          eps=config.optim.eps)
  autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                            enabled=dtype == "bfloat16")

  def step(inputs, labels):
    opt.zero_grad()
    with autocast:
      logits = model(**inputs)
      loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_norm)
    opt.step()

  return step


def _torch_train_step(model: Any, config: Any, inputs: dict[str, Any],
                      labels: Any, dtype: str) -> Callable[[], None]:
  """One AdamW step of a torch model on fixed inputs."""
  step = _torch_trainer(model, config, dtype)
  return lambda: step(inputs, labels)


def _torch_batch(config: Any, batch_size: int, pixels: bool
                 ) -> tuple[dict[str, Any], Any]:
  """The same random batch as ours, as torch tensors (NCHW pixels)."""
  import torch  # pylint: disable=g-import-not-at-top
  b = random_batch(config, batch_size)
  inputs = {k: torch.tensor(b[k], dtype=torch.long)
            for k in ("input_ids", "attention_mask", "token_type_ids")}
  if pixels:
    inputs["pixel_values"] = torch.tensor(b["image"]).permute(0, 3, 1, 2)
  return inputs, torch.tensor(b["label"], dtype=torch.long)


class _Logits:
  """Adapts BertForSequenceClassification to return logits."""

  def __init__(self, model):
    self.model = model

  def __call__(self, **inputs):
    return self.model(**inputs).logits

  def __getattr__(self, name):
    return getattr(self.model, name)


def torch_model(kind: str, config: Any) -> Any:
  """The PyTorch user's version of our ``kind`` model (logits out)."""
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.logging.set_verbosity_error()  # The new head's load report.
  if kind == "text_only":
    return _Logits(transformers.BertForSequenceClassification.from_pretrained(
        config.text.checkpoint, num_labels=NUM_CLASSES))
  if kind == "cross_modal":
    import torch_cross_modal  # pylint: disable=g-import-not-at-top
    size = dataclasses.asdict(vit.vit_config(config.image.variant))
    size["size"] = config.image.size
    return torch_cross_modal.CrossModalClassifier(
        config.text.checkpoint, size, NUM_CLASSES,
        fusion_dropout=config.fusion.dropout,
        head_dropout=config.fusion.dropout)
  raise ValueError(f"no PyTorch reference for {kind!r}")


def torch_step(kind: str, config: Any, batch_size: int, dtype: str
               ) -> Callable[[], None]:
  """The PyTorch user's version of our ``kind`` model, one train step."""
  model = torch_model(kind, config)
  inputs, labels = _torch_batch(config, batch_size,
                                pixels=kind != "text_only")
  return _torch_train_step(model, config, inputs, labels, dtype)


def cpu_description() -> str:
  """``lscpu``'s model name, core count and bf16 support, for the record."""
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True,
                          check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or "unknown CPU"
  fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
  flags = fields.get("Flags", "").split()
  bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
  return (f"{fields.get('Model name', '?').strip()}, "
          f"{fields.get('CPU(s)', '?').strip()} CPUs, bf16 instructions: "
          f"{', '.join(bf16) or 'none'}")


def timed(run: Callable[[], None], steps_: int, warmup: int = 3) -> float:
  """Median seconds per step over ``steps_`` steps, after ``warmup`` steps.

  Several warm-up steps, not one: with the tuned host allocator
  (mic_jax/hostmem.py) the heap takes a few steps to settle.
  """
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps_):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compare(kind: str, dtype: str, batch_size: int, steps_: int,
            repeats: int) -> tuple[float, float]:
  """Median step seconds of ours and the PyTorch reference, interleaved."""
  ours = our_step(kind, "small", batch_size, dtype)
  theirs = torch_step(kind, ours.config, batch_size, dtype)
  ours_times, their_times = [], []
  for _ in range(repeats):  # Interleaved: both see the same machine.
    ours_times.append(timed(ours.run, steps_))
    their_times.append(timed(theirs, steps_))
  return statistics.median(ours_times), statistics.median(their_times)


# ------------------------------------------------- part 3: real lengths --

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CATALOGUES = {
    "fashion": ("fashion-products/styles.csv", "productDisplayName"),
    "hm": ("hm-products/products.csv", "title"),
}
GROUP_MEGABATCH = 50  # transformers' LengthGroupedSampler default.


def title_lengths(name: str, tokenizer_dir: str, max_length: int
                  ) -> np.ndarray:
  """Token counts ([CLS]/[SEP] included, cut at ``max_length``) of every
  title of catalogue ``name``."""
  from mic_jax.text import load_tokenizer  # pylint: disable=g-import-not-at-top
  path, column = CATALOGUES[name]
  with open(DATA / path, encoding="utf-8", newline="") as f:
    titles = [r[column] for r in csv.DictReader(f) if (r.get(column) or
                                                       "").strip()]
  tok = load_tokenizer(tokenizer_dir)
  lengths = []
  for i in range(0, len(titles), 4096):
    enc = tok.encode_batch(titles[i:i + 4096], max_length=max_length)
    lengths.append(enc["attention_mask"].sum(axis=1))
  return np.concatenate(lengths).astype(np.int64)


def batch_lengths(lengths: np.ndarray, how: str, batch_size: int,
                  num_batches: int, max_length: int, seed: int = 0
                  ) -> list[tuple[np.ndarray, int]]:
  """``num_batches`` of (title lengths, padded width) as ``how`` batches.

  ``padded``: random batches, width ``max_length``; ``buckets``: a bucket
  drawn by its share of the titles, then random titles of it, width the
  bucket's length; ``dynamic``: random batches, width their longest title;
  ``grouped``: length-grouped mega-batches, width their longest title.
  """
  rng = np.random.default_rng(seed)
  out = []
  if how in ("padded", "dynamic"):
    for _ in range(num_batches):
      b = rng.choice(lengths, batch_size)
      out.append((b, max_length if how == "padded" else int(b.max())))
  elif how == "buckets":
    counts = np.bincount(lengths, minlength=max_length + 1)
    chosen = buckets_lib.choose(counts, max_length)
    which = buckets_lib.bucket_of(lengths, chosen)
    share = np.bincount(which, minlength=len(chosen)) / len(lengths)
    for _ in range(num_batches):
      k = rng.choice(len(chosen), p=share)
      out.append((rng.choice(lengths[which == k], batch_size), chosen[k]))
  elif how == "grouped":
    while len(out) < num_batches:
      mega = np.sort(rng.choice(lengths, batch_size * GROUP_MEGABATCH))[::-1]
      groups = [mega[i:i + batch_size] for i in range(0, len(mega),
                                                      batch_size)]
      for i in rng.permutation(len(groups)):
        out.append((groups[i], int(groups[i].max())))
  else:
    raise ValueError(how)
  return out[:num_batches]


def _length_batch(config: Any, lengths: np.ndarray, width: int,
                  seed: int) -> dict[str, np.ndarray]:
  """A pipeline-shaped batch whose titles have ``lengths``, cut to width."""
  rng = np.random.default_rng(seed)
  b, size = len(lengths), config.image.size
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  return {
      "input_ids": (rng.integers(1000, 20000, (b, width)) * mask).astype(
          np.int32),
      "attention_mask": mask,
      "token_type_ids": np.zeros((b, width), np.int32),
      "image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
      "image_present": np.ones((b,), np.int32),
      "label": rng.integers(0, NUM_CLASSES, (b,)).astype(np.int32),
      "mask": np.ones((b,), np.float32),
  }


def our_shaped_step(kind: str, batch_size: int, dtype: str
                    ) -> tuple[Callable[[dict[str, Any]], None], Any]:
  """Our train step (jitted, state donated) taking any batch shape: one
  compile per token length, cached by jit."""
  step, state, _, config = _jitted_step(kind, "small", batch_size, dtype)
  holder = {"state": state}

  def run(batch):
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics["train/loss"])

  return run, config


def torch_shaped_step(kind: str, config: Any, dtype: str
                      ) -> Callable[[dict[str, Any]], None]:
  """The PyTorch user's model, one train step on any batch."""
  import torch  # pylint: disable=g-import-not-at-top
  model = torch_model(kind, config)
  step = _torch_trainer(model, config, dtype)

  def run(batch):
    inputs = {k: torch.tensor(batch[k], dtype=torch.long)
              for k in ("input_ids", "attention_mask", "token_type_ids")}
    if kind != "text_only":
      inputs["pixel_values"] = torch.tensor(batch["image"]).permute(0, 3, 1, 2)
    step(inputs, torch.tensor(batch["label"], dtype=torch.long))

  return run


def mean_time(run: Callable[[dict[str, Any]], None],
              batches: list[dict[str, Any]], warmup: list[dict[str, Any]]
              ) -> float:
  """Mean seconds per step over ``batches``, after ``warmup`` (which
  compiles every shape the timed batches have, for ours)."""
  for batch in warmup:
    run(batch)
  start = time.perf_counter()
  for batch in batches:
    run(batch)
  return (time.perf_counter() - start) / len(batches)


WAYS = ("padded", "buckets", "dynamic", "grouped")


def compare_real_lengths(kind: str, dtype: str, batch_size: int,
                         steps_: int, repeats: int, lengths: np.ndarray
                         ) -> dict[str, float]:
  """Mean step seconds of ours (padded, buckets) and PyTorch (dynamic,
  grouped padding) on batches of real title lengths, interleaved."""
  ours, config = our_shaped_step(kind, batch_size, dtype)
  theirs = torch_shaped_step(kind, config, dtype)
  max_length = int(config.text.max_length)
  plans = {how: batch_lengths(lengths, how, batch_size, steps_ * repeats,
                              max_length, seed=1) for how in WAYS}
  made = {how: [_length_batch(config, l, w, seed=i)
                for i, (l, w) in enumerate(plan)]
          for how, plan in plans.items()}
  # Warm-up: every width ours will see (one compile each), two steps.
  widths = sorted({b["input_ids"].shape[1] for how in ("padded", "buckets")
                   for b in made[how]})
  warm = [_length_batch(config, np.full(batch_size, w), w, 0) for w in widths]
  times: dict[str, list[float]] = {how: [] for how in WAYS}
  for r in range(repeats):
    part = slice(r * steps_, (r + 1) * steps_)
    for how in WAYS:
      run = ours if how in ("padded", "buckets") else theirs
      times[how].append(mean_time(run, made[how][part],
                                  warm * 2 if r == 0 else warm[:1]))
  return {how: statistics.median(t) for how, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--systems", default=",".join(SYSTEMS),
                      help="Part 1 rows; empty skips part 1.")
  parser.add_argument("--compare", default="text_only,cross_modal",
                      help="Part 2: models timed against PyTorch.")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--real_lengths", default="",
                      help="Part 3: catalogues (fashion,hm) whose real title "
                      "lengths batch the models of --compare, ours padded "
                      "and in length buckets against PyTorch with dynamic "
                      "and length-grouped padding.")
  parser.add_argument("--host_malloc", default="auto", choices=hostmem.MODES,
                      help="This process's allocator, which both sides share "
                      "(mic_jax/hostmem.py); applied before any thread "
                      "starts.")
  args = parser.parse_args()
  allocator = hostmem.configure(args.host_malloc)
  import torch  # pylint: disable=g-import-not-at-top
  # XLA's CPU client uses every core; give PyTorch the same.
  torch.set_num_threads(os.cpu_count() or 1)

  print(f"CPU: {cpu_description()}")
  print(f"batch {args.batch_size}, {args.steps} timed steps x "
        f"{args.repeats} repeats, median; jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); host allocator {allocator}")
  if args.systems:
    print("\n| system | params | step ms | examples/s | GFLOP/step (XLA) | "
          "achieved GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
  for name in filter(None, args.systems.split(",")):
    kind, arg = SYSTEMS[name]
    step = our_step(kind, arg, args.batch_size)
    seconds = statistics.median(timed(step.run, args.steps)
                                for _ in range(args.repeats))
    flops = step.flops
    print(f"| {name} | {step.num_params / 1e6:.1f}M | {seconds * 1e3:.0f} | "
          f"{args.batch_size / seconds:.0f} | {flops / 1e9:.1f} | "
          f"{flops / seconds / 1e9:.0f} |", flush=True)

  if args.real_lengths:
    real_lengths(args)
  if not args.compare or args.real_lengths:
    return
  print("\nAgainst PyTorch (:small sizes, AdamW, dropout on, clip 1.0; "
        "ratio = PyTorch ms / mic_jax ms):\n")
  print("| model | dtype | mic_jax ms | PyTorch ms | ratio |")
  print("|---|---|---:|---:|---:|")
  for kind in args.compare.split(","):
    for dtype in args.dtypes.split(","):
      ours_s, theirs_s = compare(kind, dtype, args.batch_size, args.steps,
                                 args.repeats)
      print(f"| {kind} | {dtype} | {ours_s * 1e3:.0f} | {theirs_s * 1e3:.0f} "
            f"| {theirs_s / ours_s:.2f}x |", flush=True)


def real_lengths(args: argparse.Namespace) -> None:
  """Part 3's table (see the module docstring)."""
  cpu = cpu_description().split(",")[0]
  print("\nReal title lengths (MiniLM tokens, max_length 32), batch "
        f"{args.batch_size}; mean step ms over {args.steps} steps x "
        f"{args.repeats} repeats (median of repeats); ratio = PyTorch ms / "
        "ours in buckets:\n")
  print("| titles | model | dtype | ours padded | ours buckets | PyTorch "
        "dynamic | PyTorch grouped | vs dynamic | vs grouped | CPU |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
  config = common.make_config("text_only", "small")
  for catalogue in args.real_lengths.split(","):
    lengths = title_lengths(catalogue, config.text.checkpoint,
                            int(config.text.max_length))
    chosen = buckets_lib.choose(np.bincount(lengths), 32)
    print(f"<!-- {catalogue}: {len(lengths)} titles, mean "
          f"{lengths.mean():.1f} tokens, p95 {np.percentile(lengths, 95):.0f}"
          f", buckets {chosen} -->", flush=True)
    for kind in args.compare.split(","):
      for dtype in args.dtypes.split(","):
        t = compare_real_lengths(kind, dtype, args.batch_size, args.steps,
                                 args.repeats, lengths)
        ms = {k: v * 1e3 for k, v in t.items()}
        print(f"| {catalogue} | {kind} | {dtype} | {ms['padded']:.0f} | "
              f"{ms['buckets']:.0f} | {ms['dynamic']:.0f} | "
              f"{ms['grouped']:.0f} | {ms['dynamic'] / ms['buckets']:.2f}x | "
              f"{ms['grouped'] / ms['buckets']:.2f}x | {cpu} |", flush=True)


if __name__ == "__main__":
  main()
