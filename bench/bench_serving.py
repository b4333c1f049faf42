"""Serving latency and throughput: exported model vs the in-process model.

Trains the demo model (or takes ``--workdir``), exports it, and times on the
same encoded inputs (real-looking demo titles and photos, pre-encoded so
only the model is timed):

* latency at batch 1: p50 and p99 over ``--calls`` calls;
* throughput at batch 64: examples/s over ``--calls`` calls;

for (a) ``Predictor.probabilities_of_arrays`` (the deserialized StableHLO,
jitted) and (b) the training code's model, ``jax.jit(model.apply)``, in one
process, interleaved. A third row times ``Predictor.predict`` end to end at
batch 1 (tokenization and image preprocessing included).

  python bench/bench_serving.py [--workdir=RUN] [--calls=200]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import numpy as np


def _times(fn, calls: int) -> np.ndarray:
  fn()  # Compile / warm up.
  out = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return np.asarray(out)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="")
  parser.add_argument("--calls", type=int, default=200)
  args = parser.parse_args()
  from configs import common  # pylint: disable=g-import-not-at-top
  from mic_jax import export  # pylint: disable=g-import-not-at-top
  from mic_jax import trainer  # pylint: disable=g-import-not-at-top
  from mic_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench_serving_"))
  workdir = pathlib.Path(args.workdir) if args.workdir else root / "run"
  if not (workdir / "results.json").exists():
    trainer.train_and_evaluate(common.make_config("cross_modal", "demo"),
                               str(workdir))
  export.export_run(str(workdir), str(root / "export"))
  predictor = Predictor(root / "export")
  model, params, _, config = export.restore(workdir)
  raw = workdir / "demo_data" / "raw"
  photos = sorted((raw / "images").glob("*.jpg"))[:64]
  titles = [f"acme classic canvas sneaker {i}" for i in range(64)]
  text = predictor.encode_titles(titles)
  pixels = np.stack([predictor.encode_image(str(p))[0] for p in photos])
  batch = {**text, "image": pixels, "image_present": np.ones(64, np.int32)}
  apply = jax.jit(lambda p, b: jax.nn.softmax(model.apply({"params": p}, b)[0]))
  device_params = jax.device_put(params)

  def exported(n):
    return lambda: predictor.probabilities_of_arrays(
        {k: v[:n] for k, v in batch.items()})

  def in_process(n):
    sub = {k: v[:n] for k, v in batch.items()}
    return lambda: np.asarray(apply(device_params, sub))

  rows = []
  for name, make in (("exported (Predictor)", exported),
                     ("in-process jax.jit(model.apply)", in_process)):
    one = _times(make(1), args.calls) * 1e3
    many = _times(make(64), max(args.calls // 4, 10))
    rows.append((name, np.percentile(one, 50), np.percentile(one, 99),
                 64 / np.median(many)))
  e2e = _times(lambda: predictor.predict([titles[0]], [str(photos[0])]),
               args.calls) * 1e3
  print(f"demo cross-modal model ({config.image.size}px, max_length "
        f"{config.text.max_length}); jax {jax.__version__}; {args.calls} calls")
  print("\n| path | p50 ms (batch 1) | p99 ms (batch 1) | examples/s (batch 64) |")
  print("|---|---:|---:|---:|")
  for name, p50, p99, eps in rows:
    print(f"| {name} | {p50:.2f} | {p99:.2f} | {eps:,.0f} |")
  print(f"| Predictor.predict end to end (title + photo file) | "
        f"{np.percentile(e2e, 50):.2f} | {np.percentile(e2e, 99):.2f} | - |")


if __name__ == "__main__":
  main()
