"""prepare --corrections: reviewed labels replace the catalogue's, splits stay.

The catalogue has title groups split by stratified assignment (no split
column), so a correction applied before the splits were chosen would move
groups between splits; the test relabels whole groups to make that show.
"""

import json

import pytest

from data_prep import corrections
from mic_jax.reviewing import store as store_lib
from test_data_prep import _dup_catalogue, _read, _run, _split_of, _tokenizer


def _args(tmp_path, out, *extra):
  return ["--input", _dup_catalogue(tmp_path), "--title_column=title",
          "--label_column=label", "--tokenizer", _tokenizer(tmp_path),
          "--max_length=8", "--examples_per_shard=16", "--output_dir",
          tmp_path / out, *extra]


def _labels(out):
  return {pid: (ex["label/name"].decode(), int(ex["label"]))
          for pid, ex in _read(out, 8).items()}


def _write_csv(path, rows):
  path.write_text("product_id,status,label\n" + "".join(
      f"{p},{s},{l}\n" for p, s, l in rows))
  return path


def test_corrections_relabel_products_and_never_move_them(tmp_path):
  _run(_args(tmp_path, "base"))
  before, where = _labels(tmp_path / "base"), _split_of(tmp_path / "base")
  labels = (tmp_path / "base" / "labels.txt").read_text().splitlines()
  # Every "shirt" group (4 rows each, ids 4g..4g+3) becomes "bag": applied
  # before the split, these groups would join the bag stratum.
  shirts = sorted((p for p, (l, _) in before.items() if l == "shirt"), key=int)
  rows = [(p, "relabelled", "bag") for p in shirts[:24]]
  rows += [(shirts[24], "accepted", "shirt"),      # Confirms the catalogue.
           (shirts[25], "unclear", ""),            # Left as it was.
           (shirts[26], "relabelled", "hat"),      # Not a class.
           ("nope", "relabelled", "bag"),           # Not a product.
           ("rare", "relabelled", "shoe")]          # Restored from "watch".
  fix = _write_csv(tmp_path / "decisions.csv", rows)
  # Every split may change here (the groups span all three); "nope" is
  # counted, not refused (tests/test_new_products.py: the default).
  stats = _run(_args(tmp_path, "fixed", f"--corrections={fix}",
                     "--corrections_splits=train,validation,test",
                     "--unmatched_decisions=count"))
  after = _labels(tmp_path / "fixed")
  moved = _split_of(tmp_path / "fixed")
  assert moved.pop("rare")[0] == "train"  # Restored (below).
  assert moved == where  # Nobody moved.
  assert set(after) == set(before) | {"rare"}
  assert after["rare"] == ("shoe", labels.index("shoe"))
  for p in shirts[:24]:
    assert after[p] == ("bag", labels.index("bag"))
  for p in set(before) - set(shirts[:24]):
    assert after[p] == before[p]
  info = json.loads((tmp_path / "fixed" / "dataset_info.json").read_text())
  record = info["corrections"]
  assert record == stats["corrections"]
  assert record["source"] == str(fix.resolve())
  assert record["sha256"] == corrections.load(fix).sha256
  assert {k: record[k] for k in ("decisions", "relabelled", "confirmed",
                                 "unclear_kept", "rejected")} == {
      "decisions": 29, "relabelled": 25, "confirmed": 1, "unclear_kept": 1,
      "rejected": {"unknown_label": 1, "unknown_product": 1}}
  assert {(e["id"], e["reason"]) for e in record["rejected_examples"]} == {
      (shirts[26], "unknown_label"), ("nope", "unknown_product")}
  # The class counts the trainer reads follow the new labels.
  counts = {s: sum(sh["class_counts"][labels.index("bag")]
                   for sh in info["shards"][s]) for s in info["shards"]}
  base_info = json.loads((tmp_path / "base" / "dataset_info.json"
                          ).read_text())
  base = {s: sum(sh["class_counts"][labels.index("bag")]
                 for sh in base_info["shards"][s]) for s in info["shards"]}
  assert sum(counts.values()) == sum(base.values()) + 24
  assert "corrections" not in base_info


def test_the_database_and_its_csv_give_the_same_corrections(tmp_path):
  store = store_lib.Store(tmp_path / "review.sqlite")
  store.add_reviewer("ann")
  store.decide("3", "relabelled", "bag", reviewer="ann", export="e",
               base_version=0)
  store.decide("3", "accepted", "shoe", reviewer="ann", export="e",
               base_version=1)  # Only the current decision counts.
  store.decide("5", "unclear", None, reviewer="ann", export="e",
               base_version=0)
  store_lib.write_csv(store, tmp_path / "d.csv")
  from_db = corrections.load(tmp_path / "review.sqlite")
  from_csv = corrections.load(tmp_path / "d.csv")
  assert from_db.decisions == from_csv.decisions == {
      "3": ("accepted", "shoe"), "5": ("unclear", None)}
  assert from_db.sha256 == from_csv.sha256


@pytest.mark.parametrize("text,needle", [
    ("id,label\n1,bag\n", "no column(s) product_id, status"),
    ("product_id,status,label\n1,maybe,bag\n", "d.csv:2: unknown status"),
    ("product_id,status,label\n1,relabelled,\n", "d.csv:2: status relabelled "
     "without a label"),
    ("product_id,status,label\n1,accepted,bag\n1,unclear,\n",
     "d.csv:3: product '1' decided twice"),
])
def test_a_bad_corrections_file_stops_prepare_naming_the_line(
    tmp_path, text, needle):
  (tmp_path / "d.csv").write_text(text)
  with pytest.raises(SystemExit, match=needle.replace("(", r"\(").replace(
      ")", r"\)")):
    _run(_args(tmp_path, "out", f"--corrections={tmp_path / 'd.csv'}"))
  assert not (tmp_path / "out" / "dataset_info.json").exists()


def test_changed_corrections_are_not_resumed_over(tmp_path):
  """A preparation interrupted with one set of decisions is not finished
  with another (the fingerprint holds the decisions' hash)."""
  fix = _write_csv(tmp_path / "d.csv", [("0", "relabelled", "bag")])
  args = _args(tmp_path, "out", f"--corrections={fix}")
  _run(args)
  (tmp_path / "out" / "dataset_info.json").unlink()
  (tmp_path / "out" / ".work").mkdir()
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  fingerprint = prepare._fingerprint(prepare.build_parser().parse_args(
      [str(a) for a in args]))
  fingerprint["corrections_sha256"] = corrections.load(fix).sha256
  (tmp_path / "out" / ".work" / "arguments.json").write_text(
      json.dumps(fingerprint))
  _write_csv(fix, [("0", "relabelled", "shoe")])
  with pytest.raises(SystemExit, match="differs in: corrections_sha256"):
    _run(args)


def test_the_csv_neutralizes_formulas_and_reads_them_back(tmp_path):
  """Cells a spreadsheet would run (=, +, -, @, tab, CR first) are written
  with a leading quote; --corrections reads the values back unchanged."""
  import csv  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  store = store_lib.Store(tmp_path / "review.sqlite")
  products = {"=HYPERLINK(\"http://x\")": ("relabelled", "@SUM(A1)"),
              "+1": ("accepted", "-bag"), "'quoted": ("accepted", "'bag"),
              "-2": ("unclear", None), "\tx": ("accepted", "=1+1"),
              "plain": ("accepted", "bag")}
  for product, (status, label) in products.items():
    store.decide(product, status, label, reviewer="=evil()", export="e",
                 base_version=0)
  text = store_lib.csv_text(store)
  for row in csv.reader(io.StringIO(text)):
    for cell in row:
      assert not cell or cell[0] not in "=+-@\t\r", (cell, row)
  store_lib.write_csv(store, tmp_path / "d.csv")
  assert corrections.load(tmp_path / "d.csv").decisions == corrections.load(
      tmp_path / "review.sqlite").decisions == products


def test_a_csv_resaved_by_a_spreadsheet_with_a_bom_is_read(tmp_path):
  path = tmp_path / "d.csv"
  path.write_bytes("product_id,status,label\r\n3,relabelled,bag\r\n".encode(
      "utf-8-sig"))
  assert corrections.load(path).decisions == {"3": ("relabelled", "bag")}


def _by_split(before, where, label, n):
  """Up to ``n`` product ids per split whose catalogue label is ``label``."""
  found = {}
  for p in sorted(before, key=lambda p: (len(p), p)):
    if before[p][0] == label:
      found.setdefault(where[p][0], [])
      if len(found[where[p][0]]) < n:
        found[where[p][0]].append(p)
  return found


def test_evaluation_splits_change_only_with_the_flag(tmp_path):
  """Accepting the model's labels on validation products would grade the
  model by its own answers: by default only train products are relabelled;
  the others are counted per split and left as the catalogue has them."""
  _run(_args(tmp_path, "base"))
  before, where = _labels(tmp_path / "base"), _split_of(tmp_path / "base")
  picked = _by_split(before, where, "shirt", 2)
  assert set(picked) == {"train", "validation", "test"}
  fix = _write_csv(tmp_path / "d.csv", [
      (p, "relabelled", "bag") for ps in picked.values() for p in ps])
  stats = _run(_args(tmp_path, "train_only", f"--corrections={fix}"))
  after = _labels(tmp_path / "train_only")
  for split, ps in picked.items():
    for p in ps:
      assert after[p][0] == ("bag" if split == "train" else "shirt"), split
  record = json.loads((tmp_path / "train_only" / "dataset_info.json"
                       ).read_text())["corrections"]
  assert record == stats["corrections"]
  assert record["splits"] == ["train"]
  assert record["relabelled"] == 2
  assert record["rejected"] == {"eval_split_refused": 4}
  assert record["by_split"] == {
      "train": {"relabelled": 2},
      "validation": {"eval_split_refused": 2},
      "test": {"eval_split_refused": 2}}
  # Opted in: every split changes, and the record says so.
  stats = _run(_args(tmp_path, "all", f"--corrections={fix}",
                     "--corrections_splits=train,validation,test"))
  after = _labels(tmp_path / "all")
  assert all(after[p][0] == "bag" for ps in picked.values() for p in ps)
  assert stats["corrections"]["splits"] == ["train", "validation", "test"]
  assert stats["corrections"]["by_split"] == {
      s: {"relabelled": 2} for s in ("train", "validation", "test")}
  assert _split_of(tmp_path / "all") == where


def test_an_unknown_corrections_split_is_refused(tmp_path):
  with pytest.raises(SystemExit, match="--corrections_splits: unknown "
                     "split 'valid'"):
    _run(_args(tmp_path, "out", "--corrections_splits=train,valid"))
  assert not (tmp_path / "out").exists()  # Refused before any work.


def test_a_relabel_brings_back_a_product_of_a_dropped_rare_class(tmp_path):
  """"rare" is the catalogue's only "watch": the class is dropped, but a
  reviewer's label in the class list makes it a training example (its title
  group had no split: it joins train, never an evaluation split)."""
  fix = _write_csv(tmp_path / "d.csv", [("rare", "relabelled", "shoe")])
  stats = _run(_args(tmp_path, "out", f"--corrections={fix}"))
  labels = (tmp_path / "out" / "labels.txt").read_text().splitlines()
  assert "watch" not in labels
  assert _labels(tmp_path / "out")["rare"] == ("shoe", labels.index("shoe"))
  assert _split_of(tmp_path / "out")["rare"][0] == "train"
  assert stats["rejected"] == {}  # No longer a rare_class rejection.
  record = stats["corrections"]
  assert record["relabelled"] == record["restored"] == 1
  assert record["rejected"] == {}
  assert record["by_split"] == {"train": {"relabelled": 1, "restored": 1}}
  # An unclear decision is no label: the product stays rejected.
  _write_csv(fix, [("rare", "unclear", "")])
  stats = _run(_args(tmp_path, "unclear", f"--corrections={fix}"))
  assert stats["rejected"] == {"rare_class": 1}
  assert stats["corrections"]["restored"] == 0
  assert "rare" not in _labels(tmp_path / "unclear")


def test_decisions_made_against_another_export_are_counted(tmp_path):
  """Decisions name the export whose scores the reviewer saw; those made
  against another export than most are counted (still applied: the label
  is the reviewer's, but a mix of models' queues is worth knowing)."""
  store = store_lib.Store(tmp_path / "review.sqlite")
  for product, export in (("1", "new"), ("2", "new"), ("3", "old")):
    store.decide(product, "accepted", "bag", reviewer="ann", export=export,
                 base_version=0)
  store_lib.write_csv(store, tmp_path / "d.csv")
  for path in (tmp_path / "review.sqlite", tmp_path / "d.csv"):
    record = corrections.Applier(corrections.load(path), ["bag"]).record()
    assert record["exports"] == {"new": 2, "old": 1}
    assert record["export"] == "new"
    assert record["other_export"] == 1
  # A CSV without the export column names none.
  bare = _write_csv(tmp_path / "bare.csv", [("1", "accepted", "bag")])
  record = corrections.Applier(corrections.load(bare), ["bag"]).record()
  assert record["exports"] == {} and record["other_export"] == 0
