"""data_prep: bad input, splits, restart, the CLI contract, real data."""

import collections
import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from data_prep import images
from data_prep import prepare
from data_prep import writer
from mic_jax.data import demo
from mic_jax.data import pipeline
from mic_jax.data import records
from mic_jax.text import title_group_key

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "shirt", "shoe", "watch", "bag", "cotton", "leather",
         "item", "new"]


def _tokenizer(root: pathlib.Path) -> pathlib.Path:
  return demo.write_tokenizer(root / "tok", WORDS)


def _save(img: Image.Image, path: pathlib.Path, fmt: str = "JPEG") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path, format=fmt)


def _photo(seed: int, size=(40, 50)) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), np.uint8))


def _read(out: pathlib.Path, max_length: int) -> dict[str, dict]:
  """product_id -> parsed record, with plain tf.data."""
  spec = records.feature_spec(max_length)
  found = {}
  files = sorted(tf.io.gfile.glob(str(out / "*.tfrecord*")))
  for raw in tf.data.TFRecordDataset(files):
    ex = {k: v.numpy() for k, v in
          tf.io.parse_single_example(raw, spec).items()}
    found[ex["product_id"].decode()] = ex
  return found


def _run(argv):
  return prepare.run(prepare.build_parser().parse_args(
      [str(a) for a in argv] + ["--num_workers=1"]))


def _good_rows(root, n, label_of=lambda i: ["shirt", "shoe"][i % 2]):
  rows = []
  for i in range(n):
    _save(_photo(i), root / "images" / f"g{i}.jpg")
    rows.append([f"g{i}", f"new {label_of(i)} item {i}", label_of(i)])
  return rows


@pytest.fixture(scope="module")
def bad_catalogue(tmp_path_factory):
  """A catalogue with every bad-input kind, and the expected handling."""
  root = tmp_path_factory.mktemp("bad")
  img = root / "images"
  rows = _good_rows(root, 12)
  # Images that must be converted, not rejected.
  _save(_photo(1).convert("CMYK"), img / "cmyk.jpg")
  _save(_photo(2).convert("L"), img / "gray.jpg")
  _save(_photo(3), img / "png.jpg", "PNG")  # PNG bytes behind a .jpg name.
  _save(_photo(4).convert("P"), img / "pal.jpg", "PNG")
  _save(_photo(5).convert("RGBA"), img / "alpha.jpg", "PNG")
  _save(_photo(6, (3000, 200)), img / "big.jpg")
  for name in ("cmyk", "gray", "png", "pal", "alpha", "big"):
    rows.append([name, f"cotton shirt {name}", "shirt"])
  # Broken images: kept with image/present = 0.
  full = io.BytesIO()
  _photo(7, (200, 200)).save(full, format="JPEG")
  (img / "trunc.jpg").write_bytes(full.getvalue()[:600])
  (img / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  rows += [["trunc", "leather shoe trunc", "shoe"],
           ["corrupt", "leather shoe corrupt", "shoe"],
           ["nofile", "leather shoe nofile", "shoe"]]
  # Rows to reject.
  rows += [["empty", "", "shoe"], ["blank", " \t  ", "shoe"],
           ["unknown", "red watch", "watch"],
           ["g0", "duplicate id shirt", "shirt"]]
  # A 10,000-character title: kept, truncated, counted.
  _save(_photo(8), img / "long.jpg")
  rows.append(["long", "shirt " * 2000, "shirt"])
  path = root / "catalogue.csv"
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["id", "name", "category"])
    w.writerows(rows)
  with open(path, "ab") as f:
    f.write(b"badutf8,red shirt \xff\xfe bad,shirt\n")
    f.write(b"malformed,too,many,fields\n")
  labels = root / "labels.txt"
  labels.write_text("shirt\nshoe\n")
  return root, path, labels


def _bad_args(root, path, labels, out, *extra):
  return ["--input", path, "--id_column=id", "--title_column=name",
          "--label_column=category", "--image_pattern=images/{id}.jpg",
          "--tokenizer", _tokenizer(root), "--max_length=12",
          "--output_dir", out, "--labels_file", labels,
          "--examples_per_shard=5", "--split_fractions=1,0,0", *extra]


def test_every_bad_input_is_counted_and_handled(bad_catalogue, tmp_path):
  root, path, labels = bad_catalogue
  stats = _run(_bad_args(root, path, labels, tmp_path / "out"))
  assert stats["rejected"] == {
      "duplicate_id": 1, "empty_title": 2, "invalid_utf8": 1,
      "malformed_row": 1, "unknown_label": 1}
  assert stats["repaired"] == {"image_corrupt": 2, "image_missing": 1,
                               "title_truncated": 1}
  assert stats["rows_in"] == 12 + 6 + 3 + 4 + 1 + 2
  assert stats["rows_in"] == stats["rows_out"] + stats["rejected_total"]
  rejected = [json.loads(l) for l in
              (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
  assert collections.Counter(r["reason"] for r in rejected) == (
      collections.Counter(stats["rejected"]))
  found = _read(tmp_path / "out", 12)
  assert len(found) == stats["rows_out"]
  for pid in ("trunc", "corrupt", "nofile"):
    assert found[pid]["image/present"] == 0
    assert found[pid]["image/encoded"] == b""
  for pid in ("cmyk", "gray", "png", "pal", "alpha", "big", "g0"):
    assert found[pid]["image/present"] == 1
    decoded = tf.io.decode_jpeg(found[pid]["image/encoded"]).numpy()
    assert decoded.shape[2] == 3 and max(decoded.shape[:2]) <= 512
  assert tf.io.decode_jpeg(found["big"]["image/encoded"]).shape[1] == 512
  assert found["g0"]["title"] == b"new shirt item 0"  # The first one wins.
  assert len(found["long"]["title"]) == 1000
  assert found["long"]["attention_mask"].sum() == 12


def test_drop_missing_images_rejects_them(bad_catalogue, tmp_path):
  root, path, labels = bad_catalogue
  stats = _run(_bad_args(root, path, labels, tmp_path / "out",
                         "--drop_missing_images"))
  assert stats["rejected"]["image_corrupt"] == 2
  assert stats["rejected"]["image_missing"] == 1
  assert "image_missing" not in stats["repaired"]
  assert stats["rows_in"] == stats["rows_out"] + stats["rejected_total"]
  assert all(ex["image/present"] == 1
             for ex in _read(tmp_path / "out", 12).values())


def _dup_catalogue(root, n=120):
  """Title groups of 4 rows (the same title in case/space variants) in 3
  labels, plus a rare one: splitting rows instead of groups would put most
  groups in more than one split."""
  rows = []
  for i in range(n):
    group = i // 4
    label = ["shirt", "shoe", "bag"][group % 3]
    title = f"{label} {WORDS[group % 7]} {group}"
    title = [title, "  " + title.upper() + " ", title.replace(" ", "  "),
             title.title()][i % 4]
    rows.append({"id": str(i), "title": title, "label": label})
  rows.append({"id": "rare", "title": "one watch", "label": "watch"})
  path = root / "dups.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _split_of(out, max_length=8):
  info = pipeline.DatasetInfo.load(str(out))
  spec = records.feature_spec(max_length)
  where = {}
  for split in ("train", "validation", "test"):
    # dataset_info.json records the split's title lengths (length buckets).
    lengths = []
    for raw in tf.data.TFRecordDataset(info.files(split)):
      ex = tf.io.parse_single_example(raw, spec)
      lengths.append(int(ex["attention_mask"].numpy().sum()))
      where[ex["product_id"].numpy().decode()] = (
          split, title_group_key(ex["title"].numpy().decode()))
    np.testing.assert_array_equal(
        info.length_counts(split),
        np.bincount(lengths, minlength=max_length + 1), err_msg=split)
  return where


def test_split_grouped_stratified_deterministic(tmp_path):
  path = _dup_catalogue(tmp_path)
  args = ["--input", path, "--title_column=title", "--label_column=label",
          "--tokenizer", _tokenizer(tmp_path), "--max_length=8",
          "--examples_per_shard=16"]
  stats = _run(args + ["--output_dir", tmp_path / "a"])
  assert stats["rejected"] == {"rare_class": 1}
  assert stats["rare_classes"] == ["watch"]
  where = _split_of(tmp_path / "a")
  groups = collections.defaultdict(set)
  for split, key in where.values():
    groups[key].add(split)
  sizes = collections.Counter(key for _, key in where.values())
  assert len(sizes) == 30 and set(sizes.values()) == {4}  # Real duplicates.
  assert all(len(s) == 1 for s in groups.values())
  per_split = collections.Counter(s for s, _ in where.values())
  assert per_split["train"] > per_split["validation"] > 0
  assert per_split["test"] > 0
  for split in ("validation", "test"):
    assert len(stats["splits"][split]["per_class"]) == 3  # Stratified.
  _run(args + ["--output_dir", tmp_path / "b"])
  assert _split_of(tmp_path / "b") == where
  _run(args + ["--output_dir", tmp_path / "c", "--seed=7"])
  assert _split_of(tmp_path / "c") != where
  kept = _run(args + ["--output_dir", tmp_path / "d", "--rare_classes=keep"])
  assert kept["rejected"] == {} and kept["num_classes"] == 4


@pytest.mark.parametrize("split_column", [False, True])
def test_rare_class_in_labels_file_is_rejected(tmp_path, split_column):
  """A fixed class list keeps the rare class's id, but not its rows."""
  path = _dup_catalogue(tmp_path)
  if split_column:  # Given splits: the rare row sits in train.
    rows = [dict(json.loads(l), split=["train", "train", "validation",
                                       "test"][i % 4])
            for i, l in enumerate(path.read_text().splitlines())]
    rows[-1]["split"] = "train"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  labels = tmp_path / "labels.txt"
  labels.write_text("bag\nshirt\nshoe\nwatch\n")
  out = tmp_path / "o"
  stats = _run(["--input", path, "--title_column=title",
                "--label_column=label", "--tokenizer", _tokenizer(tmp_path),
                "--max_length=8", "--labels_file", labels, "--output_dir", out]
               + (["--split_column=split"] if split_column else []))
  assert stats["rejected"] == {"rare_class": 1}
  assert stats["rare_classes"] == ["watch"]
  assert stats["rows_in"] == stats["rows_out"] + 1
  rejected = [json.loads(l) for l in
              (out / "rejected.jsonl").read_text().splitlines()]
  assert [(r["id"], r["reason"]) for r in rejected] == [("rare", "rare_class")]
  assert (out / "labels.txt").read_text().split() == [
      "bag", "shirt", "shoe", "watch"]
  assert "rare" not in _split_of(out)


def test_given_splits_are_kept(tmp_path):
  rows = ["id,title,label,split"]
  for i in range(30):
    split = ["train", "train", "validation", "test"][i % 4]
    rows.append(f"{i},shirt {i},{['a', 'b'][i % 2]},{split}")
  rows += ["x1,only in test,c,test", "x2,red shirt,a,holdout"]
  path = tmp_path / "given.csv"
  path.write_text("\n".join(rows) + "\n")
  stats = _run(["--input", path, "--title_column=title",
                "--label_column=label", "--split_column=split",
                "--tokenizer", _tokenizer(tmp_path), "--max_length=8",
                "--min_examples_per_class=1", "--output_dir", tmp_path / "o"])
  assert stats["rejected"] == {"unknown_label": 1, "bad_split_value": 1}
  assert stats["repaired"] == {"image_not_given": 30}  # Text-only is fine.
  where = _split_of(tmp_path / "o")
  for i in range(30):
    assert where[str(i)][0] == ["train", "train", "validation", "test"][i % 4]


def test_label_with_a_line_break_is_rejected_and_counted(tmp_path):
  """A class name with a line break would read back from labels.txt as
  two classes; such rows are rejected with their own reason, and the
  prepared set reads back with exactly its classes."""
  rows = [[str(i), f"shirt {i}", ["a", "b", "c"][i % 3]] for i in range(30)]
  rows += [["n1", "red shirt", "x\ny"], ["n2", "red shoe", "p\u2028q"],
           ["n3", "blue shoe", "p\u2028q"]]
  path = tmp_path / "breaks.csv"
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([["id", "title", "label"], *rows])
  out = tmp_path / "o"
  stats = _run(["--input", path, "--title_column=title",
                "--label_column=label", "--tokenizer", _tokenizer(tmp_path),
                "--max_length=8", "--min_examples_per_class=1",
                "--output_dir", out])
  assert stats["rejected"] == {"label_line_break": 3}
  assert stats["num_classes"] == 3
  rejected = [json.loads(l) for l in
              (out / "rejected.jsonl").read_text("utf-8").splitlines()]
  assert sorted((r["id"], r["reason"]) for r in rejected) == [
      ("n1", "label_line_break"), ("n2", "label_line_break"),
      ("n3", "label_line_break")]
  assert pipeline.DatasetInfo.load(str(out)).labels == ("a", "b", "c")


class _Crash(Exception):
  pass


def test_restart_skips_finished_shards_and_refuses_other_args(
    tmp_path, monkeypatch):
  path = _dup_catalogue(tmp_path)
  args = ["--input", path, "--title_column=title", "--label_column=label",
          "--tokenizer", _tokenizer(tmp_path), "--max_length=8",
          "--examples_per_shard=10", "--output_dir", tmp_path / "o"]
  real = writer.process_shard
  calls = []
  crash = [True]

  def crashing(task, *a, **k):
    calls.append(task.output)
    if crash[0] and len(calls) == 3:
      raise _Crash("simulated crash")
    return real(task, *a, **k)

  monkeypatch.setattr(writer, "process_shard", crashing)
  with pytest.raises(_Crash):
    _run(args)
  assert not (tmp_path / "o" / records.INFO_FILE).exists()
  assert not list((tmp_path / "o").glob("*.tmp"))
  with pytest.raises(SystemExit, match="max_length"):
    _run(args[:-3] + ["--max_length=9", "--output_dir", tmp_path / "o"])
  calls.clear()
  crash[0] = False
  stats = _run(args)
  total_shards = sum(len(v) for v in pipeline.DatasetInfo.load(
      str(tmp_path / "o")).shards.values())
  assert len(calls) == total_shards - 2  # Two shards were already done.
  assert stats["rows_in"] == stats["rows_out"] + stats["rejected_total"]
  with pytest.raises(SystemExit, match="already holds"):
    _run(args)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.binary(max_size=2000))
def test_random_image_bytes_never_crash(data):
  result = images.reencode(data)
  assert bool(result.jpeg) != bool(result.error)


def _valid_image_bytes(fmt: str) -> bytes:
  out = io.BytesIO()
  _photo(11, (32, 24)).save(out, format=fmt)
  return out.getvalue()


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(fmt=st.sampled_from(["JPEG", "PNG"]),
                  edits=st.lists(st.tuples(st.integers(0, 10_000),
                                           st.integers(0, 255)), max_size=8),
                  cut=st.integers(0, 10_000))
def test_damaged_real_images_never_crash(fmt, edits, cut):
  """Bit flips and truncation of a real file: the realistic hostile input."""
  data = bytearray(_valid_image_bytes(fmt))
  for pos, value in edits:
    data[pos % len(data)] = value
  result = images.reencode(bytes(data[:max(1, cut % (len(data) + 1))]))
  assert bool(result.jpeg) != bool(result.error)
  if result.jpeg:
    assert tf.io.decode_jpeg(result.jpeg).shape[2] == 3


@hypothesis.settings(max_examples=40, deadline=None,
                     suppress_health_check=[
                         hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(title=st.binary(max_size=300),
                  image=st.binary(max_size=300))
def test_random_title_and_image_bytes_through_prepare(tmp_path, title, image):
  root = tmp_path / f"h{abs(hash((title, image)))}"
  (root / "images").mkdir(parents=True)
  (root / "images" / "r.jpg").write_bytes(image)
  _save(_photo(0), root / "images" / "ok.jpg")
  path = root / "c.csv"
  path.write_bytes(b"id,title,label\nok,red shirt,a\nok2,blue shirt,a\n"
                   b"r,\"" + title.replace(b'"', b'""') + b"\",a\n")
  stats = _run(["--input", path, "--title_column=title",
                "--label_column=label", "--image_pattern=images/{id}.jpg",
                "--tokenizer", _tokenizer(tmp_path), "--max_length=8",
                "--min_examples_per_class=1", "--output_dir", root / "o"])
  assert stats["rows_in"] == stats["rows_out"] + stats["rejected_total"]
  assert stats["rows_out"] >= 2


def _fashion_subset(fashion_dir, root, n):
  """The first ``n`` real rows as a CSV next to a link to the images."""
  lines = (fashion_dir / "styles.csv").read_text(
      encoding="utf-8").splitlines()[:n + 1]
  (root / "catalogue.csv").write_text("\n".join(lines) + "\n",
                                      encoding="utf-8")
  os.symlink(fashion_dir / "images", root / "images")
  return root / "catalogue.csv"


def test_cli_contract_on_real_rows(fashion_dir, minilm_dir, tmp_path):
  csv_path = _fashion_subset(fashion_dir, tmp_path, 300)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "data_prep.prepare", f"--input={csv_path}",
         "--id_column=id", "--title_column=productDisplayName",
         "--label_column=articleType", "--image_pattern=images/{id}.jpg",
         f"--tokenizer={minilm_dir}", "--max_length=32",
         f"--output_dir={out}", "--examples_per_shard=100"]
  subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=240)
  stats = json.loads((out / "stats.json").read_text())
  found = _read(out, 32)
  assert len(found) == stats["rows_out"] > 250
  assert stats["rows_in"] == 300
  labels = (out / "labels.txt").read_text().splitlines()
  ex = found["1163"]
  assert labels[ex["label"]] == "Tshirts"
  assert ex["title"] == b"Nike Sahara Team India Fanwear Round Neck Jersey"
  assert ex["input_ids"][0] == 101 and ex["image/present"] == 1
  assert tf.io.decode_jpeg(ex["image/encoded"]).shape == (80, 60, 3)
  batch = next(pipeline.train_batches(str(out), batch_size=4,
                                      image_size=224, seed=0))
  assert batch["image"].shape == (4, 224, 224, 3)


@pytest.mark.slow
def test_full_fashion_catalogue(fashion_dir, minilm_dir, tmp_path):
  stats = _run(["--input", fashion_dir, "--fashion_level=articleType",
                "--tokenizer", minilm_dir, "--max_length=32",
                "--output_dir", tmp_path / "o"])
  assert stats["rows_in"] == 35358
  assert stats["rows_in"] == stats["rows_out"] + stats["rejected_total"]
  where = collections.defaultdict(set)
  for split, key in _split_of(tmp_path / "o", 32).values():
    where[key].add(split)
  assert all(len(s) == 1 for s in where.values())
  assert set(stats["splits"]) == {"train", "validation", "test"}
  assert json.loads((tmp_path / "o" / "taxonomy.json").read_text())[
      "levels"] == ["masterCategory", "subCategory", "articleType"]


def test_rakuten_layout(tmp_path):
  images_dir = tmp_path / "images" / "image_train"
  x = ["integer_id,designation,description,productid,imageid"]
  y = ["integer_id,prdtypecode"]
  for i in range(8):
    if i != 3:  # Product 3 has no photo file.
      _save(_photo(i), images_dir / f"image_{100 + i}_product_{200 + i}.jpg")
    x.append(f'{i},"Livre {i}","desc, {i}",{200 + i},{100 + i}')
    y.append(f"{i},{[10, 2280][i % 2]}")
  (tmp_path / "X_train.csv").write_text("\n".join(x) + "\n")
  (tmp_path / "Y_train.csv").write_text("\n".join(y) + "\n")
  stats = _run(["--input", tmp_path / "X_train.csv", "--tokenizer",
                _tokenizer(tmp_path), "--max_length=8",
                "--output_dir", tmp_path / "o", "--split_fractions=1,0,0"])
  assert stats["rows_out"] == 8 and stats["repaired"] == {"image_missing": 1}
  assert (tmp_path / "o" / "labels.txt").read_text().split() == ["10", "2280"]
  found = _read(tmp_path / "o", 8)
  assert found["203"]["image/present"] == 0
  assert found["205"]["image/present"] == 1
  assert found["205"]["title"] == b"Livre 5"


# A newcomer's first hour (issue 32): mistakes in the flags are named.


def _small_csv(path, header, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([header, *rows])
  return path


def test_a_missing_column_is_named_before_rows_are_read(tmp_path):
  path = _small_csv(tmp_path / "c.csv", ["id", "name", "label"],
                    [[f"p{i}", f"red shirt {i}", "shirt"] for i in range(6)])
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    _run(["--input", path, "--tokenizer", _tokenizer(tmp_path),
          "--output_dir", out, "--image_pattern=images/{sku}.jpg"])
  message = str(e.value.code)
  assert "\n" not in message, message
  assert "'title' (--title_column)" in message, message
  assert "'sku' (--image_pattern)" in message, message
  assert "'id'" not in message.split(";")[0], message  # Only the missing.
  assert "id, name, label" in message, message  # What the file has.
  assert not (out / prepare.WORK).exists()  # No row was read.


def test_no_usable_class_points_to_a_rejected_file_with_ids(tmp_path):
  """Every row rejected: the message names a rejected.jsonl that exists,
  and its rows carry their ids, also for a record missing a field."""
  lines = [json.dumps({"id": f"p{i}", "title": "", "label": "shirt"})
           for i in range(4)]
  lines.append(json.dumps({"id": "q1", "label": "shirt"}))  # No title.
  path = tmp_path / "c.jsonl"
  path.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    _run(["--input", path, "--tokenizer", _tokenizer(tmp_path),
          "--output_dir", out])
  message = str(e.value.code)
  assert "\n" not in message, message
  assert str(out / "rejected.jsonl") in message, message
  assert "empty_title 4" in message and "malformed_row 1" in message, message
  rejected = [json.loads(l) for l in
              (out / "rejected.jsonl").read_text("utf-8").splitlines()]
  assert sorted(r["id"] for r in rejected) == ["p0", "p1", "p2", "p3", "q1"]


def test_a_catalogue_without_photos_is_said_plainly(tmp_path, capsys):
  """Not "repaired image_missing 6": no photo was found, and where it was
  looked for; a warning when no product has one."""
  rows = [[f"p{i}", f"red {['shirt', 'shoe'][i % 2]} {i}",
           ["shirt", "shoe"][i % 2]] for i in range(12)]
  path = _small_csv(tmp_path / "c.csv", ["id", "title", "label"], rows)
  out = tmp_path / "out"
  prepare.main([f"--input={path}", f"--tokenizer={_tokenizer(tmp_path)}",
                f"--output_dir={out}", "--max_length=8", "--num_workers=1",
                "--image_pattern=images/{id}.jpg"])
  lines = capsys.readouterr().out.splitlines()
  output = "\n".join(lines)
  assert not any(l.startswith("repaired") for l in lines), output
  warning = [l for l in lines if l.startswith("warning")]
  assert len(warning) == 1, output
  assert "no product has a photo" in warning[0], output
  assert str(tmp_path / "images") in warning[0], output  # Where it looked.
  # No image flag at all: also said, with the flags that would give one.
  prepare.main([f"--input={path}", f"--tokenizer={_tokenizer(tmp_path)}",
                f"--output_dir={out}", "--max_length=8", "--num_workers=1",
                "--overwrite"])
  warning = [l for l in capsys.readouterr().out.splitlines()
             if l.startswith("warning")]
  assert len(warning) == 1 and "--image_pattern" in warning[0], warning
