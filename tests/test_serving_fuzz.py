"""The HTTP service under bad input and concurrent load (issue 13).

A real ``python -m mic_jax.serve`` process on 127.0.0.1 serves a tiny
exported model. Hypothesis draws rounds of requests: malformed bodies,
wrong types, huge titles, non-image bytes, huge and truncated photos,
mixed with good requests, and each round is sent by concurrent clients.
Every bad request must get a 4xx whose message names the problem, every
good one the Predictor's own answer; the server must keep serving and its
resident memory must not keep growing.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import hypothesis
from hypothesis import strategies as st
import numpy as np
from PIL import Image
import pytest

import demo_configs
from data_prep import prepare
from mic_jax import export
from mic_jax import trainer
from mic_jax.data import demo

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_INSTANCES = 8
MAX_BODY = 1_000_000
CLIENTS = 6
RSS_GROWTH_LIMIT_MB = 300  # Generous: a per-request leak of a decoded
# photo (megabytes) over the ~150 requests here would exceed it.


# ------------------------------------------------------------ photos --

def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def _photos() -> dict[str, bytes]:
  """Good and bad photo bytes, made once (deterministic)."""
  rng = np.random.default_rng(0)
  small = _jpeg(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
  y, x = np.mgrid[0:1200, 0:1600]
  gradient = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
  rgba = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8),
                  "RGBA").save(rgba, format="PNG")
  huge = io.BytesIO()  # 144 Mpixel: refused from the header, never decoded.
  Image.new("1", (12000, 12000)).save(huge, format="PNG")
  forged = bytearray(small)  # A JPEG whose frame header claims 65000 x 65000.
  sof = forged.index(b"\xff\xc0")
  forged[sof + 5:sof + 9] = (65000).to_bytes(2, "big") * 2
  return {"small": small, "big": _jpeg(gradient), "rgba": rgba.getvalue(),
          "huge": huge.getvalue(), "forged": bytes(forged)}


PHOTOS = _photos()
GOOD_PHOTOS = ("small", "big", "rgba")


# ------------------------------------------------------------- cases --

@dataclasses.dataclass
class Case:
  """One request and what must come back.

  ``status``/``message``: a client error. Otherwise the answer is the
  Predictor's for ``titles``/``images``/``top_k`` (which may itself be a
  400 naming the photo, e.g. for a truncated JPEG).
  """
  kind: str
  body: bytes
  status: int | None = None
  message: str = ""
  titles: list[str] = dataclasses.field(default_factory=list)
  images: list[bytes | None] = dataclasses.field(default_factory=list)
  top_k: int = 5


def _body(payload: Any) -> bytes:
  return json.dumps(payload).encode()


def _instances(titles, images):
  return [{"title": t, "image_b64": None if im is None else
           base64.b64encode(im).decode()} for t, im in zip(titles, images)]


titles_st = st.text(min_size=1, max_size=60).filter(str.strip)
photo_st = st.one_of(st.none(), st.sampled_from(GOOD_PHOTOS).map(PHOTOS.get))


@st.composite
def good_case(draw) -> Case:
  n = draw(st.integers(1, 4))
  titles = draw(st.lists(titles_st, min_size=n, max_size=n))
  if draw(st.booleans()):  # A huge (but within the body limit) title.
    titles[0] = "leather tote " * draw(st.integers(1000, 20000))
  images = draw(st.lists(photo_st, min_size=n, max_size=n))
  top_k = draw(st.integers(1, 12))
  return Case("good", _body({"instances": _instances(titles, images),
                             "top_k": top_k}),
              titles=titles, images=images, top_k=top_k)


@st.composite
def photo_case(draw) -> Case:
  """A title with a suspect photo; the Predictor says what must happen."""
  which = draw(st.sampled_from(["truncated", "random", "huge", "forged"]))
  if which == "truncated":
    data = PHOTOS[draw(st.sampled_from(["small", "big"]))]
    data = data[:draw(st.integers(0, len(data) - 1))]
  elif which == "random":
    data = draw(st.binary(max_size=3000))
  else:
    data = PHOTOS[which]
  titles, images = ["canvas sneaker"], [data]
  if draw(st.booleans()):  # Behind a good product: the index is named.
    titles, images = ["urban watch"] + titles, [PHOTOS["small"]] + images
  return Case(f"photo:{which}", _body({"instances": _instances(titles,
                                                               images)}),
              titles=titles, images=images)


@st.composite
def malformed_case(draw) -> Case:
  which = draw(st.sampled_from(["cut", "bytes", "deep"]))
  if which == "cut":
    good = _body({"instances": [{"title": "slim tote"}]})
    body = good[:draw(st.integers(0, len(good) - 1))]
  elif which == "bytes":  # Not UTF-8 at all.
    body = b"\xff" + draw(st.binary(max_size=200))
  else:
    body = b"[" * draw(st.integers(10_000, 200_000))
  return Case(f"malformed:{which}", body, 400, "malformed JSON")


not_object = st.one_of(st.integers(), st.floats(allow_nan=False),
                       st.text(max_size=20), st.booleans(), st.none(),
                       st.lists(st.integers(), max_size=3))


@st.composite
def wrong_type_case(draw) -> Case:
  which = draw(st.sampled_from(["body", "instances", "empty", "instance",
                                "title", "image", "top_k", "base64",
                                "too_many", "too_big"]))
  ok = {"title": "casual sneaker"}
  if which == "body":
    return Case(which, _body(draw(not_object)), 400, "the body must be")
  if which == "instances":
    return Case(which, _body({"instances": draw(st.one_of(
        st.integers(), st.text(max_size=5), st.none(),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))}),
                400, "the body must be")
  if which == "empty":
    return Case(which, _body({"instances": []}), 400, "no instances")
  if which == "instance":
    return Case(which, _body({"instances": [ok, draw(not_object)]}), 400,
                "instance 1: expected an object")
  if which == "title":
    title = draw(st.one_of(not_object.filter(lambda v: not isinstance(v, str)),
                           st.sampled_from(["", "   ", "\n\t"])))
    return Case(which, _body({"instances": [{"title": title}]}), 400,
                "instance 0: missing or empty 'title'")
  if which == "image":
    image = draw(st.one_of(st.integers(), st.booleans(),
                           st.lists(st.integers(), min_size=1, max_size=3),
                           st.dictionaries(st.text(max_size=3), st.integers(),
                                           min_size=1, max_size=2)))
    return Case(which, _body({"instances": [{**ok, "image_b64": image}]}),
                400, "instance 0: 'image_b64' is not base64")
  if which == "base64":
    text = draw(st.sampled_from(["%%%", "data:image/jpeg;base64,AAAA",
                                 "abc", "AAAA\nAAAA"]))
    return Case(which, _body({"instances": [{**ok, "image_b64": text}]}),
                400, "not base64")
  if which == "top_k":
    top_k = draw(st.one_of(st.integers(max_value=0), st.booleans(),
                           st.floats(allow_nan=False), st.text(max_size=3),
                           st.none()))
    return Case(which, _body({"instances": [ok], "top_k": top_k}), 400,
                "top_k must be a positive integer")
  if which == "too_many":
    n = draw(st.integers(MAX_INSTANCES + 1, 40))
    return Case(which, _body({"instances": [ok] * n}), 413,
                f"at most {MAX_INSTANCES}")
  return Case(which, _body({"instances": [
      {"title": "x" * draw(st.integers(MAX_BODY, 2 * MAX_BODY))}]}), 413,
              f"over {MAX_BODY} bytes")


case_st = st.one_of(good_case(), photo_case(), malformed_case(),
                    wrong_type_case())


# ------------------------------------------------------------ server --

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  """A tiny cross-modal export (a few steps on a small demo catalogue)."""
  root = tmp_path_factory.mktemp("fuzz")
  demo.write_catalogue(root / "raw", image_size=32, num_products=240)
  prepare.main([
      f"--input={root / 'raw' / 'catalogue.csv'}",
      f"--output_dir={root / 'prepared'}",
      f"--tokenizer={root / 'raw' / 'tokenizer'}", "--max_length=16",
      "--image_column=image", "--split_column=split", "--num_workers=1",
      "--max_image_side=64"])
  config = demo_configs.short_demo(
      "cross_modal", total_steps=2, log_every=2, eval_every=2,
      **{"data.demo": False, "data.dir": str(root / "prepared")})
  trainer.train_and_evaluate(config, str(root / "run"))
  export.export_run(str(root / "run"), str(root / "export"))
  return root / "export"


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = open(tmp_path_factory.mktemp("server") / "log.txt", "w+b")
  process = subprocess.Popen(
      [sys.executable, "-m", "mic_jax.serve", f"--model={export_dir}",
       "--host=127.0.0.1", f"--port={port}",
       f"--max_instances={MAX_INSTANCES}", f"--max_body_bytes={MAX_BODY}",
       "--max_batch_size=8", "--batch_delay_ms=5"],
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  base = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 900  # Start-up compiles; slow on a busy CPU.
    while True:
      if process.poll() is not None:
        log.seek(0)
        pytest.fail("server died: " + log.read().decode()[-3000:])
      try:
        if _get(base + "/healthz")["status"] == "ok":
          break
      except OSError:
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.5)
    yield process, base
  finally:
    process.terminate()
    try:
      process.wait(timeout=60)
    except subprocess.TimeoutExpired:  # A busy CPU; it has done its job.
      process.kill()
      process.wait(timeout=30)
    log.close()


def _get(url: str) -> dict[str, Any]:
  with urllib.request.urlopen(url, timeout=10) as r:
    return json.loads(r.read())


def _post(url: str, body: bytes) -> tuple[int, Any]:
  request = urllib.request.Request(url, data=body, method="POST", headers={
      "Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _rss_mb(pid: int) -> float:
  for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  raise AssertionError("no VmRSS")


def _check(case: Case, status: int, reply: Any, predictor) -> None:
  """``reply`` is what ``case`` must get (see :class:`Case`)."""
  from mic_jax.serving import PredictionError  # pylint: disable=g-import-not-at-top
  where = f"{case.kind}: {case.body[:120]!r} -> {status} {str(reply)[:300]}"
  if case.status is not None:
    assert status == case.status, where
    assert case.message in reply["error"], where
    return
  try:
    want = predictor.predict(case.titles, case.images, top_k=case.top_k)
  except PredictionError as e:
    assert status == 400, where
    # The server's message, with its own numbering (object addresses of a
    # library's message, if any, differ between processes).
    same = lambda m: re.sub(r" at 0x[0-9a-f]+", "", m)
    assert same(str(e).replace("product", "instance", 1)) == same(
        reply["error"]), where
    return
  assert status == 200, where
  assert len(reply["predictions"]) == len(want), where
  for got, expected in zip(reply["predictions"], want):
    assert got["abstain"] == expected["abstain"], where
    got_p = [e["prob"] for e in got["top_k"]]
    want_p = [e["prob"] for e in expected["top_k"]]
    np.testing.assert_allclose(got_p, want_p, atol=1e-5, err_msg=where)
    gaps = np.abs(np.diff(want_p))
    if len(gaps) == 0 or gaps.min() > 1e-5:  # No near-tie to reorder.
      assert [e["label"] for e in got["top_k"]] == [
          e["label"] for e in expected["top_k"]], where


def _send_round(base: str, cases: list[Case], predictor) -> None:
  with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
    replies = list(pool.map(lambda c: _post(base + "/v1/predict", c.body),
                            cases, timeout=300))
  for case, (status, reply) in zip(cases, replies):
    _check(case, status, reply, predictor)


def test_server_survives_bad_input_under_load(server, export_dir):
  from mic_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  process, base = server
  predictor = Predictor(export_dir)
  kinds: set[str] = set()

  def rounds(cases):
    kinds.update(c.kind.split(":")[0] for c in cases)
    _send_round(base, cases, predictor)
    assert process.poll() is None, "the server exited"
    assert _get(base + "/healthz")["status"] == "ok"

  def run(examples: int, seed: int) -> None:
    hypothesis.seed(seed)(hypothesis.settings(
        max_examples=examples, deadline=None, database=None,
        phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate),
        suppress_health_check=list(hypothesis.HealthCheck))(
            hypothesis.given(st.lists(case_st, min_size=3, max_size=8))(
                rounds)))()

  # Warm-up rounds of every kind, so the allocator and the thread pools
  # reach their working size before memory is measured.
  run(6, seed=1)
  rss_warm = _rss_mb(process.pid)
  started = time.time()
  run(30, seed=2)
  rss_end = _rss_mb(process.pid)
  elapsed = time.time() - started
  print(f"fuzz: {elapsed:.1f} s, kinds {sorted(kinds)}, "
        f"RSS {rss_warm:.0f} -> {rss_end:.0f} MB")
  assert {"good", "photo", "malformed"} <= kinds and len(kinds) >= 8, kinds
  assert rss_end - rss_warm < RSS_GROWTH_LIMIT_MB, (rss_warm, rss_end)
  # Still answering good requests correctly after all that.
  case = Case("good", _body({"instances": _instances(
      ["acme classic sneaker"], [PHOTOS["small"]])}),
              titles=["acme classic sneaker"], images=[PHOTOS["small"]])
  _send_round(base, [case], predictor)
