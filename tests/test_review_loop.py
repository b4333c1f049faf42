"""The review loop end to end on the demo catalogue.

A tiny demo model is trained and exported; ``mic-jax-predict`` scores the
train split; a reviewer relabels one product through the server's API;
``data_prep.prepare --corrections=DB`` prepares the catalogue again and
``mic_jax.main`` trains on it: the corrected product is in the training
records the trainer reads with its new label, in the same split, and
``dataset_info.json`` says so.
"""

import json
import pathlib
import subprocess
import sys

import requests
import tensorflow as tf

import demo_configs
import review_helpers
from mic_jax import export
from mic_jax.data import demo
from mic_jax.data import pipeline
from mic_jax.data import records
from mic_jax.serving import bundle
from mic_jax.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def _program(command):
  """Runs a program as a user would; its output is the failure message."""
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=1800, check=False)
  assert done.returncode == 0, (command, done.stdout[-2000:],
                                done.stderr[-4000:])


def _train_records(data_dir):
  """product id -> (label id, label name) of the train split the trainer
  reads (the files its pipeline opens)."""
  info = pipeline.DatasetInfo.load(str(data_dir))
  spec = records.feature_spec(info.max_length)
  found = {}
  for raw in tf.data.TFRecordDataset(info.files("train")):
    ex = tf.io.parse_single_example(raw, spec)
    found[ex["product_id"].numpy().decode()] = (
        int(ex["label"]), ex["label/name"].numpy().decode())
  return found


def test_a_corrected_product_is_trained_on_with_its_new_label(tmp_path):
  config = demo_configs.short_demo("cross_modal", total_steps=2, log_every=1,
                                   eval_every=2)
  run = tmp_path / "run"
  trainer.train_and_evaluate(config, str(run))
  export.export_run(str(run), str(tmp_path / "export"))
  data = run / "demo_data" / demo.PREPARED

  # 1. Score the train split (the program a user runs).
  scores = tmp_path / "scores.jsonl"
  _program([sys.executable, "-m", "mic_jax.predict",
            f"--model={tmp_path / 'export'}", f"--data_dir={data}",
            "--split=train", "--max_products=40", f"--output={scores}"])
  rows = [json.loads(l) for l in scores.read_text().splitlines()]
  identity = bundle.identity(tmp_path / "export")
  assert len(rows) == 40 and {r["export"] for r in rows} == {identity}
  assert all(len(r["top_k"]) == 5 and isinstance(r["abstain"], bool)
             for r in rows)
  before = _train_records(data)
  assert [r["id"] for r in rows] == list(before)[:40]  # Shard order.

  # 2. A reviewer relabels one product on the page's API.
  product = rows[0]
  old = product["label"]
  new = next(l for l in demo.labels() if l != old)
  with review_helpers.review_server(scores, tmp_path / "export",
                                    tmp_path / "review.sqlite") as (url,
                                                                    store):
    token = store.add_reviewer("ann")
    r = requests.post(url + "/api/decisions", timeout=30,
                      headers={"Authorization": f"Bearer {token}"},
                      json={"product": product["id"], "status": "relabelled",
                            "label": new, "base_version": 0})
    assert r.status_code == 200, r.text
    assert r.json()["decision"]["export"] == identity

  # 3. Prepare again with the decisions, 4. train with mic_jax.main.
  fixed = tmp_path / "fixed"
  _program(demo.prepare_command(run / "demo_data", fixed,
                                max_length=config.text.max_length,
                                image_size=config.image.size) +
           [f"--corrections={tmp_path / 'review.sqlite'}"])
  retrain = tmp_path / "retrain"
  _program([sys.executable, "-m", "mic_jax.main",
            "--config=configs/cross_modal.py:demo", f"--workdir={retrain}",
            "--config.data.demo=False", f"--config.data.dir={fixed}",
            "--config.total_steps=2", "--config.eval_every_steps=2",
            "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
            "--config.batch_size=16"])
  assert json.loads((retrain / "config.json").read_text())["data"][
      "dir"] == str(fixed)
  assert (retrain / "results.json").exists()

  after = _train_records(fixed)
  labels = (fixed / records.LABELS_FILE).read_text().splitlines()
  assert after[product["id"]] == (labels.index(new), new)
  assert before[product["id"]] == (labels.index(old), old)
  assert set(after) == set(before)  # Nobody left or joined train.
  assert all(after[p] == before[p] for p in before if p != product["id"])
  info = records.read_info(fixed)["corrections"]
  assert (info["decisions"], info["relabelled"], info["rejected"]) == (
      1, 1, {})
