"""The review loop end to end on the demo catalogue.

A tiny demo model is trained and exported (once for the module); then:

* ``mic-jax-predict`` scores the train split (each row with p(catalogue
  label), which the suspected label errors queue reads); a reviewer
  relabels one product through the server's API; ``data_prep.prepare
  --corrections=DB`` prepares the catalogue again and ``mic_jax.main``
  trains on it: the corrected product is in the training records the
  trainer reads with its new label, in the same split, and
  ``dataset_info.json`` says so;
* new products (a CSV without labels) are scored with ``--input``,
  reviewed on the page's API, added to train by ``prepare --new_products``
  and trained on (the README's loop).
"""

import csv
import json
import pathlib
import subprocess
import sys

import pytest
import requests
import tensorflow as tf

import demo_configs
import review_helpers
from mic_jax import export
from mic_jax import trainer
from mic_jax.data import demo
from mic_jax.data import pipeline
from mic_jax.data import records
from mic_jax.reviewing import queue as queue_lib
from mic_jax.reviewing import suspects as suspects_lib
from mic_jax.serving import bundle
from mic_jax.text import title_group_key

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


@pytest.fixture(name="exported", scope="module")
def _exported(tmp_path_factory):
  """(config, run directory, export directory) of a 2-step demo run."""
  root = tmp_path_factory.mktemp("exported")
  config = demo_configs.short_demo("cross_modal", total_steps=2, log_every=1,
                                   eval_every=2)
  trainer.train_and_evaluate(config, str(root / "run"))
  export.export_run(str(root / "run"), str(root / "export"))
  return config, root / "run", root / "export"


def _retrain(data_dir, workdir):
  """``mic_jax.main`` for 2 steps on a prepared directory (the program)."""
  _program([sys.executable, "-m", "mic_jax.main",
            "--config=configs/cross_modal.py:demo", f"--workdir={workdir}",
            "--config.data.demo=False", f"--config.data.dir={data_dir}",
            "--config.total_steps=2", "--config.eval_every_steps=2",
            "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
            "--config.batch_size=16"])
  assert json.loads((workdir / "config.json").read_text())["data"][
      "dir"] == str(data_dir)
  assert (workdir / "results.json").exists()


def test_a_corrected_product_is_trained_on_with_its_new_label(tmp_path,
                                                              exported):
  config, run, export_dir = exported
  data = run / "demo_data" / demo.PREPARED

  # 1. Score the train split (the program a user runs).
  scores = tmp_path / "scores.jsonl"
  _program([sys.executable, "-m", "mic_jax.predict",
            f"--model={export_dir}", f"--data_dir={data}",
            "--split=train", "--max_products=40", f"--output={scores}"])
  rows = [json.loads(l) for l in scores.read_text().splitlines()]
  identity = bundle.identity(export_dir)
  assert len(rows) == 40 and {r["export"] for r in rows} == {identity}
  assert all(len(r["top_k"]) == 5 and isinstance(r["abstain"], bool)
             for r in rows)
  before = _train_records(data)
  assert [r["id"] for r in rows] == list(before)[:40]  # Shard order.
  # Each row carries p(catalogue label), also outside the top 5: what the
  # suspected label errors queue ranks by; with no thresholds it keeps
  # exactly the products whose top label is not the catalogue's.
  for r in rows:
    top = {e["label"]: e["prob"] for e in r["top_k"]}
    if r["label"] in top:
      assert r["label_prob"] == pytest.approx(top[r["label"]])
    else:
      assert r["label_prob"] <= min(top.values()) + 1e-6
  disagreeing = queue_lib.load(scores, export_dir, suspects=(
      suspects_lib.Suspects(max_label_prob=1, min_top_prob=0)))
  assert disagreeing.selection["considered"] == 40
  assert sorted(p["id"] for p in disagreeing.page(0, 100)) == sorted(
      r["id"] for r in rows if r["top_k"][0]["label"] != r["label"])

  # 2. A reviewer relabels one product on the page's API.
  product = rows[0]
  old = product["label"]
  new = next(l for l in demo.labels() if l != old)
  with review_helpers.review_server(scores, export_dir,
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
  _retrain(fixed, tmp_path / "retrain")

  after = _train_records(fixed)
  labels = (fixed / records.LABELS_FILE).read_text().splitlines()
  assert after[product["id"]] == (labels.index(new), new)
  assert before[product["id"]] == (labels.index(old), old)
  assert set(after) == set(before)  # Nobody left or joined train.
  assert all(after[p] == before[p] for p in before if p != product["id"])
  info = records.read_info(fixed)["corrections"]
  assert (info["decisions"], info["relabelled"], info["rejected"]) == (
      1, 1, {})


def _new_products(raw, folder, n):
  """A shop's new products: ``n`` train rows of the demo catalogue under
  new ids, id, title and photo only (no label column), the photos copied
  beside the CSV; plus one with a validation product's title. Returns the
  CSV and each product's catalogue label (what a careful reviewer says)."""
  with open(raw / "catalogue.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  in_eval = {title_group_key(r["title"]) for r in rows
             if r["split"] != "train"}
  picked = [r for r in rows if r["split"] == "train" and r["image"]
            and title_group_key(r["title"]) not in in_eval][:n]
  picked.append(next(r for r in rows if r["split"] == "validation"))
  (folder / "photos").mkdir(parents=True)
  truth = {}
  with open(folder / "new.csv", "w", newline="", encoding="utf-8") as f:
    out = csv.writer(f)
    out.writerow(["id", "title", "image"])
    for r in picked:
      photo = ""
      if r["image"]:
        photo = f"photos/{r['id']}.jpg"
        (folder / photo).write_bytes((raw / r["image"]).read_bytes())
      out.writerow([f"new-{r['id']}", r["title"], photo])
      truth[f"new-{r['id']}"] = r["label"]
  return folder / "new.csv", truth


def test_reviewed_new_products_become_training_data(tmp_path, exported):
  """The README's loop: score new products, review them, prepare with the
  decisions and the new products, retrain."""
  config, run, export_dir = exported
  new_csv, truth = _new_products(run / "demo_data" / demo.RAW,
                                 tmp_path / "new", 4)
  ids = list(truth)  # 4 train titles, then 1 validation title.

  # 1. Score them (batch mode: the file the shop sent).
  scores = tmp_path / "new_scores.jsonl"
  _program([sys.executable, "-m", "mic_jax.predict", f"--model={export_dir}",
            f"--input={new_csv}", f"--output={scores}"])
  rows = {r["id"]: r for r in map(json.loads,
                                  scores.read_text().splitlines())}
  assert list(rows) == ids and all("label" not in r for r in rows.values())

  # 2. Review on the page's API: the queue serves them; a relabel, an
  #    accept of the model's top label, an unclear, one left undecided,
  #    and the copy of a validation title accepted.
  decided = {ids[0]: ("relabelled", truth[ids[0]]),
             ids[1]: ("accepted", rows[ids[1]]["top_k"][0]["label"]),
             ids[2]: ("unclear", None),
             ids[4]: ("accepted", truth[ids[4]])}
  db = tmp_path / "review.sqlite"
  with review_helpers.review_server(scores, export_dir, db) as (url, store):
    auth = {"Authorization": f"Bearer {store.add_reviewer('ann')}"}
    queue = requests.get(url + "/api/queue?limit=50", headers=auth,
                         timeout=30)
    assert queue.status_code == 200, queue.text
    assert {p["id"] for p in queue.json()["products"]} == set(ids)
    for product, (status, label) in decided.items():
      r = requests.post(url + "/api/decisions", headers=auth, timeout=30,
                        json={"product": product, "status": status,
                              "label": label, "base_version": 0})
      assert r.status_code == 200, r.text

  # 3. Prepare the catalogue again with the decisions and the new products.
  fixed = tmp_path / "fixed"
  _program(demo.prepare_command(run / "demo_data", fixed,
                                max_length=config.text.max_length,
                                image_size=config.image.size) +
           [f"--corrections={db}", f"--new_products={new_csv}"])
  before = _train_records(run / "demo_data" / demo.PREPARED)
  after = _train_records(fixed)
  labels = (fixed / records.LABELS_FILE).read_text().splitlines()
  for product in ids[:2]:
    label = decided[product][1]
    assert after.pop(product) == (labels.index(label), label)
  assert after == before  # The catalogue's train split is as it was.
  info = records.read_info(fixed)
  added = info["new_products"]
  assert (added["rows"], added["reviewed"], added["added"],
          added["unclear"], added["undecided"], added["rejected"]) == (
              5, 4, 2, 1, 1, {"same_title_as_eval": 1})
  assert info["corrections"]["rejected"] == {}
  shards = {s: sum(sh["examples"] for sh in v)
            for s, v in info["shards"].items()}
  old = {s: sum(sh["examples"] for sh in v) for s, v in records.read_info(
      run / "demo_data" / demo.PREPARED)["shards"].items()}
  assert shards == {**old, "train": old["train"] + 2}

  # 4. Retrain on it.
  _retrain(fixed, tmp_path / "retrain")
