"""The suspected label errors queue over a scored training split.

Score rows are written as ``mic-jax-predict --data_dir=... --split=train``
writes them (catalogue ``label``, ``label_prob``), with numbers chosen so
that which products are kept and in what order follows from the rule:
top label not the catalogue's, p(top) >= 0.5, p(catalogue label) <= 0.1,
most suspicious (largest p(top) - p(catalogue label)) first. The export is
a bundle with labels only (the queue never runs the model); the round trip
prepares the demo catalogue again with the decisions, in-process.
"""

import csv
import json
import subprocess
import sys

import pytest
import requests
import tensorflow as tf

import review_helpers
from data_prep import prepare
from mic_jax import review
from mic_jax.data import demo
from mic_jax.data import pipeline
from mic_jax.data import records
from mic_jax.reviewing import queue as queue_lib
from mic_jax.reviewing import server
from mic_jax.reviewing import store as store_lib
from mic_jax.reviewing import suspects as suspects_lib
from mic_jax.serving import bundle

LABELS = ["bag", "shirt", "shoe", "watch", "belt", "hat"]  # 6: one is
# always outside a top 5.


def _row(identity, pid, label, top, *, label_prob=None, abstain=False):
  """A scored product whose top label is ``top`` = (label, prob); the other
  labels share the rest, the catalogue label getting ``label_prob``."""
  top_label, top_prob = top
  rest = [l for l in LABELS if l != top_label]
  probs = {top_label: top_prob}
  if label_prob is not None and label != top_label:
    probs[label] = label_prob
  others = [l for l in rest if l not in probs]
  share = (1 - sum(probs.values())) / len(others)
  probs.update({l: share for l in others})
  order = sorted(LABELS, key=lambda l: -probs[l])[:5]
  row = {"id": pid, "title": f"product {pid}", "label": label,
         "top_k": [{"label": l, "prob": probs[l]} for l in order],
         "abstain": abstain, "export": identity, "photo": None}
  if label_prob is not None:
    row["label_prob"] = probs[label]
  return row


def _scores(tmp_path):
  """Ten lines: six suspects, three kept out, one predict error."""
  export = review_helpers.fake_export(tmp_path / "export", LABELS)
  identity = bundle.identity(export)
  rows = [
      _row(identity, "a", "bag", ("shirt", 0.9), label_prob=0.02),   # .88
      _row(identity, "b", "bag", ("bag", 0.95), label_prob=0.95),    # agrees
      _row(identity, "c", "shoe", ("shirt", 0.75), label_prob=0.0625),
      _row(identity, "d", "watch", ("bag", 0.97), label_prob=0.01),  # .96
      _row(identity, "e", "shirt", ("shoe", 0.45), label_prob=0.05,  # unsure
           abstain=True),
      _row(identity, "f", "hat", ("bag", 0.8), label_prob=0.15),     # p high
      {"error": "unreadable photo", "line": 7},
      # No label_prob (an older scores file): the top-k entry, then the
      # smallest top-k probability as a bound of p(catalogue label).
      _row(identity, "g", "belt", ("shoe", 0.7)),
      _row(identity, "h", "hat", ("bag", 0.92)),
      _row(identity, "k", "shoe", ("shirt", 0.75), label_prob=0.0625),  # = c
  ]
  g = rows[7]
  g["top_k"][1:] = [{"label": "belt", "prob": 0.03}] + [
      e for e in g["top_k"][1:] if e["label"] != "belt"][:3]
  h = rows[8]
  assert "hat" not in [e["label"] for e in h["top_k"]]
  path = tmp_path / "scores.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path, export


def _ids(queue):
  return [p["id"] for p in queue.page(0, 100)]


def test_only_confident_disagreements_are_kept_most_suspicious_first(
    tmp_path):
  scores, export = _scores(tmp_path)
  queue = queue_lib.load(scores, export, suspects=suspects_lib.Suspects())
  # Margins: d .96, h .92-.016=.904 (the other five share .08), a .88,
  # c = k .6875 (file order), g .7-.03=.67.
  assert _ids(queue) == ["d", "h", "a", "c", "k", "g"]
  assert queue.selection == {
      "queue": "suspected_label_errors", "considered": 9, "kept": 6,
      "max_label_prob": 0.1, "min_top_prob": 0.5,
      "description": suspects_lib.Suspects().describe()}
  assert queue.skipped_errors == 1
  first = queue.get("d")
  assert first["label_prob"] == pytest.approx(0.01)
  assert first["margin"] == pytest.approx(0.96)
  assert queue.get("h")["label_prob"] == pytest.approx(0.016)  # The bound.
  assert queue.get("g")["label_prob"] == pytest.approx(0.03)

  # Looser thresholds bring in the unsure product and the likelier label.
  loose = queue_lib.load(scores, export, suspects=suspects_lib.Suspects(
      max_label_prob=0.2, min_top_prob=0.4))
  assert _ids(loose) == ["d", "h", "a", "c", "k", "g", "f", "e"]
  # The usual queue is every product, abstained first.
  usual = queue_lib.load(scores, export)
  assert usual.selection == {"queue": "uncertain"}
  assert len(usual) == 9 and _ids(usual)[0] == "e"


def test_the_api_and_the_start_up_line_give_the_counts(tmp_path):
  scores, export = _scores(tmp_path)
  queue = queue_lib.load(scores, export, suspects=suspects_lib.Suspects())
  store = store_lib.Store(tmp_path / "review.sqlite")
  auth = {"Authorization": f"Bearer {store.add_reviewer('ann')}"}
  with review_helpers.running(server.make_app(queue, store)) as url:
    body = requests.get(url + "/api/queue?limit=4", headers=auth,
                        timeout=30).json()
    assert body["selection"]["considered"] == 9
    assert body["selection"]["kept"] == body["total"] == 6
    assert [p["id"] for p in body["products"]] == ["d", "h", "a", "c"]
    assert body["products"][0]["label"] == "watch"
    assert body["progress"]["remaining"] == 6
    page = requests.get(url + "/", headers=auth, timeout=30).text
    script = requests.get(url + "/static/app.js", headers=auth,
                          timeout=30).text
  assert 'id="selection"' in page and "showSelection(queue.body.selection)" \
      in script
  line = review.summary(queue, store, str(scores))
  assert "suspected_label_errors: 6 of 9 products kept" in line
  assert "p(catalogue label) <= 0.1" in line and "1 rows skipped" in line


@pytest.mark.parametrize("change,needle", [
    (lambda r: r.pop("label"), "no catalogue 'label'"),
    (lambda r: r.update(label=""), "no catalogue 'label'"),
    (lambda r: r.update(label="sock"), "catalogue label 'sock' is not the "
     "export's"),
    (lambda r: r.update(label_prob="0.1"), "'label_prob' is '0.1', not a "
     "number"),
])
def test_a_row_without_a_usable_catalogue_label_is_named(tmp_path, change,
                                                         needle):
  scores, export = _scores(tmp_path)
  lines = scores.read_text().splitlines()
  row = json.loads(lines[2])
  change(row)
  lines[2] = json.dumps(row)
  scores.write_text("\n".join(lines) + "\n")
  with pytest.raises(queue_lib.QueueError) as e:
    queue_lib.load(scores, export, suspects=suspects_lib.Suspects())
  assert str(e.value).startswith(f"{scores}:3: {needle}")
  queue_lib.load(scores, export)  # The usual queue does not need it.


def test_the_program_names_a_file_scored_without_labels(tmp_path):
  """A scores file of new products (``predict --input``) has no catalogue
  label: the program stops with FILE:LINE, before serving."""
  scores, export = _scores(tmp_path)
  rows = [json.loads(l) for l in scores.read_text().splitlines()]
  for r in rows:
    r.pop("label", None)
  scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
  base = [sys.executable, "-m", "mic_jax.review",
          f"--db={tmp_path / 'review.sqlite'}", f"--scores={scores}",
          f"--export={export}", "--queue=suspected_label_errors"]
  done = subprocess.run(base, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode != 0
  assert f"error: {scores}:1: no catalogue 'label'" in done.stderr
  assert "Traceback" not in done.stderr
  done = subprocess.run(base + ["--suspect_max_label_prob=2"],
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode != 0
  assert "max_label_prob must be a probability in [0, 1]" in done.stderr


def _train_labels(data_dir):
  """product id -> label name of the train split the trainer reads."""
  info = pipeline.DatasetInfo.load(str(data_dir))
  spec = records.feature_spec(info.max_length)
  found = {}
  for raw in tf.data.TFRecordDataset(info.files("train")):
    ex = tf.io.parse_single_example(raw, spec)
    found[ex["product_id"].numpy().decode()] = ex["label/name"].numpy(
        ).decode()
  return found


def test_decisions_on_suspects_relabel_the_train_split(tmp_path,
                                                       shared_demo_data):
  """Score rows of demo train products, two of them suspects; on the API a
  reviewer relabels one to the model's label and keeps the other's
  catalogue label; ``prepare --corrections`` changes exactly that one
  train label (a validation product's decision is refused by default)."""
  root = shared_demo_data()
  labels = (root / demo.PREPARED / records.LABELS_FILE).read_text(
      ).splitlines()
  with open(root / demo.RAW / "catalogue.csv", encoding="utf-8") as f:
    catalogue = list(csv.DictReader(f))
  train = [r for r in catalogue if r["split"] == "train"][:4]
  held_out = next(r for r in catalogue if r["split"] == "validation")
  export = review_helpers.fake_export(tmp_path / "export", labels)
  identity = bundle.identity(export)

  def scored(r, top, prob, label_prob):
    rest = [l for l in labels if l not in (top, r["label"])]
    share = (1 - prob - (label_prob if top != r["label"] else 0)) / len(rest)
    top_k = [{"label": top, "prob": prob}] + [
        {"label": l, "prob": share} for l in rest[:4]]
    return {"id": r["id"], "title": r["title"], "label": r["label"],
            "label_prob": label_prob, "top_k": top_k, "abstain": False,
            "export": identity, "photo": None}

  other = {r["id"]: next(l for l in labels if l != r["label"])
           for r in train}
  rows = [scored(train[0], other[train[0]["id"]], 0.9, 0.01),  # relabel
          scored(train[1], other[train[1]["id"]], 0.8, 0.05),  # keep
          scored(train[2], train[2]["label"], 0.9, 0.9),       # agrees
          scored(train[3], other[train[3]["id"]], 0.6, 0.3)]   # unsure
  scores = tmp_path / "train_scores.jsonl"
  scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
  db = tmp_path / "review.sqlite"
  store = store_lib.Store(db)
  auth = {"Authorization": f"Bearer {store.add_reviewer('ann')}"}
  queue = queue_lib.load(scores, export, suspects=suspects_lib.Suspects())
  with review_helpers.running(server.make_app(queue, store)) as url:
    body = requests.get(url + "/api/queue", headers=auth, timeout=30).json()
    assert [p["id"] for p in body["products"]] == [train[0]["id"],
                                                   train[1]["id"]]
    # The model's label, then the page's "keep the catalogue label" (not
    # in the top 5 here: a relabel to the catalogue's label).
    for product, status, label in (
        (train[0]["id"], "accepted", other[train[0]["id"]]),
        (train[1]["id"], "relabelled", train[1]["label"])):
      r = requests.post(url + "/api/decisions", headers=auth, timeout=30,
                        json={"product": product, "status": status,
                              "label": label, "base_version": 0})
      assert r.status_code == 200, r.text
  store.decide(held_out["id"], "relabelled", other[train[0]["id"]],
               reviewer="ann", export=identity, base_version=0)

  fixed = tmp_path / "fixed"
  command = demo.prepare_command(root, fixed, max_length=16, image_size=32)
  prepare.run(prepare.build_parser().parse_args(
      command[3:] + [f"--corrections={db}"]))
  before = _train_labels(root / demo.PREPARED)
  after = _train_labels(fixed)
  assert after[train[0]["id"]] == other[train[0]["id"]] != before[
      train[0]["id"]]
  assert after[train[1]["id"]] == before[train[1]["id"]] == train[1]["label"]
  assert {p: l for p, l in after.items() if p != train[0]["id"]} == {
      p: l for p, l in before.items() if p != train[0]["id"]}
  record = records.read_info(fixed)["corrections"]
  assert (record["relabelled"], record["confirmed"], record["rejected"]) == (
      1, 1, {"eval_split_refused": 1})
  assert record["by_split"]["train"] == {"relabelled": 1, "confirmed": 1}
  assert record["exports"] == {identity: 3}
