"""Shared by the review tests and the README screenshot script.

A review server runs in a background thread on a free port (the real
aiohttp app, the real SQLite store); the browser side drives Debian's
Chromium through Playwright's Python client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import shutil
import threading
from typing import Any, Iterator

from aiohttp import web

from mic_jax.reviewing import queue as queue_lib
from mic_jax.reviewing import server
from mic_jax.reviewing import store as store_lib
from mic_jax.serving import bundle

CHROMIUM = "/usr/bin/chromium"
INSTALL = ("apt-get install -y chromium && pip install playwright "
           "(or pip install -e '.[test]')")


def chromium_or_skip():
  """Playwright's sync API and the path of a Chromium, or a pytest skip."""
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    from playwright import sync_api  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip(f"no playwright: {INSTALL}")
  path = shutil.which("chromium") or (CHROMIUM if pathlib.Path(
      CHROMIUM).exists() else None)
  if path is None:
    pytest.skip(f"no Chromium browser: {INSTALL}")
  return sync_api, path


@contextlib.contextmanager
def running(app: web.Application) -> Iterator[str]:
  """Serves ``app`` on 127.0.0.1 in a thread; yields its base URL."""
  loop = asyncio.new_event_loop()
  runner = web.AppRunner(app, **server.runner_options())
  started = threading.Event()
  url: list[str] = []

  def serve():
    asyncio.set_event_loop(loop)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # pylint: disable=protected-access
    url.append(f"http://127.0.0.1:{port}")
    started.set()
    loop.run_forever()

  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  if not started.wait(30):
    raise RuntimeError("the review server did not start")
  try:
    yield url[0]
  finally:
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


@contextlib.contextmanager
def review_server(scores: pathlib.Path, export_dir: pathlib.Path,
                  db: pathlib.Path, **kwargs: Any
                  ) -> Iterator[tuple[str, store_lib.Store]]:
  """The program's app over ``scores``; yields (URL, store)."""
  store = store_lib.Store(db)
  app = server.make_app(queue_lib.load(scores, export_dir), store, **kwargs)
  with running(app) as url:
    yield url, store


def fake_export(directory: pathlib.Path, labels: list[str],
                taxonomy: dict[str, Any] | None = None) -> pathlib.Path:
  """A bundle with labels (and taxonomy) and a manifest, no model: all the
  review server reads of an export."""
  directory.mkdir(parents=True)
  (directory / bundle.LABELS).write_text("".join(f"{l}\n" for l in labels))
  if taxonomy:
    (directory / bundle.TAXONOMY).write_text(json.dumps(taxonomy))
  bundle.write_manifest(directory, {
      "model": "test", "labels": bundle.LABELS,
      "taxonomy": bundle.TAXONOMY if taxonomy else None})
  return directory


def sample_review(tmp_path: pathlib.Path, labels: list[str],
                  taxonomy: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
  """Five scored products as ``mic-jax-predict`` writes them, over a
  :func:`fake_export`: p1 with a catalogue photo file, p2 with a photo in a
  prepared shard, the others without; p1, p2, p4 abstained; every
  catalogue label is ``labels[0]`` but p3's (``labels[-1]``)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mic_jax.data import records  # pylint: disable=g-import-not-at-top
  export = fake_export(tmp_path / "export", labels, taxonomy)
  identity = bundle.identity(export)
  photos = {}
  for name, colour in (("p1", (200, 30, 30)), ("p2", (30, 30, 200))):
    Image.fromarray(np.full((80, 60, 3), colour, np.uint8)).save(
        tmp_path / f"{name}.jpg")
    photos[name] = (tmp_path / f"{name}.jpg").read_bytes()
  shard = tmp_path / "validation.tfrecord-00000-of-00001"
  records.write_shard(shard, [
      records.Example("p0", "t", [2, 3], [1, 1], 0),
      records.Example("p2", "t", [2, 3], [1, 1], 1, image_jpeg=photos["p2"])])
  rows = []
  for i, (top, prob, abstain) in enumerate([
      (0, 0.9, False), (1, 0.4, True), (2, 0.3, True), (3, 0.95, False),
      (0, 0.5, True)]):
    order = [top] + [j for j in range(len(labels)) if j != top][:4]
    rows.append({
        "id": f"p{i}", "title": f"product number {i}",
        # p3's catalogue label is outside its top 5 when there are 6+.
        "label": labels[-1] if i == 3 else labels[0],
        "top_k": [{"label": labels[j], "prob": prob if j == top else
                   (1 - prob) / 4} for j in order],
        "abstain": abstain, "export": identity,
        "photo": ({"file": str(tmp_path / "p1.jpg")} if i == 1 else
                  {"tfrecord": str(shard), "index": 1} if i == 2 else None)})
  scores = tmp_path / "scores.jsonl"
  scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return {"export": export, "scores": scores, "rows": rows,
          "photos": photos, "db": tmp_path / "review.sqlite"}


@contextlib.contextmanager
def sample_site(tmp_path: pathlib.Path, labels: list[str],
                taxonomy: dict[str, Any] | None, reviewers: tuple[str, ...],
                **kwargs: Any) -> Iterator[dict[str, Any]]:
  """:func:`sample_review` served, with reviewers: yields its dict plus
  ``url``, ``store`` and ``tokens`` (name -> token)."""
  sample = sample_review(tmp_path, labels, taxonomy)
  store = store_lib.Store(sample["db"])
  tokens = {name: store.add_reviewer(name) for name in reviewers}
  with review_server(sample["scores"], sample["export"], sample["db"],
                     **kwargs) as (url, store):
    yield {**sample, "url": url, "store": store, "tokens": tokens}


def sign_in(page: Any, url: str, token: str) -> None:
  """Signs in through the page's form and waits for the queue."""
  page.goto(url + "/")
  page.fill("#token", token)
  page.click("button[type=submit]")
  page.wait_for_selector("body[data-ready='1']")


def screenshot(url: str, token: str, path: pathlib.Path, *,
               executable: str, sync_api: Any, width: int = 1100,
               height: int = 640) -> None:
  """A PNG of the page as a signed-in reviewer first sees it."""
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=executable,
                                args=["--no-sandbox"])
    try:
      page = browser.new_page(viewport={"width": width, "height": height})
      sign_in(page, url, token)
      image = page.locator("#photo img")
      if image.count():
        sync_api.expect(image).to_have_js_property("complete", True,
                                                   timeout=120_000)
      path.parent.mkdir(parents=True, exist_ok=True)
      page.screenshot(path=str(path))
    finally:
      browser.close()
