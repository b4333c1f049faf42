"""tf.data input pipeline: prepared TFRecords -> per-host numpy batches.

Train stream design (resumable bit-for-bit): the stream is a pure function of
(seed, step). Epoch ``e`` reads this host's files in an order shuffled by
(seed, e), interleaves them deterministically and shuffles examples with a
buffer seeded by (seed, e). Image augmentation uses stateless random ops
seeded by (seed, absolute example index). To start at step ``s`` we compute
the absolute example index ``s * batch_size``, jump to its epoch and skip the
raw (still encoded) records before it, so nothing is decoded twice and no
iterator state needs checkpointing.

Eval: files are read in a fixed order and records are dealt round-robin to
processes, so each example goes to exactly one process; every process then
pads to the same number of batches (``mask`` 0 on padding) so hosts stay in
lock-step.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from mic_jax.data import preprocess
from mic_jax.data import records

AUTOTUNE = tf.data.AUTOTUNE
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a prepared directory holds (from ``dataset_info.json``)."""
  data_dir: str
  labels: tuple[str, ...]
  max_length: int
  shards: dict[str, list[dict[str, Any]]]
  taxonomy: dict[str, Any] | None = None

  @classmethod
  def load(cls, data_dir: str) -> DatasetInfo:
    """Raises FileNotFoundError when ``data_dir`` is not a prepared set."""
    path = pathlib.Path(data_dir)
    info_file = path / records.INFO_FILE
    if not info_file.exists():
      raise FileNotFoundError(f"{info_file} not found")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    labels = tuple((path / records.LABELS_FILE).read_text(
        encoding="utf-8").splitlines())
    taxonomy = None
    if info.get("taxonomy_file"):
      taxonomy = json.loads((path / info["taxonomy_file"]).read_text(
          encoding="utf-8"))
    return cls(str(path), labels, int(info["max_length"]), info["shards"],
               taxonomy)

  @property
  def num_classes(self) -> int:
    return len(self.labels)

  def has_split(self, split: str) -> bool:
    return self.split_size(split) > 0

  def split_size(self, split: str) -> int:
    return sum(s["examples"] for s in self.shards.get(split, []))

  def class_counts(self, split: str) -> np.ndarray:
    """Examples per class in ``split`` (int64 ``[num_classes]``)."""
    total = np.zeros(self.num_classes, np.int64)
    for shard in self.shards.get(split, []):
      total += np.asarray(shard["class_counts"], np.int64)
    return total

  def files(self, split: str) -> list[str]:
    return [str(pathlib.Path(self.data_dir) / s["file"])
            for s in self.shards.get(split, [])]


def _process(process_index: int | None, process_count: int | None
             ) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} not in [0, {count})")
  return index, count


def _parse(max_length: int):
  spec = records.feature_spec(max_length)

  def parse(serialized):
    return tf.io.parse_single_example(serialized, spec)
  return parse


def _to_batch_features(ex: dict[str, tf.Tensor], image: tf.Tensor | None,
                       mask: tf.Tensor) -> dict[str, tf.Tensor]:
  """The trainer's batch contract; ``image=None`` gives ``image_key`` instead.

  ``image_key`` (int64) names the photo by content (see
  :func:`preprocess.photo_key`) for models that read cached image-tower
  outputs instead of pixels; such streams skip JPEG decoding altogether.
  """
  features = {
      "input_ids": tf.cast(ex["input_ids"], tf.int32),
      "attention_mask": tf.cast(ex["attention_mask"], tf.int32),
      "token_type_ids": tf.cast(ex["token_type_ids"], tf.int32),
      "image_present": tf.cast(ex["image/present"], tf.int32),
      "label": tf.cast(ex["label"], tf.int32),
      "mask": mask,
  }
  if image is None:
    features["image_key"] = preprocess.photo_key(ex["image/encoded"],
                                                 ex["image/present"])
  else:
    features["image"] = image
  return features


def _host_train_files(info: DatasetInfo, index: int, count: int
                      ) -> tuple[list[str], int, bool]:
  """This host's files, its examples per epoch, and whether to shard records.

  Files are dealt to hosts when there are at least as many as hosts;
  otherwise every host reads all files and keeps every count-th record.
  """
  shards = info.shards.get("train", [])
  if not shards:
    raise ValueError(f"{info.data_dir} has no train split")
  files = info.files("train")
  if len(files) >= count:
    mine = list(range(index, len(files), count))
    return [files[i] for i in mine], sum(shards[i]["examples"]
                                         for i in mine), False
  total = info.split_size("train")
  return files, len(range(index, total, count)), True


def _epoch_records(files: list[str], epoch: tf.Tensor, seed: int,
                   shuffle_buffer: int, shard: tuple[int, int] | None
                   ) -> tf.data.Dataset:
  """The raw records of one epoch in their (seeded) shuffled order."""
  epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
  order = tf.random.experimental.stateless_shuffle(
      tf.constant(files), seed=epoch_seed)
  ds = tf.data.Dataset.from_tensor_slices(order)
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                     block_length=1, num_parallel_calls=AUTOTUNE,
                     deterministic=True)
  if shard is not None:
    # Every host must see the same file order before dealing records.
    ds = ds.shard(shard[1], shard[0])
  if shuffle_buffer > 1:
    ds = ds.shuffle(shuffle_buffer, seed=epoch * 1_000_003 + seed,
                    reshuffle_each_iteration=False)
  return ds


def train_batches(data_dir: str, *, batch_size: int, image_size: int,
                  seed: int, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  shuffle_buffer: int = 10_000,
                  image_keys: bool = False) -> Iterator[Batch]:
  """Endless training batches for this host, resumable at ``start_step``.

  Args:
    data_dir: a prepared directory (see :mod:`mic_jax.data.records`).
    batch_size: examples per batch on this host.
    image_size: output image height = width.
    seed: the stream (file order, shuffle, augmentation) is a function of it.
    start_step: yield exactly what an uninterrupted stream yields from here.
    process_index, process_count: default to JAX's; pass them to simulate.
    shuffle_buffer: example shuffle buffer (per host).
    image_keys: yield ``image_key`` (the photo's content key) instead of
      decoded, augmented pixels, for a frozen image tower whose outputs are
      cached (:mod:`mic_jax.train.image_features`).

  Yields:
    The batch dict of the trainer contract (``mask`` all ones).
  """
  index, count = _process(process_index, process_count)
  info = DatasetInfo.load(data_dir)
  files, per_epoch, record_shard = _host_train_files(info, index, count)
  if per_epoch == 0:
    raise ValueError(f"host {index} of {count} has no training examples")
  # Hosts with different seeds would sample the same augmentation noise
  # pattern otherwise; the host index is part of the stream's identity.
  host_seed = seed * 7919 + index
  first = start_step * batch_size
  first_epoch, offset = divmod(first, per_epoch)
  shard = (index, count) if record_shard else None

  def epoch_ds(epoch):
    ds = _epoch_records(files, epoch, host_seed, shuffle_buffer, shard)
    return ds.skip(tf.where(epoch == first_epoch, tf.constant(offset, tf.int64),
                            tf.constant(0, tf.int64)))

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
  ds = ds.flat_map(epoch_ds)
  ds = ds.enumerate(start=first)
  parse = _parse(info.max_length)

  def decode(position, serialized):
    ex = parse(serialized)
    if image_keys:
      return _to_batch_features(ex, None, tf.constant(1.0))
    image_seed = tf.stack([tf.constant(host_seed, tf.int64), position])
    image = preprocess.train_image(ex["image/encoded"], ex["image/present"],
                                   image_size, image_seed)
    return _to_batch_features(ex, image, tf.constant(1.0))

  ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  ds = ds.with_options(options)
  yield from ds.as_numpy_iterator()


def eval_batches(data_dir: str, split: str, *, batch_size: int,
                 image_size: int, process_index: int | None = None,
                 process_count: int | None = None,
                 image_keys: bool = False) -> Iterator[Batch]:
  """Every example of ``split`` exactly once across processes, padded.

  All processes yield the same number of batches,
  ``ceil(ceil(N / process_count) / batch_size)``; padding rows have
  ``mask`` 0 (and zero features, label 0; with ``image_keys``, the key of
  "no photo"). ``image_keys`` is as in :func:`train_batches`.
  """
  index, count = _process(process_index, process_count)
  info = DatasetInfo.load(data_dir)
  files = info.files(split)
  total = info.split_size(split)
  if total == 0:
    return
  num_batches = -(-(-(-total // count)) // batch_size)
  parse = _parse(info.max_length)

  def decode(serialized):
    ex = parse(serialized)
    if image_keys:
      return _to_batch_features(ex, None, tf.constant(1.0))
    image = preprocess.eval_image(ex["image/encoded"], ex["image/present"],
                                  image_size)
    return _to_batch_features(ex, image, tf.constant(1.0))

  ds = tf.data.TFRecordDataset(files, num_parallel_reads=None)
  ds = ds.shard(count, index)
  ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
  length = info.max_length
  pad = {
      "input_ids": tf.zeros([length], tf.int32),
      "attention_mask": tf.zeros([length], tf.int32),
      "token_type_ids": tf.zeros([length], tf.int32),
      "image_present": tf.constant(0, tf.int32),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0),
  }
  if image_keys:
    pad["image_key"] = preprocess.photo_key(tf.constant(b""),
                                            tf.constant(0, tf.int64))
  else:
    pad["image"] = tf.zeros([image_size, image_size, 3])
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * batch_size).batch(batch_size)
  yield from ds.prefetch(AUTOTUNE).as_numpy_iterator()
