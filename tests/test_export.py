"""Export -> Predictor equals the in-process model, in a process without it.

One tiny demo run is trained and exported per module. The compared batch
is real fashion products (titles and photos from ../shared/data), some
passed without a photo; a demo model's labels mean nothing for them, the
test is about equality.
"""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import demo_configs
from mic_jax import export
from mic_jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("export") / "run"
  trainer.train_and_evaluate(
      demo_configs.short_demo("cross_modal", total_steps=6, log_every=3,
                              eval_every=3), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def export_dir(run_dir):
  out = run_dir.parent / "export"
  export.export_run(str(run_dir), str(out))
  return out


@pytest.fixture(scope="module")
def products(fashion_dir):
  rows = list(csv.DictReader(open(fashion_dir / "styles.csv",
                                  encoding="utf-8")))[:12]
  titles = [r["productDisplayName"] for r in rows]
  images = [str(fashion_dir / "images" / f"{r['id']}.jpg") if i % 4 else None
            for i, r in enumerate(rows)]
  return titles, images


def _in_process_probs(run_dir, predictor, titles, images):
  """The training code's model on the predictor's encoded inputs."""
  model, params, _, _ = export.restore(run_dir)
  text = predictor.encode_titles(titles)
  pixels = [predictor.encode_image(im, i) for i, im in enumerate(images)]
  batch = {**text, "image": np.stack([p for p, _ in pixels]),
           "image_present": np.array([f for _, f in pixels], np.int32)}
  logits, _ = model.apply({"params": params}, batch)
  # Calibrated: the run's temperature, fitted on validation (issue 15).
  calibration = run_dir / "calibration.json"
  temperature = (json.loads(calibration.read_text())["temperature"]
                 if calibration.exists() else 1.0)
  return np.asarray(jax.nn.softmax(logits / temperature, axis=-1))


def test_export_equals_in_process_model(run_dir, export_dir, products):
  from mic_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  titles, images = products
  predictor = Predictor(export_dir)
  got = predictor.probabilities(titles, images)
  want = _in_process_probs(run_dir, predictor, titles, images)
  assert predictor.temperature == pytest.approx(json.loads(
      (run_dir / "calibration.json").read_text())["temperature"])
  assert got.shape == (12, 8)
  assert np.abs(got - want).max() <= 1e-5
  results = predictor.predict(titles, images, top_k=3)
  for p, r in zip(got, results):
    assert [e["prob"] for e in r["top_k"]] == sorted(p, reverse=True)[:3]
    assert r["abstain"] == (r["top_k"][0]["prob"] < predictor.threshold)
  manifest = json.loads((export_dir / "manifest.json").read_text())
  assert manifest["platforms"][0] == "cpu"
  assert manifest["metrics"]["test"]["num_examples"] > 0
  abstain = manifest["abstain"]
  assert abstain["threshold"] == 1.0 or abstain["validation_precision"] >= 0.95


def test_export_loads_in_a_process_without_model_code(export_dir, products):
  from mic_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  titles, images = products
  want = Predictor(export_dir).probabilities(titles, images)
  script = (
      "import json, sys\n"
      "from mic_jax.serving import Predictor\n"
      f"p = Predictor({str(export_dir)!r})\n"
      f"probs = p.probabilities({titles!r}, {images!r})\n"
      "bad = [m for m in ('flax', 'mic_jax.models', 'mic_jax.train', "
      "'optax', 'orbax') if m in sys.modules]\n"
      "print(json.dumps({'probs': probs.tolist(), 'loaded': bad}))\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=300)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["loaded"] == []
  np.testing.assert_allclose(result["probs"], want, atol=1e-6)


def test_reexport_is_byte_identical_and_bf16_is_close(run_dir, export_dir,
                                                      products):
  from mic_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  again = run_dir.parent / "again"
  export.export_run(str(run_dir), str(again))
  for name in ("model.stablehlo", "params.bin", "params.json",
               "manifest.json", "labels.txt", "tokenizer/vocab.txt"):
    assert (again / name).read_bytes() == (export_dir / name).read_bytes(), name
  half = run_dir.parent / "bf16"
  export.export_run(str(run_dir), str(half), dtype="bfloat16")
  assert (half / "params.bin").stat().st_size * 2 == (
      export_dir / "params.bin").stat().st_size
  titles, images = products
  diff = np.abs(Predictor(half).probabilities(titles, images) -
                Predictor(export_dir).probabilities(titles, images)).max()
  assert 0 < diff < 2e-2
  with pytest.raises(export.ExportError, match="exists"):
    export.export_run(str(run_dir), str(again))


def test_export_refuses_a_config_that_does_not_fit(run_dir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("demo_data"))
  (copy / "demo_data").symlink_to(run_dir / "demo_data")
  config = json.loads((copy / "config.json").read_text())
  config["fusion"]["heads"] = 2 if config["fusion"]["heads"] == 1 else 1
  config["text"]["size"] = "mini"  # A different width: shapes disagree.
  (copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(export.ExportError, match="config.json"):
    export.export_run(str(copy), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  assert not list(tmp_path.glob(".out.tmp-*"))
  with pytest.raises(export.ExportError, match="no checkpoint"):
    export.export_run(str(run_dir), str(tmp_path / "x"), step=999)


def test_bad_products_get_clear_errors(export_dir, fashion_dir, tmp_path):
  from mic_jax.serving import PredictionError, Predictor  # pylint: disable=g-import-not-at-top
  predictor = Predictor(export_dir)
  with pytest.raises(PredictionError, match="product 1: the title is empty"):
    predictor.predict(["shoe", "  "])
  with pytest.raises(PredictionError, match="product 0: unusable image"):
    predictor.predict(["shoe"], [b"not a jpeg"])
  with pytest.raises(PredictionError, match="product 0: cannot read"):
    predictor.predict(["shoe"], [str(tmp_path / "missing.jpg")])
  pixels = np.zeros((40, 30, 3), np.uint8)
  assert len(predictor.predict(["shoe"], [pixels])) == 1
  # Batch mode: bad rows are counted and reported, good rows scored.
  photo = next((fashion_dir / "images").glob("*.jpg"))
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 broken")
  source = tmp_path / "in.csv"
  source.write_text("id,title,image\n1,Blue running shoe," + str(photo) +
                    "\n2,,\n3,Red tee,broken.jpg\n4,Leather tote,\n",
                    encoding="utf-8")
  out = subprocess.run(
      [sys.executable, "-m", "mic_jax.predict", f"--model={export_dir}",
       f"--input={source}", f"--output={tmp_path / 'out.jsonl'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = [json.loads(l) for l in
           (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [l["id"] for l in lines] == ["1", "2", "3", "4"]
  assert "top_k" in lines[0] and "top_k" in lines[3]
  assert "title is empty" in lines[1]["error"] and lines[1]["line"] == 3
  assert "unusable image" in lines[2]["error"] and lines[2]["line"] == 4
  assert '"errors": 2' in out.stderr and '"ok": 2' in out.stderr
  # Each scored row names the export and the photo it scored (what the
  # review page reads and shows).
  from mic_jax.reviewing import queue as queue_lib  # pylint: disable=g-import-not-at-top
  from mic_jax.serving import bundle  # pylint: disable=g-import-not-at-top
  assert lines[0]["export"] == lines[3]["export"] == bundle.identity(
      export_dir)
  assert lines[0]["photo"] == {"file": str(photo)} and lines[3]["photo"] is None
  assert lines[0]["title"] == "Blue running shoe"
  queue = queue_lib.load(tmp_path / "out.jsonl", export_dir)
  assert sorted(p["id"] for p in queue.page(0, 10)) == ["1", "4"]  # Errors
  # are not reviewed.
  photos = queue_lib.Photos(queue)
  assert photos.get("1") == photo.read_bytes() and photos.get("4") is None


def _post(url, body: bytes, timeout=120):
  import urllib.error  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  request = urllib.request.Request(url, data=body, method="POST", headers={
      "Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_http_server_answers_and_refuses_clearly(export_dir, products):
  """The real server: concurrent requests, every bad-request kind, alive after."""
  import base64  # pylint: disable=g-import-not-at-top
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  from mic_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
      [sys.executable, "-m", "mic_jax.serve", f"--model={export_dir}",
       f"--port={port}", "--max_instances=8", "--max_body_bytes=200000",
       "--max_batch_size=16", "--batch_delay_ms=150"],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  base = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 180
    while True:
      assert server.poll() is None, server.stderr.read().decode()[-3000:]
      try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
          assert json.loads(r.read())["status"] == "ok"
          break
      except OSError:
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.5)
    titles, images = products
    encoded = [base64.b64encode(open(p, "rb").read()).decode() if p else None
               for p in images]
    want = Predictor(export_dir).predict(titles, images, top_k=3)
    requests = [json.dumps({"top_k": 3, "instances": [
        {"title": titles[i], "image_b64": encoded[i]}
        for i in range(k, k + 4)]}).encode() for k in range(0, 12, 4)] * 2
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      answers = list(pool.map(lambda b: _post(base + "/v1/predict", b),
                              requests, timeout=240))
    for n, (status, reply) in enumerate(answers):
      assert status == 200, reply
      k = (n % 3) * 4
      for got, expected in zip(reply["predictions"], want[k:k + 4]):
        assert [e["label"] for e in got["top_k"]] == [
            e["label"] for e in expected["top_k"]]
        np.testing.assert_allclose([e["prob"] for e in got["top_k"]],
                                   [e["prob"] for e in expected["top_k"]],
                                   atol=1e-6)
    with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
      stats = json.loads(r.read())["batching"]
    # Six concurrent requests of 4 products, merged up to 16 per call.
    assert stats["requests"] == 6 and stats["products"] == 24, stats
    assert stats["batches"] < 6 and stats["largest_batch"] <= 16, stats
    bad = {
        "malformed JSON": (b'{"instances": [', 400, "malformed JSON"),
        "missing title": (json.dumps({"instances": [{"title": "shoe"}, {
            "image_b64": None}]}).encode(), 400, "instance 1: missing"),
        "undecodable image": (json.dumps({"instances": [{
            "title": "shoe", "image_b64": base64.b64encode(
                b"garbage").decode()}]}).encode(), 400,
                              "instance 0: unusable image"),
        "not base64": (json.dumps({"instances": [{
            "title": "shoe", "image_b64": "%%%"}]}).encode(), 400,
                       "not base64"),
        "too many": (json.dumps({"instances": [{"title": "a"}] * 9}).encode(),
                     413, "at most 8"),
        "too big": (json.dumps({"instances": [{"title": "a" * 300000}]})
                    .encode(), 413, "over 200000 bytes"),
    }
    for name, (body, status, message) in bad.items():
      got_status, reply = _post(base + "/v1/predict", body)
      assert got_status == status, (name, reply)
      assert message in reply["error"], (name, reply)
    status, reply = _post(base + "/v1/predict", requests[0])
    assert status == 200 and len(reply["predictions"]) == 4
  finally:
    server.terminate()
    server.wait(timeout=30)


def test_saved_model_for_tf_serving_matches(run_dir, export_dir, products,
                                            tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mic_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  out = tmp_path / "with_tf"
  manifest = export.export_run(str(run_dir), str(out), saved_model=True)
  assert manifest["saved_model"] == "saved_model"
  predictor = Predictor(export_dir)
  titles, images = products
  text = predictor.encode_titles(titles)
  pixels = [predictor.encode_image(im, i) for i, im in enumerate(images)]
  inputs = {**text, "image": np.stack([p for p, _ in pixels]),
            "image_present": np.array([f for _, f in pixels], np.int32)}
  serving = tf.saved_model.load(str(out / "saved_model")).signatures[
      "serving_default"]
  got = serving(**{k: tf.constant(v) for k, v in inputs.items()})
  np.testing.assert_allclose(got["probabilities"].numpy(),
                             predictor.probabilities_of_arrays(inputs),
                             atol=1e-5)


def test_bucketed_run_exports_a_symbolic_length_served_in_buckets(
    run_dir, products, tmp_path):
  """A run trained in length buckets exports ``[b, l]`` token inputs; the
  Predictor cuts each request to its bucket and scores like the padded
  model."""
  from mic_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "bucketed"
  trainer.train_and_evaluate(
      demo_configs.short_demo("cross_modal", total_steps=3, log_every=3,
                              eval_every=3,
                              **{"data.length_buckets": "6,16"}),
      str(workdir))
  out = tmp_path / "export"
  manifest = export.export_run(str(workdir), str(out))
  assert manifest["text"]["length_buckets"] == [6, 16]
  assert manifest["inputs"]["input_ids"] == ["b", "l", "int32"]
  predictor = Predictor(out)
  titles, images = products
  short = ["canvas sneaker", "leather tote bag"]
  for batch_titles, batch_images in ((titles, images), (short, [None] * 2)):
    mask = predictor.encode_titles(batch_titles)["attention_mask"]
    longest = int(mask.sum(-1).max())
    width = predictor.length_bucket(mask)
    assert width == (6 if longest <= 6 else 16)
    got = predictor.probabilities(batch_titles, batch_images)
    want = _in_process_probs(workdir, predictor, batch_titles, batch_images)
    assert np.abs(got - want).max() <= 1e-5
  assert predictor.length_bucket(predictor.encode_titles(short)[
      "attention_mask"]) == 6
