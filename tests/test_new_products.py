"""prepare --new_products: reviewed new products join train, and only train.

The catalogue is test_data_prep's title-group catalogue (groups of 4 rows
split by stratified assignment); new products come in a CSV without a
label column, as a marketplace's uncategorised products do.
"""

import json

import pytest

from data_prep import new_products
from test_data_prep import (_dup_catalogue, _photo, _read, _run, _save,
                            _split_of, _tokenizer)


def _catalogue(root):
  """_dup_catalogue with an (empty) image field: the column flags read the
  catalogue and the new products alike."""
  path = _dup_catalogue(root)
  rows = [{**json.loads(l), "image": ""}
          for l in path.read_text().splitlines()]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _args(tmp_path, out, *extra):
  return ["--input", _catalogue(tmp_path), "--title_column=title",
          "--label_column=label", "--image_column=image", "--tokenizer",
          _tokenizer(tmp_path), "--max_length=8", "--examples_per_shard=16",
          "--output_dir", tmp_path / out, *extra]


def _new_csv(path, rows):
  """A new-products CSV: id, title, image (no label column)."""
  path.write_text("id,title,image\n" + "".join(
      f"{i},{t},{im}\n" for i, t, im in rows))
  return path


def _decisions(path, rows):
  path.write_text("product_id,status,label\n" + "".join(
      f"{p},{s},{l}\n" for p, s, l in rows))
  return path


def _title_in(where, split):
  """A catalogue title (its normalized group key) of a ``split`` product."""
  return sorted(g for s, g in where.values() if s == split)[0]


@pytest.fixture(name="base")
def _base(tmp_path):
  """The catalogue prepared without reviews; where each product is."""
  _run(_args(tmp_path, "base"))
  return _split_of(tmp_path / "base")


def test_reviewed_new_products_are_added_to_train_only(tmp_path, base):
  _save(_photo(7), tmp_path / "new" / "photos" / "n1.jpg")
  new = _new_csv(tmp_path / "new" / "new.csv", [
      ("n1", "leather bag for work", "photos/n1.jpg"),     # relabelled
      ("n2", _title_in(base, "train"), ""),                 # accepted
      ("n3", "a thing", ""),                                # unclear
      ("n4", "another thing", ""),                          # undecided
      ("n5", _title_in(base, "validation").upper(), ""),     # eval title
      ("n6", "", "")])                                      # undecided
  fix = _decisions(tmp_path / "d.csv", [
      ("n1", "relabelled", "bag"), ("n2", "accepted", "shoe"),
      ("n3", "unclear", ""), ("n5", "accepted", "shirt")])
  stats = _run(_args(tmp_path, "out", f"--corrections={fix}",
                     f"--new_products={new}"))
  out = tmp_path / "out"
  where = _split_of(out)
  labels = (out / "labels.txt").read_text().splitlines()
  records_ = _read(out, 8)
  # n1 and n2 are training examples with their reviewed labels ...
  assert where.pop("n1")[0] == where.pop("n2")[0] == "train"
  assert records_["n1"]["label/name"].decode() == "bag"
  assert int(records_["n1"]["label"]) == labels.index("bag")
  assert records_["n2"]["label/name"].decode() == "shoe"
  assert int(records_["n1"]["image/present"]) == 1  # The scored photo.
  assert int(records_["n2"]["image/present"]) == 0
  # ... the others are not, and no catalogue product moved.
  assert where == base
  info = json.loads((out / "dataset_info.json").read_text())
  record = info["new_products"]
  assert record == stats["new_products"]
  assert {k: record[k] for k in ("rows", "reviewed", "added", "entered",
                                 "unclear", "undecided", "rejected",
                                 "by_label", "split")} == {
      "rows": 6, "reviewed": 4, "added": 2, "entered": 3, "unclear": 1,
      "undecided": 2, "rejected": {"same_title_as_eval": 1},
      "by_label": {"bag": 1, "shoe": 1}, "split": "train"}
  assert record["files"][0]["path"] == str(new.resolve())
  # The trainer's class counts include them; the catalogue's are unchanged.
  base_info = json.loads((tmp_path / "base" / "dataset_info.json"
                          ).read_text())

  def train_counts(i):
    return [sum(c) for c in zip(*(s["class_counts"]
                                  for s in i["shards"]["train"]))]
  grown = [a - b for a, b in zip(train_counts(info), train_counts(base_info))]
  assert grown == [int(l in ("bag", "shoe")) for l in labels]
  # The held-out one is in rejected.jsonl, saying why.
  rejected = [json.loads(l) for l in (out / "rejected.jsonl").read_text(
      ).splitlines()]
  held = [r for r in rejected if r["id"] == "n5"]
  assert held and held[0]["reason"] == "same_title_as_eval"
  assert "validation" in held[0]["detail"]
  assert held[0]["source"].endswith("new.csv:6")
  # Decisions on new products are not "unknown products".
  assert stats["corrections"]["rejected"] == {}


def _refused(tmp_path, argv, *needles):
  with pytest.raises(SystemExit) as e:
    _run(argv)
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))
  out = tmp_path / "out"
  assert not (out / "dataset_info.json").exists()
  assert not list(out.glob("*.tfrecord*")) and not (out / ".work").exists()
  return str(e.value)


def test_a_decision_on_a_product_in_neither_file_stops_prepare(tmp_path):
  new = _new_csv(tmp_path / "new.csv", [("n1", "leather bag", "")])
  fix = _decisions(tmp_path / "d.csv", [
      ("n1", "accepted", "bag"), ("ghost", "accepted", "bag"),
      ("0", "unclear", "")])  # A catalogue product: fine.
  message = _refused(tmp_path, _args(
      tmp_path, "out", f"--corrections={fix}", f"--new_products={new}"),
      "1 reviewed decision(s) would be lost",
      f"{fix}:3: product 'ghost' is in neither the catalogue",
      str(new.resolve()), "--unmatched_decisions=count")
  assert "'n1'" not in message and "'0'" not in message
  # Without --new_products, a reviewed new product is no longer dropped
  # silently either; with the flag it is counted as before.
  _refused(tmp_path, _args(tmp_path, "out", f"--corrections={fix}"),
           "2 reviewed decision(s) would be lost", "product 'n1'",
           "--new_products (not given)")
  stats = _run(_args(tmp_path, "out", f"--corrections={fix}",
                     "--unmatched_decisions=count"))
  assert stats["corrections"]["rejected"] == {"unknown_product": 2}


def test_a_new_product_labelled_outside_the_class_list_stops_prepare(
    tmp_path):
  new = _new_csv(tmp_path / "new.csv", [("n1", "leather bag", ""),
                                        ("n2", "gold watch", ""),
                                        ("n3", "red shoe", "")])
  fix = _decisions(tmp_path / "d.csv", [
      ("n1", "relabelled", "hat"), ("n2", "relabelled", "watch"),
      ("n3", "accepted", "shoe")])
  _refused(tmp_path, _args(tmp_path, "out", f"--corrections={fix}",
                           f"--new_products={new}"),
           "2 reviewed decision(s) would be lost",
           f"{new}:2: product 'n1' was labelled 'hat' ({fix}:2), not a "
           "class of the catalogue",
           f"{new}:3: product 'n2' was labelled 'watch' ({fix}:3), dropped "
           "as rare")


def test_a_reviewed_new_product_without_a_title_stops_prepare(tmp_path):
  """Checked before the catalogue is read: --overwrite keeps the output
  it would have replaced."""
  _run(_args(tmp_path, "out"))
  new = _new_csv(tmp_path / "new.csv", [
      ("n1", "  ", ""), ("n2", "red shoe", ""), ("n2", "red shoes", ""),
      ("n3", "", "")])  # Undecided: not used, not an error.
  fix = _decisions(tmp_path / "d.csv", [("n1", "accepted", "bag"),
                                        ("n2", "accepted", "shoe")])
  with pytest.raises(SystemExit) as e:
    _run(_args(tmp_path, "out", "--overwrite", f"--corrections={fix}",
               f"--new_products={new}"))
  message = str(e.value)
  assert "2 reviewed new product(s) cannot be added" in message
  assert f"{new}:2: product 'n1' (reviewed: accepted bag) has an empty " \
         "title" in message
  assert f"{new}:4: product 'n2' (reviewed: accepted shoe) appears again " \
         f"(first at {new}:3)" in message
  assert "'n3'" not in message
  assert (tmp_path / "out" / "dataset_info.json").exists()


def test_a_new_product_also_in_the_catalogue_stops_prepare(tmp_path):
  new = _new_csv(tmp_path / "new.csv", [("5", "leather bag", "")])
  fix = _decisions(tmp_path / "d.csv", [("5", "accepted", "bag")])
  _refused(tmp_path, _args(tmp_path, "out", f"--corrections={fix}",
                           f"--new_products={new}"),
           f"{new}:2: product '5' is also in the catalogue (dups.jsonl:6)")


def test_new_products_need_the_decisions(tmp_path):
  new = _new_csv(tmp_path / "new.csv", [("n1", "leather bag", "")])
  with pytest.raises(SystemExit, match="--new_products needs --corrections"):
    _run(_args(tmp_path, "out", f"--new_products={new}"))
  assert not (tmp_path / "out").exists()


def test_added_products_a_shard_writer_rejects_are_not_counted_as_added():
  record = {"added": 2, "entered": 2, "rejected": {},
            "labels": {"n1": "bag", "n2": "shoe"}}
  final = new_products.after_shards(record, {"n2": "image_missing",
                                             "7": "image_missing"})
  assert final == {"added": 1, "entered": 2,
                   "rejected": {"image_missing": 1}, "by_label": {"bag": 1}}
