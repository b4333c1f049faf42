"""data_prep.digest: blind to shards and their order, sensitive to content."""

import csv
import dataclasses
import io
import json
import pathlib

import numpy as np
from PIL import Image
import pytest

from data_prep import digest as digest_lib
from data_prep import prepare
from mic_jax.data import demo
from mic_jax.data import records

WORDS = ["red", "blue", "shirt", "shoe", "cotton", "leather", "item", "new"]
MAX_LENGTH = 8


def _jpeg(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(
      buf, format="JPEG")
  return buf.getvalue()


def _examples(n: int = 10) -> list[records.Example]:
  out = []
  for i in range(n):
    ids = [2, 5 + i % 8, 3] + [0] * (MAX_LENGTH - 3)
    out.append(records.Example(
        product_id=f"p{i:03d}", title=f"title {i}", input_ids=ids,
        attention_mask=[1, 1, 1] + [0] * (MAX_LENGTH - 3), label=i % 2,
        label_name=["shirt", "shoe"][i % 2],
        image_jpeg=_jpeg(i) if i % 3 else b""))
  return out


def _write(path: pathlib.Path, examples: list[records.Example],
           per_shard: int, reverse: bool = False) -> pathlib.Path:
  """Examples 0-6 as train, 7-9 as validation; ``reverse``: each split's
  records in the opposite order."""
  step = -1 if reverse else 1
  records.write_examples(
      path, {"train": examples[:7][::step], "validation": examples[7:][::step]},
      labels=["shirt", "shoe"], max_length=MAX_LENGTH,
      examples_per_shard=per_shard)
  return path


def test_shard_count_and_record_order_do_not_matter(tmp_path):
  examples = _examples()
  one = digest_lib.digest(_write(tmp_path / "one", examples, 100))
  many = digest_lib.digest(_write(tmp_path / "many", examples, 2, reverse=True))
  info = records.read_info(tmp_path / "many")
  assert len(info["shards"]["train"]) == 4  # Really another layout.
  assert digest_lib.differences(one, many) == []
  assert one == many
  assert one["splits"]["train"]["examples"] == 7
  assert one["splits"]["validation"]["with_photo"] == 2
  assert one["labels"] == ["shirt", "shoe"]


@pytest.mark.parametrize("change, field", [
    (lambda e: dataclasses.replace(e, label=1 - e.label), "labels"),
    (lambda e: dataclasses.replace(
        e, input_ids=[2, 6, 3] + [0] * (MAX_LENGTH - 3)), "tokens"),
    (lambda e: dataclasses.replace(
        e, attention_mask=[1, 1, 0] + [0] * (MAX_LENGTH - 3)), "tokens"),
    (lambda e: dataclasses.replace(
        e, image_jpeg=e.image_jpeg[:-3] + bytes([e.image_jpeg[-3] ^ 1])
        + e.image_jpeg[-2:]), "images"),
    (lambda e: dataclasses.replace(e, product_id="p999"), "ids"),
])
def test_one_changed_value_changes_its_field_hash(tmp_path, change, field):
  examples = _examples()
  base = digest_lib.digest(_write(tmp_path / "base", examples, 3))
  changed = list(examples)
  changed[4] = change(examples[4])  # p004: in train, with a photo.
  other = digest_lib.digest(_write(tmp_path / "changed", changed, 3))
  diff = digest_lib.differences(base, other)
  assert f"splits.train.sha256.{field}" in " ".join(diff)
  assert any(line.startswith("splits.train.sha256.all") for line in diff)
  assert not any(".validation." in line for line in diff)


def test_a_short_shard_is_an_error_not_a_digest(tmp_path):
  path = _write(tmp_path / "d", _examples(), 3)
  info = records.read_info(path)
  info["shards"]["train"][0]["examples"] += 1
  records.write_json_atomic(path / records.INFO_FILE, info)
  with pytest.raises(digest_lib.DigestError, match="train has 7 records"):
    digest_lib.digest(path)
  with pytest.raises(FileNotFoundError):
    digest_lib.digest(tmp_path / "nothing")


def _catalogue(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A small CSV catalogue with photos, a row to reject and a tokenizer."""
  (root / "images").mkdir(parents=True)
  rows = [["id", "title", "label"]]
  for i in range(30):
    label = ["shirt", "shoe"][i % 2]
    if i % 4:
      Image.open(io.BytesIO(_jpeg(i))).save(root / "images" / f"{i}.jpg")
    rows.append([str(i), f"new {WORDS[i % 6]} {label} {i}", label])
  rows.append(["99", "", "shoe"])  # Rejected: empty_title.
  with open(root / "c.csv", "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows)
  tok = demo.write_tokenizer(root / "tok", WORDS)
  return root / "c.csv", tok


def _prepare(csv_path, tok, out, *extra):
  return prepare.run(prepare.build_parser().parse_args([
      f"--input={csv_path}", f"--tokenizer={tok}", f"--output_dir={out}",
      "--image_pattern=images/{id}.jpg", "--max_length=8", "--num_workers=1",
      *extra]))


def test_prepared_twice_with_other_shards_digests_equal(tmp_path, capsys):
  csv_path, tok = _catalogue(tmp_path / "raw")
  _prepare(csv_path, tok, tmp_path / "a", "--examples_per_shard=4")
  _prepare(csv_path, tok, tmp_path / "b", "--examples_per_shard=1000")
  a, b = (digest_lib.digest(tmp_path / n) for n in "ab")
  assert a == b
  assert a["rejected"] == {"empty_title": 1}
  assert a["rows_in"] == 31
  assert sum(s["examples"] for s in a["splits"].values()) == 30
  # Timings and paths are left out: nothing of tmp_path is in the digest.
  assert str(tmp_path) not in json.dumps(a)
  # The program: JSON on stdout; --compare exits 0 on a match, 1 otherwise.
  capsys.readouterr()
  assert digest_lib.main([str(tmp_path / "a")]) == 0
  assert json.loads(capsys.readouterr().out) == a
  recorded = tmp_path / "recorded.json"
  recorded.write_text(json.dumps({"command": "...", "digest": b}))
  assert digest_lib.main([str(tmp_path / "a"), f"--compare={recorded}"]) == 0
  b["rejected"] = {"empty_title": 2}
  recorded.write_text(json.dumps({"digest": b}))
  assert digest_lib.main([str(tmp_path / "a"), f"--compare={recorded}"]) == 1
  assert "rejected.empty_title: expected 2, found 1" in capsys.readouterr().out
