"""The review page at marketplace scale: 10k, 100k and 1M products.

For each size, writes a synthetic score file (products of a fake export
with 50 labels, a tenth abstained, each with one of four small JPEGs),
decides half of the products straight in the review database, starts
``python -m mic_jax.review`` twice (the second start reuses the queue's
index, the score file being unchanged) and measures:

  cold start   from the program's start until it answers HTTP, the index
               built (streamed from the score file, ranked, synced with
               the half decided)
  build RSS    that first server's peak RSS (VmHWM) once it answers
  warm start   the same, the second time: the index reused
  first page   GET /api/queue (its first page), as an API client
  next page    GET /api/queue?after=RANK (what the page fetches as a key
               press reaches the end of what it holds; median of 20)
  API decision POST /api/decisions on an undecided product (median of 20)
  usable page  sign-in form submitted -> the page says it is ready
  key j        a key press -> the next product's title shown (median of 10)
  decision     Enter -> saved, the progress updated and the next undecided
               product shown (median of 10)
  peak RSS     the (warm) server's VmHWM after all of the above

in headless Chromium (Debian's, through Playwright).

  nice -n 19 python bench/bench_review.py --sizes=10000,100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

import requests

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mic_jax.reviewing import store as store_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from mic_jax.serving import bundle  # pylint: disable=g-import-not-at-top,wrong-import-position

LABELS = [f"label_{i:02d}" for i in range(50)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def make_inputs(directory: pathlib.Path, n: int) -> dict[str, pathlib.Path]:
  """A fake export, four JPEGs and a score file of ``n`` products."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  export = directory / "export"
  export.mkdir(parents=True)
  (export / bundle.LABELS).write_text("".join(f"{l}\n" for l in LABELS))
  bundle.write_manifest(export, {"model": "bench", "labels": bundle.LABELS,
                                 "taxonomy": None})
  identity = bundle.identity(export)
  photos = []
  for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200),
                              (200, 200, 40)]):
    path = directory / f"photo{i}.jpg"
    Image.new("RGB", (96, 96), colour).save(path)
    photos.append(str(path))
  rng = random.Random(0)
  scores = directory / "scores.jsonl"
  with open(scores, "w") as f:
    for i in range(n):
      top = rng.sample(range(len(LABELS)), 5)
      p = rng.random()
      f.write(json.dumps({
          "id": f"p{i:07d}", "title": f"synthetic product {i} of the bench",
          "label": LABELS[top[rng.randrange(5)]],
          "top_k": [{"label": LABELS[top[0]], "prob": round(p, 4)}] + [
              {"label": LABELS[j], "prob": round((1 - p) / 4, 4)}
              for j in top[1:]],
          "abstain": rng.random() < 0.1, "export": identity,
          "photo": {"file": photos[i % 4]}}) + "\n")
  return {"export": export, "scores": scores, "identity": identity}


def decide_half(db: pathlib.Path, n: int, identity: str) -> None:
  """Every second product decided, written as the store writes it."""
  store_lib.Store(db)
  rows = [(f"p{i:07d}", "accepted", LABELS[0], "bench", identity,
           "2026-12-07T00:00:00+00:00", 1) for i in range(0, n, 2)]
  with sqlite3.connect(db) as con:
    con.executemany("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows)
    con.executemany("INSERT INTO history (product_id, status, label, "
                    "reviewer, export, decided_at, version, replaced_version)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 0)", rows)


def _rss_peak_mb(pid: int) -> float:
  for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  return float("nan")


def measure(n: int, chromium: str, work: pathlib.Path) -> dict[str, float]:
  """One size: the figures of the module docstring."""
  from playwright import sync_api  # pylint: disable=g-import-not-at-top
  inputs = make_inputs(work, n)
  db = work / "review.sqlite"
  decide_half(db, n, inputs["identity"])
  token = store_lib.Store(db).add_reviewer("alice")
  cold = _start(db, inputs, work)
  out = {"cold start s": cold["seconds"], "build RSS MB":
         _rss_peak_mb(cold["server"].pid)}
  _stop(cold["server"])
  warm = _start(db, inputs, work)
  server, base = warm["server"], warm["base"]
  out["warm start s"] = warm["seconds"]
  auth = {"Authorization": f"Bearer {token}"}
  try:
    t = time.perf_counter()
    r = requests.get(base + "/api/queue", timeout=60, headers=auth)
    out["first page ms"] = (time.perf_counter() - t) * 1000
    out["first page kB"] = len(r.content) / 1000
    times = []
    for k in range(20):
      after = (k + 1) * 4999 % n
      t = time.perf_counter()
      requests.get(f"{base}/api/queue?after={after}&limit=100", timeout=60,
                   headers=auth).raise_for_status()
      times.append((time.perf_counter() - t) * 1000)
    out["next page ms"] = statistics.median(times)
    times = []
    for k in range(20):  # Odd products are undecided (decide_half).
      product = f"p{(2 * k * 7919 + 1) % n:07d}"
      t = time.perf_counter()
      requests.post(base + "/api/decisions", timeout=60, headers=auth,
                    json={"product": product, "status": "accepted",
                          "label": LABELS[1], "base_version": 0}
                    ).raise_for_status()
      times.append((time.perf_counter() - t) * 1000)
    out["API decision ms"] = statistics.median(times)
    with sync_api.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=chromium,
                                  args=["--no-sandbox"])
      # The page's CSP forbids eval, which wait_for_function needs.
      page = browser.new_page(viewport={"width": 1200, "height": 800},
                              bypass_csp=True)
      page.goto(base + "/")
      page.fill("#token", token)
      t = time.perf_counter()
      page.click("button[type=submit]")
      page.wait_for_selector("body[data-ready='1']", timeout=120_000)
      out["usable page s"] = time.perf_counter() - t
      out["elements"] = page.evaluate(
          "document.getElementsByTagName('*').length")
      # Decisions first: the page starts on an undecided product, and each
      # decision moves on to the next one (j may land on decided ones).
      out["decision ms"] = _median_ms(page, "Enter", 10)
      out["key j ms"] = _median_ms(page, "j", 10)
      browser.close()
    out["peak RSS MB"] = _rss_peak_mb(server.pid)
  finally:
    _stop(server)
  return out


def _start(db: pathlib.Path, inputs: dict[str, pathlib.Path],
           work: pathlib.Path) -> dict[str, object]:
  """Starts the review program; returns it once it answers HTTP, with
  how long that took."""
  port = _free_port()
  base = f"http://127.0.0.1:{port}"
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  t0 = time.perf_counter()
  server = subprocess.Popen(
      [sys.executable, "-m", "mic_jax.review", f"--db={db}",
       f"--scores={inputs['scores']}", f"--export={inputs['export']}",
       f"--port={port}"], env=env, cwd=work, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  while True:
    if server.poll() is not None:
      raise RuntimeError(f"the server exited ({server.returncode})")
    try:
      requests.get(base + "/", timeout=5)
      break
    except requests.ConnectionError:
      time.sleep(0.05)
  return {"server": server, "base": base,
          "seconds": time.perf_counter() - t0}


def _stop(server: subprocess.Popen) -> None:
  server.terminate()
  server.wait(30)


def _median_ms(page, key: str, repeats: int) -> float:
  """A key press until the next product's title is drawn (and, for a
  decision, the progress line updated)."""
  times = []
  for _ in range(repeats):
    before = page.inner_text("#title"), page.inner_text("#progress")
    t = time.perf_counter()
    page.keyboard.press(key)
    try:
      _wait(page, before, key)
    except Exception as e:
      raise RuntimeError(f"{key}: still {before}, now "
                         f"{page.inner_text('#title')!r}") from e
    times.append((time.perf_counter() - t) * 1000)
  return statistics.median(times)


def _wait(page, before, key):
    page.wait_for_function(
        "([title, progress, decision]) => document.getElementById('title')"
        ".textContent !== title && !document.getElementById('title')"
        ".textContent.startsWith('loading') && (!decision || document"
        ".getElementById('progress').textContent !== progress)",
        arg=[before[0], before[1], key == "Enter"], timeout=60_000,
        polling=5)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="10000,100000,1000000")
  parser.add_argument("--chromium", default="/usr/bin/chromium")
  args = parser.parse_args()
  rows = []
  for n in [int(s) for s in args.sizes.split(",")]:
    with tempfile.TemporaryDirectory(prefix="bench-review-") as work:
      rows.append((n, measure(n, args.chromium, pathlib.Path(work))))
      print(n, rows[-1], flush=True)
  columns = list(rows[0][1])
  print("| products | " + " | ".join(columns) + " |")
  print("|---:|" + "---:|" * len(columns))
  for n, figures in rows:
    print(f"| {n:,} | " + " | ".join(
        f"{figures[c]:,.0f}" if figures[c] >= 100 else f"{figures[c]:.2f}"
        for c in columns) + " |")


if __name__ == "__main__":
  main()
