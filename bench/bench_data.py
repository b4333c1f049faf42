r"""Throughput of data_prep (products/s) and of the tf.data pipeline.

  python bench/bench_data.py --fashion_dir=../shared/data/fashion-products \
    --tokenizer=TOKENIZER_DIR --prepared=/tmp/bench_prepared

Prepares the fashion catalogue (articleType, max_length 32) with all cores,
then times train and eval batches at 224x224 under the host allocator the
trainer would use (``--host_malloc``, mic_jax/hostmem.py). The pipeline
figure is reported per core because tf.data scales with the cores a host
gives it: multiply by a host's cores for a first estimate of whether input
will keep up with the accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mic_jax import hostmem  # noqa: E402


def _time_batches(batches, batch_size: int, warmup: int, steps: int
                  ) -> float:
  """Examples per second over ``steps`` batches after ``warmup`` batches."""
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--fashion_dir", default="../shared/data/fashion-products")
  p.add_argument("--tokenizer", required=True)
  p.add_argument("--prepared", default="/tmp/mic_jax_bench_prepared")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--host_malloc", default="auto", choices=hostmem.MODES,
                 help="This process's allocator, as the trainer sets it "
                 "(mic_jax/hostmem.py): the pipeline runs under it.")
  args = p.parse_args()
  allocator = hostmem.configure(args.host_malloc)
  # After the allocator: TensorFlow starts its threads when imported.
  # pylint: disable=g-import-not-at-top
  from data_prep import prepare
  from mic_jax.data import pipeline
  # pylint: enable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))

  shutil.rmtree(args.prepared, ignore_errors=True)
  start = time.perf_counter()
  stats = prepare.run(prepare.build_parser().parse_args([
      f"--input={args.fashion_dir}", "--fashion_level=articleType",
      f"--tokenizer={args.tokenizer}", "--max_length=32",
      f"--output_dir={args.prepared}", f"--num_workers={cores}"]))
  prep_seconds = time.perf_counter() - start

  train = _time_batches(pipeline.train_batches(
      args.prepared, batch_size=args.batch_size, image_size=args.image_size,
      seed=0), args.batch_size, warmup=5, steps=args.steps)
  start = time.perf_counter()
  count = 0
  for batch in pipeline.eval_batches(args.prepared, "validation",
                                     batch_size=args.batch_size,
                                     image_size=args.image_size):
    count += int(batch["mask"].sum())
  evaluation = count / (time.perf_counter() - start)
  result = {
      "cores": cores,
      "host_allocator": allocator,
      "data_prep_products": stats["rows_in"],
      "data_prep_seconds": round(prep_seconds, 1),
      "data_prep_products_per_s": round(stats["rows_in"] / prep_seconds, 1),
      "train_examples_per_s": round(train, 1),
      "train_examples_per_s_per_core": round(train / cores, 1),
      "eval_examples_per_s": round(evaluation, 1),
      "eval_examples_per_s_per_core": round(evaluation / cores, 1),
  }
  print(json.dumps(result, indent=1))
  print("| measure | value |\n|---|---|")
  for key, value in result.items():
    print(f"| {key} | {value} |")


if __name__ == "__main__":
  main()
