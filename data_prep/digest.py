r"""A digest of a prepared directory: what two preparations must agree on.

Issue 33 moves data_prep onto Apache Beam; before the old path goes, its
output is recorded as digests (``data_prep/testdata/digests/``) so the new
path can be proven to write the same data. "The same" means the same
examples, not the same files: a Beam run writes another number of shards in
another order, so the digest sorts examples by product id and hashes them
field by field, and leaves out everything that legitimately differs between
runs (shard names and counts, timings, absolute paths such as the tokenizer
directory).

Per split it records the example count, the class and token-length counts
(summed over shards, as the trainer reads them) and a SHA-256 per field
(``ids``, ``labels``, ``titles``, ``tokens``, ``images``) plus ``all`` over
every field, so a mismatch says which field differs. Beside the splits: the
class list, the rejections and repairs by reason (``stats.json``, or
``dataset_info.json`` where a writer puts them there), the photo
preprocessing and a hash of the taxonomy.

  python -m data_prep.digest prepared/fashion-articletype
  python -m data_prep.digest prepared/demo --compare=data_prep/testdata/digests/demo.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

# Before TensorFlow loads: quiet C++ logs on the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mic_jax.data import pipeline  # noqa: E402
from mic_jax.data import records  # noqa: E402

DIGEST_VERSION = 1
# Field groups hashed separately (each one's record keys, in this order).
FIELDS = {
    "ids": ("product_id",),
    "labels": ("label", "label/name"),
    "titles": ("title",),
    "tokens": ("input_ids", "attention_mask", "token_type_ids"),
    "images": ("image/present", "image/encoded"),
}
STATS_FILE = "stats.json"
# stats.json keys that are the same on every run of the same command.
_STATS_KEYS = ("rows_in", "rows_out", "rejected", "repaired", "rare_classes")
_BATCH = 256


class DigestError(ValueError):
  """A prepared directory whose records disagree with its own
  ``dataset_info.json`` (a damaged or half-written set)."""


def _field_bytes(value: bytes | np.ndarray) -> bytes:
  """One parsed feature as canonical bytes, length-prefixed so that two
  fields can never run into each other."""
  if isinstance(value, bytes):  # A tf.string scalar.
    raw = value
  else:
    raw = np.asarray(value, "<i8").tobytes()
  return len(raw).to_bytes(8, "little") + raw


def _examples(info: pipeline.DatasetInfo, split: str
              ) -> Iterator[dict[str, np.ndarray]]:
  """The parsed records of ``split``, in file order (which does not matter:
  the caller sorts)."""
  spec = records.feature_spec(info.max_length)
  files = info.files(split)
  if not files:
    return
  ds = tf.data.TFRecordDataset(files).batch(_BATCH).map(
      lambda raw: tf.io.parse_example(raw, spec))
  for batch in ds.as_numpy_iterator():
    for i in range(len(batch["product_id"])):
      yield {key: batch[key][i] for key in spec}


def split_digest(info: pipeline.DatasetInfo, split: str) -> dict[str, Any]:
  """Counts and per-field hashes of one split, independent of its shards.

  Each example contributes one short hash per field group; the groups'
  hashes are then taken over the examples sorted by product id (ties, which
  data_prep never writes, by the example's hash so the order stays fixed).
  """
  rows: list[tuple[bytes, bytes, dict[str, bytes]]] = []
  with_photo = 0
  for ex in _examples(info, split):
    parts = {group: b"".join(_field_bytes(ex[k]) for k in keys)
             for group, keys in FIELDS.items()}
    per_field = {group: hashlib.blake2b(b, digest_size=16).digest()
                 for group, b in parts.items()}
    whole = hashlib.blake2b(b"".join(per_field.values()),
                            digest_size=16).digest()
    rows.append((bytes(ex["product_id"]), whole, per_field))
    with_photo += int(ex["image/present"])
  rows.sort(key=lambda r: (r[0], r[1]))
  hashes = {group: hashlib.sha256() for group in FIELDS}
  whole_hash = hashlib.sha256()
  for _, whole, per_field in rows:
    whole_hash.update(whole)
    for group, h in per_field.items():
      hashes[group].update(h)
  expected = info.split_size(split)
  if len(rows) != expected:
    raise DigestError(
        f"{info.data_dir}: split {split} has {len(rows)} records but "
        f"{records.INFO_FILE} says {expected}")
  lengths = info.length_counts(split)
  return {
      "examples": len(rows),
      "with_photo": with_photo,
      "class_counts": info.class_counts(split).tolist(),
      "length_counts": None if lengths is None else lengths.tolist(),
      "sha256": {"all": whole_hash.hexdigest(),
                 **{g: h.hexdigest() for g, h in hashes.items()}},
  }


def _without_paths(record: Mapping[str, Any]) -> dict[str, Any]:
  """A corrections record minus where its file was (an absolute path)."""
  return {k: v for k, v in record.items() if k != "source"}


def digest(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """The digest of a complete prepared directory (see the module doc).

  Raises:
    FileNotFoundError: ``data_dir`` holds no ``dataset_info.json`` (not a
      prepared set, or one still being written).
    DigestError: a split's records disagree with ``dataset_info.json``.
  """
  path = pathlib.Path(data_dir)
  info = pipeline.DatasetInfo.load(str(path))
  raw_info = records.read_info(path)
  stats: dict[str, Any] = {}
  if (path / STATS_FILE).exists():
    stats = json.loads((path / STATS_FILE).read_text(encoding="utf-8"))
  # Rejections live in stats.json today; a later writer may record them in
  # dataset_info.json instead, which then wins.
  outcome = {k: raw_info.get(k, stats.get(k)) for k in _STATS_KEYS}
  taxonomy = None
  if info.taxonomy is not None:
    taxonomy = hashlib.sha256(json.dumps(
        info.taxonomy, sort_keys=True, ensure_ascii=False).encode(
            "utf-8")).hexdigest()
  corrections = raw_info.get("corrections")
  return {
      "digest_version": DIGEST_VERSION,
      "fields": {g: list(keys) for g, keys in FIELDS.items()},
      "format_version": raw_info.get("format_version"),
      "max_length": info.max_length,
      "labels": list(info.labels),
      **outcome,
      "photo_preprocessing": raw_info.get("photo_preprocessing"),
      "seed": raw_info.get("seed"),
      "taxonomy_sha256": taxonomy,
      "corrections": (None if corrections is None
                      else _without_paths(corrections)),
      "splits": {s: split_digest(info, s) for s in records.SPLITS
                 if s in info.shards},
  }


def differences(expected: Mapping[str, Any], found: Mapping[str, Any],
                where: str = "") -> list[str]:
  """Where two digests differ, one readable line per differing leaf (lists
  of counts are compared whole, so a changed class list is one line)."""
  lines = []
  for key in sorted(set(expected) | set(found)):
    name = f"{where}.{key}" if where else key
    a, b = expected.get(key), found.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      lines += differences(a, b, name)
    elif a != b:
      short = lambda v: (json.dumps(v)[:120] if v is not None else "absent")  # noqa: E731
      lines.append(f"{name}: expected {short(a)}, found {short(b)}")
  return lines


def main(argv: list[str] | None = None) -> int:
  """Prints a directory's digest as JSON; with ``--compare``, exits 1 and
  lists the differences when it does not match a recorded one."""
  p = argparse.ArgumentParser(prog="python -m data_prep.digest",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("data_dir", help="a prepared directory")
  p.add_argument("--compare", default="",
                 help="a recorded digest (JSON; a file with a 'digest' key, "
                      "as in data_prep/testdata/digests/, also works)")
  args = p.parse_args(argv)
  try:
    found = digest(args.data_dir)
  except (FileNotFoundError, DigestError, records.LabelsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not args.compare:
    print(json.dumps(found, indent=1, ensure_ascii=False))
    return 0
  recorded = json.loads(pathlib.Path(args.compare).read_text(encoding="utf-8"))
  expected = recorded.get("digest", recorded)
  diff = differences(expected, found)
  for line in diff:
    print(line)
  if not diff:
    print(f"{args.data_dir} matches {args.compare}")
  return 1 if diff else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
