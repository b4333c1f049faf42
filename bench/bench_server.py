"""The HTTP service under concurrent load: dynamic batching on vs off.

Exports a trained run (``--workdir``; default: trains the demo cross-modal
model), starts ``python -m mic_jax.serve`` twice on localhost, once with
dynamic batching (``--max_batch_size=64 --batch_delay_ms=D``) and once
without (``--max_batch_size=1``), and drives each with ``--clients``
concurrent clients sending one product per request (a real title and a
real photo, base64) for ``--seconds``. Reports requests/s and the p50/p99
request latency seen by the clients, and the mean merged batch size the
server reports in ``/healthz``.

The clients run on the same machine as the server and take CPU from it, so
absolute figures are pessimistic; the two configurations are measured
alternately, ``--rounds`` times each, in one run.

  python bench/bench_server.py --workdir=runs/table2/cross_modal --clients=16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


async def _wait_healthy(session, base: str, server: subprocess.Popen,
                        log) -> None:
  deadline = time.time() + 300
  while True:
    if server.poll() is not None:
      log.seek(0)
      raise RuntimeError(f"server exited: {log.read().decode()[-3000:]}")
    try:
      async with session.get(base + "/healthz") as r:
        if r.status == 200:
          return
    except OSError:
      pass
    if time.time() > deadline:
      raise RuntimeError("server did not come up in 300 s")
    await asyncio.sleep(0.5)


async def _load(base: str, bodies: list[bytes], clients: int,
                seconds: float) -> tuple[list[float], dict]:
  import aiohttp  # pylint: disable=g-import-not-at-top
  latencies: list[float] = []
  async with aiohttp.ClientSession() as session:
    stop = time.perf_counter() + seconds

    async def client(k: int) -> None:
      i = k
      while time.perf_counter() < stop:
        start = time.perf_counter()
        async with session.post(base + "/v1/predict", data=bodies[
            i % len(bodies)], headers={"Content-Type": "application/json"}
                                ) as r:
          await r.read()
          if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        latencies.append(time.perf_counter() - start)
        i += clients

    await asyncio.gather(*(client(k) for k in range(clients)))
    async with session.get(base + "/healthz") as r:
      stats = (await r.json())["batching"]
  return latencies, stats


def _start(export_dir: pathlib.Path, port: int, batching: bool,
           delay_ms: float, log) -> subprocess.Popen:
  flags = (["--max_batch_size=64", f"--batch_delay_ms={delay_ms}"] if batching
           else ["--max_batch_size=1", "--batch_delay_ms=0"])
  return subprocess.Popen(
      [sys.executable, "-m", "mic_jax.serve", f"--model={export_dir}",
       f"--port={port}", *flags], cwd=REPO, stdout=subprocess.DEVNULL,
      stderr=log)  # A file: an unread pipe would fill up and stall it.


async def _measure(export_dir, bodies, args, batching: bool):
  import aiohttp  # pylint: disable=g-import-not-at-top
  port = _free_port()
  log = tempfile.TemporaryFile()
  server = _start(export_dir, port, batching, args.delay_ms, log)
  base = f"http://127.0.0.1:{port}"
  try:
    async with aiohttp.ClientSession() as session:
      await _wait_healthy(session, base, server, log)
    await _load(base, bodies, args.clients, 2.0)  # Warm up the path.
    return await _load(base, bodies, args.clients, args.seconds)
  finally:
    server.terminate()
    server.wait(timeout=30)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="")
  parser.add_argument("--clients", type=int, default=16)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--delay_ms", type=float, default=2.0)
  args = parser.parse_args()
  sys.path.insert(0, str(REPO))
  # pylint: disable=g-import-not-at-top
  from configs import common
  from mic_jax import export
  from mic_jax import trainer
  from mic_jax.evaluation import reporting
  # pylint: enable=g-import-not-at-top
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench_server_"))
  workdir = pathlib.Path(args.workdir) if args.workdir else root / "run"
  if not (workdir / "results.json").exists():
    trainer.train_and_evaluate(common.make_config("cross_modal", "demo"),
                               str(workdir))
  export_dir = root / "export"
  export.export_run(str(workdir), str(export_dir))
  manifest = json.loads((export_dir / "manifest.json").read_text())
  config = reporting.read_config(str(workdir))
  photos = _sample_photos(export.data_dir_of(config, workdir))
  bodies = [json.dumps({"top_k": 3, "instances": [{
      "title": title, "image_b64": base64.b64encode(photo).decode()}]}
  ).encode() for title, photo in photos]

  results = {True: [], False: []}
  for _ in range(args.rounds):
    for batching in (False, True):
      latencies, stats = asyncio.run(_measure(export_dir, bodies, args,
                                              batching))
      results[batching].append((len(latencies) / args.seconds,
                                np.percentile(latencies, 50) * 1e3,
                                np.percentile(latencies, 99) * 1e3,
                                stats["mean_batch"]))
  print(f"model {manifest['model']} from {workdir}; {args.clients} "
        f"concurrent clients, 1 product (title + photo) per request, "
        f"{args.seconds:.0f} s x {args.rounds} rounds each, alternating")
  print("\n| server | requests/s | p50 ms | p99 ms | mean batch |")
  print("|---|---:|---:|---:|---:|")
  for batching, name in ((False, "no batching (--max_batch_size=1)"),
                         (True, f"dynamic batching (64, {args.delay_ms:g} ms)")):
    rows = np.asarray(results[batching])
    rps, p50, p99, mean = np.median(rows, axis=0)
    print(f"| {name} | {rps:.1f} | {p50:.1f} | {p99:.1f} | {mean:.2f} |")
  ratio = (np.median(np.asarray(results[True])[:, 0])
           / np.median(np.asarray(results[False])[:, 0]))
  print(f"\nthroughput ratio, batching / none: {ratio:.2f}x")


def _sample_photos(data_dir: pathlib.Path, count: int = 64) -> list[tuple[str, bytes]]:
  """Titles and JPEG bytes of real validation products of the run's data."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  files = sorted(str(p) for p in data_dir.glob("validation*.tfrecord*"))
  if not files:
    raise FileNotFoundError(f"no validation TFRecords in {data_dir}")
  spec = {"title": tf.io.FixedLenFeature([], tf.string),
          "image/encoded": tf.io.FixedLenFeature([], tf.string, b""),
          "image/present": tf.io.FixedLenFeature([], tf.int64, 0)}
  out = []
  for record in tf.data.TFRecordDataset(files):
    example = tf.io.parse_single_example(record, spec)
    if int(example["image/present"]):
      out.append((example["title"].numpy().decode("utf-8"),
                  example["image/encoded"].numpy()))
    if len(out) == count:
      break
  return out


if __name__ == "__main__":
  main()
