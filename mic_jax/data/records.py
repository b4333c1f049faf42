"""The prepared-data record format: one place that both writer and reader use.

A prepared data set is a directory with sharded TFRecord files
``{split}.tfrecord-{index:05d}-of-{count:05d}`` of ``tf.train.Example``s,
``labels.txt`` (one class per line; line number = label id; a label can
hold no line break, :func:`label_problem`) and
``dataset_info.json`` (max_length, labels, per-shard example, class and
token-length counts; the last is what length buckets are chosen from). Keeping
the feature spec here means data_prep, the synthetic demo writer and the
tf.data reader can never disagree about a key or a dtype.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

SPLITS = ("train", "validation", "test")
INFO_FILE = "dataset_info.json"
LABELS_FILE = "labels.txt"
FORMAT_VERSION = 1
# Per-shard key: titles per token length (index 0..max_length, [CLS]/[SEP]
# included). Absent in sets prepared before length buckets; readers then
# count the lengths from the records.
LENGTH_COUNTS = "length_counts"


def length_counts(lengths: Iterable[int] | dict[Any, int], max_length: int
                  ) -> list[int]:
  """Titles per token length ``[max_length + 1]``, from the token lengths of
  the titles or from a ``{length: count}`` mapping."""
  counts = [0] * (max_length + 1)
  items = (lengths.items() if isinstance(lengths, dict)
           else ((n, 1) for n in lengths))
  for n, c in items:
    if not 0 <= int(n) <= max_length:
      raise ValueError(f"token length {n} outside [0, {max_length}]")
    counts[int(n)] += int(c)
  return counts


# Every character str.splitlines() breaks a line at: a label holding one
# would read back from labels.txt as two classes (and shift every later id).
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


class LabelsError(ValueError):
  """A class list that labels.txt cannot hold, or a labels.txt that does not
  match its dataset_info.json."""


def label_problem(name: str) -> str | None:
  """Why ``name`` cannot be a class name in ``labels.txt``, or None."""
  breaks = sorted({f"U+{ord(c):04X}" for c in name if c in LINE_BREAKS})
  if breaks:
    return f"contains a line break ({', '.join(breaks)})"
  if not name:
    return "is empty"
  return None


def _bad_labels(labels: Sequence[str]) -> list[tuple[int, str, str]]:
  """``(index, name, why)`` of each class name labels.txt cannot hold."""
  return [(i, name, why) for i, name in enumerate(labels)
          if (why := label_problem(name))]


def feature_spec(max_length: int) -> dict[str, Any]:
  """The ``tf.io.parse_single_example`` spec of one product."""
  ints = tf.io.FixedLenFeature([max_length], tf.int64)
  return {
      "product_id": tf.io.FixedLenFeature([], tf.string),
      "title": tf.io.FixedLenFeature([], tf.string),
      "input_ids": ints,
      "attention_mask": ints,
      "token_type_ids": tf.io.FixedLenFeature(
          [max_length], tf.int64, default_value=[0] * max_length),
      "image/encoded": tf.io.FixedLenFeature([], tf.string, default_value=b""),
      "image/present": tf.io.FixedLenFeature([], tf.int64, default_value=0),
      "label": tf.io.FixedLenFeature([], tf.int64),
      "label/name": tf.io.FixedLenFeature([], tf.string, default_value=b""),
  }


@dataclasses.dataclass(frozen=True)
class Example:
  """One product, ready to serialize. Token arrays have length max_length."""
  product_id: str
  title: str
  input_ids: Sequence[int]
  attention_mask: Sequence[int]
  label: int
  label_name: str = ""
  token_type_ids: Sequence[int] | None = None
  image_jpeg: bytes = b""


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Iterable[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(
      value=[int(v) for v in values]))


def serialize(example: Example) -> bytes:
  """``Example`` -> serialized ``tf.train.Example`` bytes."""
  ids = np.asarray(example.input_ids, np.int64)
  types = (np.zeros_like(ids) if example.token_type_ids is None
           else np.asarray(example.token_type_ids, np.int64))
  if not (ids.shape == np.shape(example.attention_mask) == types.shape):
    raise ValueError(f"{example.product_id}: token arrays differ in length")
  feature = {
      "product_id": _bytes([example.product_id.encode("utf-8")]),
      "title": _bytes([example.title.encode("utf-8")]),
      "input_ids": _ints(ids),
      "attention_mask": _ints(example.attention_mask),
      "token_type_ids": _ints(types),
      "image/encoded": _bytes([example.image_jpeg]),
      "image/present": _ints([1 if example.image_jpeg else 0]),
      "label": _ints([example.label]),
      "label/name": _bytes([example.label_name.encode("utf-8")]),
  }
  return tf.train.Example(features=tf.train.Features(
      feature=feature)).SerializeToString()


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}.tfrecord-{index:05d}-of-{count:05d}"


def write_shard(path: str | os.PathLike[str], examples: Iterable[Example]
                ) -> int:
  """Writes one shard atomically (temp name, then rename); returns its size.

  A crash mid-write leaves only a ``.tmp`` file, never a shard that looks
  complete, which is what makes data_prep restartable.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  count = 0
  with tf.io.TFRecordWriter(str(tmp)) as writer:
    for example in examples:
      writer.write(serialize(example))
      count += 1
  os.replace(tmp, path)
  return count


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n",
                 encoding="utf-8")
  os.replace(tmp, path)


def write_info(data_dir: str | os.PathLike[str], *, labels: Sequence[str],
               max_length: int, shards: dict[str, list[dict[str, Any]]],
               extra: dict[str, Any] | None = None) -> None:
  """Writes ``labels.txt`` and ``dataset_info.json`` (written last: its
  presence means the data set is complete).

  Args:
    data_dir: the prepared directory.
    labels: class names; index = label id.
    max_length: token length of every record.
    shards: split -> ``[{"file": name, "examples": n, "class_counts": [...],
      "length_counts": [...]}]`` (``length_counts``: see
      :data:`LENGTH_COUNTS`).
    extra: more keys to record (e.g. the tokenizer, taxonomy file name).
  """
  data_dir = pathlib.Path(data_dir)
  bad = _bad_labels(labels)
  if bad:
    i, name, why = bad[0]
    raise LabelsError(
        f"{data_dir / LABELS_FILE}: {len(bad)} class name(s) cannot be "
        f"written one per line; the first, class {i} {name!r}, {why}. "
        "data_prep rejects such rows (reason label_line_break)")
  tmp = data_dir / (LABELS_FILE + ".tmp")
  tmp.write_text("".join(f"{name}\n" for name in labels), encoding="utf-8")
  os.replace(tmp, data_dir / LABELS_FILE)
  info = {"format_version": FORMAT_VERSION, "max_length": int(max_length),
          "num_classes": len(labels), "shards": shards, **(extra or {})}
  write_json_atomic(data_dir / INFO_FILE, info)


def read_info(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """The ``dataset_info.json`` of a prepared directory, as written by
  :func:`write_info`; raises FileNotFoundError when it is absent."""
  info_file = pathlib.Path(data_dir) / INFO_FILE
  if not info_file.exists():
    raise FileNotFoundError(f"{info_file} not found")
  return json.loads(info_file.read_text(encoding="utf-8"))


def read_labels(data_dir: str | os.PathLike[str],
                num_classes: int | None = None) -> tuple[str, ...]:
  """The class names of ``labels.txt`` (index = label id).

  Read back exactly as :func:`write_info` writes them (one per ``\n``).
  A file that would not read back as written (a label holding a line
  break, as an older writer allowed) or whose count differs from
  ``num_classes`` (``dataset_info.json``'s) raises :class:`LabelsError`
  naming the file, instead of a shape error much later.
  """
  path = pathlib.Path(data_dir) / LABELS_FILE
  text = path.read_text(encoding="utf-8")
  labels = tuple(text[:-1].split("\n") if text.endswith("\n") else
                 text.split("\n") if text else ())
  bad = _bad_labels(labels)
  if bad:
    i, name, why = bad[0]
    raise LabelsError(
        f"{path}: line {i + 1} ({name!r}) {why}; labels.txt holds one class "
        "name per line. Prepare the data set again with python -m "
        "data_prep.prepare, which rejects such labels")
  if num_classes is not None and len(labels) != num_classes:
    raise LabelsError(
        f"{path} has {len(labels)} lines but {INFO_FILE} says {num_classes} "
        "classes (a class name with a line break, or a file edited by hand); "
        "prepare the data set again with python -m data_prep.prepare")
  return labels


def write_examples(data_dir: str | os.PathLike[str],
                   splits: dict[str, Sequence[Example]], *,
                   labels: Sequence[str], max_length: int,
                   examples_per_shard: int = 1024) -> None:
  """Writes a complete prepared data set from in-memory examples.

  For tests and the synthetic demo; data_prep streams the same shards and
  the same info file through :func:`write_shard` and :func:`write_info`.
  """
  data_dir = pathlib.Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  shards: dict[str, list[dict[str, Any]]] = {}
  for split, examples in splits.items():
    count = max(1, -(-len(examples) // examples_per_shard))
    shards[split] = []
    for index in range(count):
      part = list(examples[index::count])
      name = shard_name(split, index, count)
      write_shard(data_dir / name, part)
      counts = np.bincount([e.label for e in part], minlength=len(labels))
      shards[split].append({
          "file": name, "examples": len(part),
          "class_counts": counts.tolist(),
          LENGTH_COUNTS: length_counts(
              (int(np.sum(e.attention_mask)) for e in part), max_length)})
  write_info(data_dir, labels=labels, max_length=max_length, shards=shards)
