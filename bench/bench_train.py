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
  ``torch.nn.Module``);
* cross-modal on cached photo tokens (``cross_modal_cached``, the
  frozen-tower recipe): neither side runs the photo tower in the step. Ours
  reads the tower's output tokens from the batch's ``image_tokens``, as on
  the trainer's feature-cache path (:mod:`mic_jax.features.image_features`;
  the state then holds no image-tower parameters); the PyTorch model is
  built without its ``ViTModel`` and takes the same tokens in place of
  ``pixel_values``.

The ``:small`` preset is resolved as the trainer resolves it
(``configs.common.resolve_auto``: ``image.size`` 0 is the scratch tower's
64 px).

Part 3 (``--real_lengths``) does the same on batches of *real* title
lengths, against PyTorch as users run it: titles of the fashion catalogue
(``productDisplayName``) and of H&M (``title``) from ``../shared/data``,
tokenized with the MiniLM tokenizer at ``max_length`` 32. Five ways to
batch the same catalogue, each over the same number of steps:

* ours padded: every batch padded to ``max_length`` (one compile);
* ours in length buckets: ``data.length_buckets='auto'`` chosen from the
  catalogue's histogram; each batch is drawn from one bucket with the
  bucket's share of the titles and cut to its length (one compile per
  bucket, compiled before timing), as :mod:`mic_jax.data.pipeline` does;
* ours packed: a random stream of the titles packed greedily in order into
  rows (:func:`mic_jax.data.packing.plan_batches` and ``pack``), as the
  pipeline packs with ``data.pack_titles`` and the default ``pack_length``
  (``4 * max_length``) and ``pack_slots``, rows per step chosen by
  :func:`mic_jax.data.pipeline.resolve_packing` for the catalogue and the
  batch size (one compile); every slot carries its product's own photo, or
  cached tokens;
* PyTorch with dynamic padding: random batches padded to their longest
  title (what ``transformers.DataCollatorWithPadding`` does);
* PyTorch with length-grouped sampling (``group_by_length``): mega-batches
  of 50 batches sorted by length and cut into batches, each padded to its
  longest title (what ``LengthGroupedSampler`` does; the order of the
  batches does not change the mean step time).

Times are the mean step time over the same sequence of batches (lengths
vary, so the mean, not the median, is what a run pays), in ms per
``batch_size`` products: a packed step holds as many titles as fit its
rows (about ``batch_size``, varying), so its time is the timed steps'
seconds over their products, times ``batch_size``. The table has the ratios
of PyTorch to ours in buckets and to ours packed; a comment line per row
gives the packing (rows, tokens, slots), the mean products per packed step
and the last packed step's loss.

The CPU model and its bf16 support (``lscpu``) head the output and end
every row, since a ratio measured on one CPU does not carry to another.

  python bench/bench_train.py [--steps=5] [--repeats=3] [--batch_size=64]
      [--systems=...] [--compare=text_only,cross_modal,cross_modal_cached]
      [--dtypes=float32,bfloat16]
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
from mic_jax.data import packing as packing_lib
from mic_jax.data import pipeline
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


# A --compare name -> (model kind, photo tokens cached). "cross_modal_cached"
# is the frozen-tower recipe: the photo tower's tokens are precomputed
# (mic_jax.features.image_features), so neither side runs it in the step.
CACHED = "_cached"


def model_kind(name: str) -> tuple[str, bool]:
  """``"cross_modal_cached"`` -> ``("cross_modal", True)``."""
  if name.endswith(CACHED):
    return name[:-len(CACHED)], True
  return name, False


def photo_token_shape(config: Any) -> tuple[int, int]:
  """``(tokens, width)`` of the image tower's output (class token first),
  the shape a feature cache stores per photo."""
  cfg = vit.vit_config(config.image.variant)
  return (int(config.image.size) // cfg.patch_size) ** 2 + 1, cfg.width


def _photos(config: Any, rng: np.random.Generator, b: int, cached: bool
            ) -> dict[str, np.ndarray]:
  """Pixels ``image`` or, cached, the tower's tokens ``image_tokens``."""
  if cached:
    return {"image_tokens": rng.normal(
        size=(b, *photo_token_shape(config))).astype(np.float32)}
  size = config.image.size
  return {"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)}


def random_batch(config: Any, batch_size: int, seed: int = 0,
                 cached: bool = False) -> dict[str, np.ndarray]:
  """A batch with the pipeline's keys, shapes and dtypes (``cached``: the
  feature cache's ``image_tokens`` in place of ``image``)."""
  rng = np.random.default_rng(seed)
  length = config.text.max_length
  lengths = rng.integers(8, length + 1, (batch_size, 1))
  mask = (np.arange(length)[None] < lengths).astype(np.int32)
  return {
      "input_ids": (rng.integers(1000, 20000, (batch_size, length))
                    * mask).astype(np.int32),
      "attention_mask": mask,
      "token_type_ids": np.zeros((batch_size, length), np.int32),
      **_photos(config, rng, batch_size, cached),
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


def _jitted_step(name: str, arg: str, batch_size: int, dtype: str):
  """``(jitted step, state, random batch, config)`` of our model ``name``
  (a kind, or ``cross_modal_cached``) as the trainer builds it (state
  donated). Cached: the batch carries ``image_tokens``, so the image tower
  neither runs nor has parameters in the state, as on the trainer's
  feature-cache path."""
  kind, cached = model_kind(name)
  # Resolved as the trainer resolves it: the preset's image.size = 0 is the
  # scratch tower's photo size (64), for our batches and PyTorch's alike.
  config = common.resolve_auto(common.make_config(kind, arg))
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
  batch = {k: jnp.asarray(v) for k, v in random_batch(
      config, batch_size, cached=cached).items()}
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


def _torch_inputs(name: str, batch: dict[str, np.ndarray]
                  ) -> tuple[dict[str, Any], Any]:
  """A pipeline-shaped batch as the torch model ``name``'s inputs (NCHW
  pixels, or the cached photo tokens as they are) and labels."""
  import torch  # pylint: disable=g-import-not-at-top
  kind, cached = model_kind(name)
  inputs = {k: torch.tensor(batch[k], dtype=torch.long)
            for k in ("input_ids", "attention_mask", "token_type_ids")}
  if kind != "text_only" and cached:
    inputs["image_tokens"] = torch.tensor(batch["image_tokens"])
  elif kind != "text_only":
    inputs["pixel_values"] = torch.tensor(batch["image"]).permute(0, 3, 1, 2)
  return inputs, torch.tensor(batch["label"], dtype=torch.long)


def _torch_batch(name: str, config: Any, batch_size: int
                 ) -> tuple[dict[str, Any], Any]:
  """The same random batch as ours, as torch tensors."""
  return _torch_inputs(name, random_batch(config, batch_size,
                                          cached=model_kind(name)[1]))


class _Logits:
  """Adapts BertForSequenceClassification to return logits."""

  def __init__(self, model):
    self.model = model

  def __call__(self, **inputs):
    return self.model(**inputs).logits

  def __getattr__(self, name):
    return getattr(self.model, name)


def torch_model(name: str, config: Any) -> Any:
  """The PyTorch user's version of our model ``name`` (logits out); for
  ``cross_modal_cached`` without an image tower (it takes the tokens)."""
  kind, cached = model_kind(name)
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
        head_dropout=config.fusion.dropout, image_tower=not cached)
  raise ValueError(f"no PyTorch reference for {kind!r}")


def torch_step(kind: str, config: Any, batch_size: int, dtype: str
               ) -> Callable[[], None]:
  """The PyTorch user's version of our ``kind`` model, one train step."""
  model = torch_model(kind, config)
  inputs, labels = _torch_batch(kind, config, batch_size)
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
                  seed: int, cached: bool = False) -> dict[str, np.ndarray]:
  """A pipeline-shaped batch whose titles have ``lengths``, cut to width
  (``cached``: with the feature cache's photo tokens, not pixels)."""
  rng = np.random.default_rng(seed)
  b = len(lengths)
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  return {
      "input_ids": (rng.integers(1000, 20000, (b, width)) * mask).astype(
          np.int32),
      "attention_mask": mask,
      "token_type_ids": np.zeros((b, width), np.int32),
      **_photos(config, rng, b, cached),
      "image_present": np.ones((b,), np.int32),
      "label": rng.integers(0, NUM_CLASSES, (b,)).astype(np.int32),
      "mask": np.ones((b,), np.float32),
  }


def packing_of(lengths: np.ndarray, batch_size: int, max_length: int
               ) -> pipeline.Packing:
  """The :class:`pipeline.Packing` a run on this catalogue gets with the
  defaults (``data.pack_length`` 0 = ``4 * max_length``, ``data.pack_slots``
  0) and ``batch_size``: :func:`pipeline.resolve_packing` on a stand-in
  ``dataset_info`` whose training split has these title lengths."""
  from mic_jax.data import records  # pylint: disable=g-import-not-at-top
  counts = np.bincount(lengths, minlength=max_length + 1)
  info = pipeline.DatasetInfo("", (), max_length, {"train": [{
      "file": "", "examples": int(len(lengths)),
      records.LENGTH_COUNTS: counts.tolist()}]})
  return pipeline.resolve_packing(info, pack_length=0, slots=0,
                                  global_batch_size=batch_size,
                                  row_multiple=1)


def packed_lengths(lengths: np.ndarray, packing: pipeline.Packing,
                   num_batches: int, seed: int = 0) -> list[np.ndarray]:
  """Title lengths of ``num_batches`` packed batches: a random stream of
  titles packed greedily in order (:func:`packing.plan_batches`), as the
  training pipeline packs its shuffled stream; every batch full (the
  stream's partial last batch is left out)."""
  rng = np.random.default_rng(seed)
  per_batch = packing.rows * packing.slots
  stream = rng.choice(lengths, (num_batches + 1) * per_batch)
  counts = packing_lib.plan_batches(stream, packing.length, packing.slots,
                                    packing.rows)
  assert len(counts) > num_batches, (len(counts), num_batches)
  starts = np.cumsum([0] + counts)
  return [stream[starts[i]:starts[i + 1]] for i in range(num_batches)]


def _packed_batch(config: Any, lengths: np.ndarray,
                  packing: pipeline.Packing, seed: int, cached: bool
                  ) -> dict[str, np.ndarray]:
  """The packed batch (:func:`packing.pack`) of titles with ``lengths``,
  each product with its own photo (or cached tokens), label and mask."""
  padded = _length_batch(config, lengths, int(config.text.max_length), seed,
                         cached)
  examples = [{k: v[i] for k, v in padded.items()}
              for i in range(len(lengths))]
  batch = packing_lib.pack(examples, pack_length=packing.length,
                           slots=packing.slots, rows=packing.rows)
  # Every planned product has a slot, and only they do.
  assert int(batch["mask"].sum()) == len(lengths)
  assert int(batch["slot_length"].sum()) == int(lengths.sum())
  return batch


def our_shaped_step(kind: str, batch_size: int, dtype: str
                    ) -> tuple[Callable[[dict[str, Any]], None], Any,
                               dict[str, Any]]:
  """Our train step (jitted, state donated) taking any batch shape, padded
  or packed: one compile per shape, cached by jit. The dict holds the last
  step's loss (``"loss"``)."""
  step, state, _, config = _jitted_step(kind, "small", batch_size, dtype)
  holder = {"state": state}

  def run(batch):
    holder["state"], metrics = step(holder["state"], batch)
    holder["loss"] = float(jax.block_until_ready(metrics["train/loss"]))

  return run, config, holder


def torch_shaped_step(kind: str, config: Any, dtype: str
                      ) -> Callable[[dict[str, Any]], None]:
  """The PyTorch user's model, one train step on any batch."""
  model = torch_model(kind, config)
  step = _torch_trainer(model, config, dtype)

  def run(batch):
    step(*_torch_inputs(kind, batch))

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


WAYS = ("padded", "buckets", "packed", "dynamic", "grouped")
OURS = ("padded", "buckets", "packed")


def compare_real_lengths(kind: str, dtype: str, batch_size: int,
                         steps_: int, repeats: int, lengths: np.ndarray
                         ) -> tuple[dict[str, float], dict[str, float]]:
  """Seconds per ``batch_size`` products of ours (padded, buckets, packed)
  and PyTorch (dynamic, grouped padding) on batches of real title lengths,
  interleaved; and the packed column's record (products per packed step,
  the last packed step's loss).

  Every way but packed has ``batch_size`` products a step, so its time is
  the mean step time; a packed step holds as many titles as fit its rows
  (about ``batch_size``, varying), so its time is the timed steps' seconds
  over their products, times ``batch_size``: equal work in every column.
  """
  ours, config, holder = our_shaped_step(kind, batch_size, dtype)
  theirs = torch_shaped_step(kind, config, dtype)
  cached = model_kind(kind)[1]
  max_length = int(config.text.max_length)
  n = steps_ * repeats
  plans = {how: batch_lengths(lengths, how, batch_size, n, max_length,
                              seed=1) for how in WAYS if how != "packed"}
  made = {how: [_length_batch(config, l, w, seed=i, cached=cached)
                for i, (l, w) in enumerate(plan)]
          for how, plan in plans.items()}
  packing = packing_of(lengths, batch_size, max_length)
  made["packed"] = [_packed_batch(config, l, packing, seed=i, cached=cached)
                    for i, l in enumerate(packed_lengths(lengths, packing, n,
                                                         seed=1))]
  # Warm-up: every width ours will see (one compile each), two steps.
  widths = sorted({b["input_ids"].shape[1] for how in ("padded", "buckets")
                   for b in made[how]})
  warm = [_length_batch(config, np.full(batch_size, w), w, 0, cached)
          for w in widths]
  warm_packed = made["packed"][:1]
  times: dict[str, list[float]] = {how: [] for how in WAYS}
  losses = []
  for r in range(repeats):
    part = slice(r * steps_, (r + 1) * steps_)
    for how in WAYS:
      run = ours if how in OURS else theirs
      if how == "packed":
        w = warm_packed * 2 if r == 0 else warm_packed
      else:
        w = warm * 2 if r == 0 else warm[:1]
      seconds = mean_time(run, made[how][part], w)
      if how == "packed":
        products = sum(float(b["mask"].sum()) for b in made[how][part])
        seconds *= steps_ * batch_size / products
        losses.append(holder["loss"])
      times[how].append(seconds)
  products = [float(b["mask"].sum()) for b in made["packed"]]
  record = {"rows": packing.rows, "length": packing.length,
            "slots": packing.slots, "products": float(np.mean(products)),
            "loss": losses[-1]}
  if not np.isfinite(record["loss"]):
    raise FloatingPointError(f"packed step's loss is {record['loss']}")
  return {how: statistics.median(t) for how, t in times.items()}, record


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--systems", default=",".join(SYSTEMS),
                      help="Part 1 rows; empty skips part 1.")
  parser.add_argument("--compare",
                      default="text_only,cross_modal,cross_modal_cached",
                      help="Part 2: models timed against PyTorch; "
                      "cross_modal_cached is cross_modal on cached photo "
                      "tokens (no photo tower in either step).")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--real_lengths", default="",
                      help="Part 3: catalogues (fashion,hm) whose real title "
                      "lengths batch the models of --compare, ours padded, "
                      "in length buckets and packed against PyTorch with "
                      "dynamic and length-grouped padding.")
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
        f"{args.batch_size}; ms per {args.batch_size} products (mean step "
        f"ms but for packed, whose steps hold a varying number of products) "
        f"over {args.steps} steps x {args.repeats} repeats (median of "
        "repeats); ratios = PyTorch ms / ours in buckets, and / ours packed:"
        "\n")
  print("| titles | model | dtype | ours padded | ours buckets | ours packed "
        "| PyTorch dynamic | PyTorch grouped | buckets vs dynamic | buckets "
        "vs grouped | packed vs dynamic | packed vs grouped | CPU |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
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
        t, packed = compare_real_lengths(kind, dtype, args.batch_size,
                                         args.steps, args.repeats, lengths)
        ms = {k: v * 1e3 for k, v in t.items()}
        print(f"<!-- {catalogue} {kind} {dtype} packed: {packed['rows']} "
              f"rows x {packed['length']} tokens, up to {packed['slots']} "
              f"titles a row; {packed['products']:.1f} products a step; "
              f"last step's loss {packed['loss']:.4f} -->")
        print(f"| {catalogue} | {kind} | {dtype} | {ms['padded']:.0f} | "
              f"{ms['buckets']:.0f} | {ms['packed']:.0f} | "
              f"{ms['dynamic']:.0f} | {ms['grouped']:.0f} | "
              f"{ms['dynamic'] / ms['buckets']:.2f}x | "
              f"{ms['grouped'] / ms['buckets']:.2f}x | "
              f"{ms['dynamic'] / ms['packed']:.2f}x | "
              f"{ms['grouped'] / ms['packed']:.2f}x | {cpu} |", flush=True)


if __name__ == "__main__":
  main()
