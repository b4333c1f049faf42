"""Scores every product of a prepared split with an export (batch scoring).

The products are read from the split's TFRecords exactly as the evaluator
reads them: the stored token ids, and the stored (already re-encoded) JPEG
through :func:`mic_jax.data.preprocess.eval_image`, so a score here is the
score evaluation gave that product, and the photo a reviewer is shown (the
record's own bytes, named by ``photo``) is the photo the model scored.

One row per product, in shard order::

  {"id", "title", "label" (the catalogue's), "top_k": [{"label", "prob"}],
   "label_prob" (the calibrated probability of the catalogue's label, also
   when it is outside the top k: what the suspected label errors queue of
   :mod:`mic_jax.reviewing.suspects` ranks by),
   "abstain", "parents" (when the export has a taxonomy),
   "export" (the export's identity, :func:`mic_jax.serving.bundle.identity`),
   "photo": {"tfrecord": absolute shard path, "index": record number} or
   null when the product has no photo}
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from mic_jax.data import pipeline
from mic_jax.data import preprocess
from mic_jax.data import records


class ScoringError(ValueError):
  """The split cannot be scored with this export; the message says why."""


def _records(info: pipeline.DatasetInfo, split: str, image_size: int
             ) -> Iterator[tuple[str, int, dict[str, Any]]]:
  """(shard path, record index, decoded features) in shard order."""
  spec = records.feature_spec(info.max_length)

  def decode(serialized):
    ex = tf.io.parse_single_example(serialized, spec)
    ex["image"] = preprocess.eval_image(ex["image/encoded"],
                                        ex["image/present"], image_size)
    return ex

  for file in info.files(split):
    if not pathlib.Path(file).exists():
      raise ScoringError(f"{file} is missing: the prepared data "
                         f"{info.data_dir} is incomplete")
    ds = tf.data.TFRecordDataset(file).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for index, ex in enumerate(ds.as_numpy_iterator()):
      yield str(pathlib.Path(file).resolve()), index, ex


def count(data_dir: str, split: str) -> int:
  """Products in ``split`` (from ``dataset_info.json``)."""
  return pipeline.DatasetInfo.load(data_dir).split_size(split)


def score_split(predictor: Any, data_dir: str, split: str, *,
                top_k: int = 5, batch_size: int = 64,
                max_products: int = 0) -> Iterator[dict[str, Any]]:
  """Yields one score row per product of ``split`` (see the module doc).

  ``max_products`` > 0 stops after that many (a slice, in shard order).
  Raises :class:`ScoringError` when the data's labels or token length are
  not the export's (scores would name the wrong classes).
  """
  try:
    info = pipeline.DatasetInfo.load(data_dir)
  except FileNotFoundError as e:
    raise ScoringError(f"{e}: not a prepared data set (python -m "
                       "data_prep.prepare)") from e
  if list(info.labels) != list(predictor.labels):
    raise ScoringError(f"{data_dir} has other labels than the export "
                       f"{predictor.dir} ({len(info.labels)} vs "
                       f"{len(predictor.labels)}): score data prepared "
                       "with the export's label list")
  if info.max_length != predictor.max_length:
    raise ScoringError(f"{data_dir} has titles of {info.max_length} "
                       f"tokens, the export {predictor.dir} reads "
                       f"{predictor.max_length}")
  if not info.has_split(split):
    raise ScoringError(f"{data_dir} has no {split!r} split (it has "
                       f"{', '.join(sorted(info.shards)) or 'none'})")
  chunk: list[tuple[str, int, dict[str, Any]]] = []
  seen = 0

  def flush() -> Iterator[dict[str, Any]]:
    batch = {
        "input_ids": np.stack([e["input_ids"] for _, _, e in chunk]),
        "attention_mask": np.stack([e["attention_mask"] for _, _, e in chunk]),
        "token_type_ids": np.stack([e["token_type_ids"] for _, _, e in chunk]),
        "image": np.stack([e["image"] for _, _, e in chunk]),
        "image_present": np.array([e["image/present"] for _, _, e in chunk]),
    }
    batch = {k: v.astype(np.float32 if k == "image" else np.int32)
             for k, v in batch.items()}
    probs = predictor.probabilities_of_arrays(batch)
    results = predictor.results(probs, top_k=top_k)
    for (file, index, ex), result, p in zip(chunk, results, probs):
      yield {"id": ex["product_id"].decode("utf-8"),
             "title": ex["title"].decode("utf-8"),
             "label": info.labels[int(ex["label"])], **result,
             "label_prob": float(p[int(ex["label"])]),
             "export": predictor.identity,
             "photo": ({"tfrecord": file, "index": index}
                       if ex["image/present"] else None)}
    chunk.clear()

  for item in _records(info, split, predictor.image_size):
    chunk.append(item)
    seen += 1
    if len(chunk) == batch_size:
      yield from flush()
    if max_products and seen >= max_products:
      break
  if chunk:
    yield from flush()


def shard_photos(tfrecord: str) -> list[bytes]:
  """The stored JPEG of every record of a prepared shard, in order (b""
  for a product without a photo): what ``photo`` rows point into."""
  spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string,
                                                 default_value=b"")}
  ds = tf.data.TFRecordDataset(tfrecord).map(
      lambda x: tf.io.parse_single_example(x, spec)["image/encoded"])
  return list(ds.as_numpy_iterator())
