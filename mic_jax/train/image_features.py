"""Outputs of a frozen image tower, computed once and reused.

A pretrained image tower that is not fine-tuned (``optim.freeze`` covers
every ``img/`` parameter) computes the same tokens for a photo in every
epoch and in every run that shares it. On a CPU that forward pass is most
of a step's cost, so here it runs once per photo and its output is kept on
disk; the train and eval streams then carry a photo's content key
(``image_key``, :func:`mic_jax.data.preprocess.photo_key`) instead of
pixels, and the model reads ``image_tokens`` instead of running the tower
(:class:`mic_jax.models.classifier.MultimodalClassifier`).

What changes against running the tower: training photos are not augmented
(every epoch sees the eval transform of the photo), which for a frozen
tower is the usual linear-probe / feature-extraction practice. The tokens
are exactly the tower's eval-mode output in float32, so evaluation is
unchanged (tested).

A cache is keyed by the tower's weights (a hash of every parameter), its
config, the image size and the prepared data (``dataset_info.json`` and
shard sizes), so changing any of them builds a new one; a cache is written
to a temporary directory and renamed into place when complete, so a killed
build is never read. Each host builds its own (hosts may not share a disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mic_jax.data import pipeline
from mic_jax.data import preprocess
from mic_jax.data import records
from mic_jax.train import optimizer

FORMAT_VERSION = 1
_KEYS, _TOKENS, _META = "keys.npy", "tokens.npy", "cache.json"


def default_root() -> pathlib.Path:
  """``$MIC_JAX_CACHE/image_features``, else ``~/.cache/mic_jax/...``."""
  base = os.environ.get("MIC_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mic_jax")
  return pathlib.Path(base) / "image_features"


def tower_is_frozen(config: ml_collections.ConfigDict,
                    abstract_params: dict[str, Any]) -> bool:
  """True when ``optim.freeze`` covers every parameter of the ``img`` tower."""
  if "img" not in abstract_params or not config.optim.freeze:
    return False
  labels, _ = optimizer.group_labels({"img": abstract_params["img"]},
                                     config.optim)
  return all(l == optimizer.FROZEN for l in jax.tree.leaves(labels))


def wanted(config: ml_collections.ConfigDict,
           abstract_params: dict[str, Any]) -> bool:
  """Whether a run reads cached image tokens instead of running its tower."""
  return bool(config.image.get("cache_features", True)) and tower_is_frozen(
      config, abstract_params)


def cache_key(img_params: Any, tower: nn.Module, image_size: int,
              data_dir: str) -> str:
  """Hex digest naming one (weights, tower config, size, data) combination."""
  digest = hashlib.sha256()
  digest.update(f"v{FORMAT_VERSION} size={image_size} tower={tower!r}".encode())
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(img_params))[0]
  for path, leaf in flat:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  data = pathlib.Path(data_dir)
  digest.update((data / records.INFO_FILE).read_bytes())
  info = pipeline.DatasetInfo.load(data_dir)
  for split in sorted(info.shards):
    for name in info.files(split):
      digest.update(f"{os.path.basename(name)}:{os.path.getsize(name)}".encode())
  return digest.hexdigest()


class ImageFeatureCache:
  """Image-tower tokens ``[K, T, D]`` (float32) looked up by photo key."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    keys = np.load(directory / _KEYS)
    self.tokens = np.load(directory / _TOKENS, mmap_mode="r")
    if len(keys) > len(self.tokens):
      raise ValueError(f"{directory}: {len(keys)} keys but only "
                       f"{len(self.tokens)} token rows")
    self._order = np.argsort(keys, kind="stable")
    self.keys = keys[self._order]
    self.no_photo = preprocess.no_photo_key()

  def lookup(self, keys: np.ndarray) -> np.ndarray:
    """Tokens of each key (``[B, T, D]``); an unknown key is an error."""
    keys = np.asarray(keys, np.int64)
    rows = np.searchsorted(self.keys, keys)
    rows = np.minimum(rows, len(self.keys) - 1)
    missing = self.keys[rows] != keys
    if missing.any():
      raise KeyError(f"{int(missing.sum())} photos are not in the image "
                     f"feature cache {self.directory} (first key "
                     f"{int(keys[missing][0])}); the cache is keyed by the "
                     "data, so this means the data changed while in use")
    # Sorted, unique row reads are much faster from a memory map.
    unique, inverse = np.unique(self._order[rows], return_inverse=True)
    return np.asarray(self.tokens[unique])[inverse]

  def attach(self, batches: Iterable[dict[str, np.ndarray]],
             *, withhold: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Replaces each batch's ``image_key`` by ``image_tokens``.

    ``withhold`` scores every product as one without a photo (the tokens of
    the empty image, ``image_present = 0``), as the pixel path does.
    """
    for batch in batches:
      batch = dict(batch)
      keys = batch.pop("image_key")
      if withhold:
        keys = np.full_like(keys, self.no_photo)
        batch["image_present"] = np.zeros_like(batch["image_present"])
      batch["image_tokens"] = self.lookup(keys)
      yield batch


def _unique_photos(data_dir: str, image_size: int, batch_size: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(keys, eval pixels) of every distinct photo of every split, in batches.

  The empty image (products without a photo) is always included: withheld
  photos are scored with it.
  """
  info = pipeline.DatasetInfo.load(data_dir)
  seen = {preprocess.no_photo_key()}
  yield (np.array([preprocess.no_photo_key()], np.int64),
         np.zeros((1, image_size, image_size, 3), np.float32))
  for split in records.SPLITS:
    if not info.has_split(split):
      continue
    for keyed, pixels in zip(
        pipeline.eval_batches(data_dir, split, batch_size=batch_size,
                              image_size=image_size, process_index=0,
                              process_count=1, image_keys=True),
        pipeline.eval_batches(data_dir, split, batch_size=batch_size,
                              image_size=image_size, process_index=0,
                              process_count=1)):
      new = []  # Rows with a photo not seen before (also in this batch).
      for i, key in enumerate(keyed["image_key"].tolist()):
        if keyed["mask"][i] > 0 and key not in seen:
          seen.add(key)
          new.append(i)
      if new:
        yield keyed["image_key"][new], pixels["image"][new]


def _count_photos(data_dir: str) -> int:
  info = pipeline.DatasetInfo.load(data_dir)
  return sum(info.split_size(s) for s in records.SPLITS)


def build(directory: pathlib.Path, tower: nn.Module, img_params: Any,
          data_dir: str, image_size: int, *, batch_size: int = 64) -> None:
  """Runs ``tower`` over every distinct photo and writes the cache.

  Written to a temporary sibling directory and renamed when complete.
  """
  apply = jax.jit(lambda p, x: tower.apply({"params": p}, x, train=False))
  params = jax.device_get(img_params)
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.",
                                      dir=directory.parent))
  total = _count_photos(data_dir) + 1
  try:
    keys, rows, token_file = [], 0, None
    start, last = time.monotonic(), 0.0
    for batch_keys, pixels in _unique_photos(data_dir, image_size,
                                             batch_size):
      n = len(batch_keys)
      padded = np.zeros((batch_size, *pixels.shape[1:]), np.float32)
      padded[:n] = pixels  # One compiled shape.
      tokens = np.asarray(apply(params, padded))[:n].astype(np.float32)
      if token_file is None:
        token_file = np.lib.format.open_memmap(
            tmp / _TOKENS, mode="w+", dtype=np.float32,
            shape=(total, *tokens.shape[1:]))
      token_file[rows:rows + n] = tokens
      keys.append(batch_keys)
      rows += n
      now = time.monotonic()
      if now - last > 30:
        last = now
        rate = rows / max(now - start, 1e-9)
        logging.info("image features: %d photos done (at most %d), %.1f/s",
                     rows, total, rate)
    token_file.flush()
    del token_file
    keys = np.concatenate(keys)
    # Row i of tokens.npy belongs to keys[i]; rows past len(keys) are unused.
    np.save(tmp / _KEYS, keys)
    (tmp / _META).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "photos": rows,
        "image_size": image_size, "data_dir": os.path.abspath(data_dir),
        "tower": repr(tower), "seconds": round(time.monotonic() - start, 1)},
        indent=1))
    try:
      os.replace(tmp, directory)
    except OSError:
      if not (directory / _META).exists():
        raise
      shutil.rmtree(tmp)  # Another process finished the same cache first.
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("image features: cached %d photos in %s (%.0f s)", rows,
               directory, time.monotonic() - start)


def ensure(config: ml_collections.ConfigDict, tower: nn.Module,
           img_params: Any, data_dir: str) -> ImageFeatureCache:
  """The cache of this run's frozen tower, built first if it is missing."""
  root = pathlib.Path(config.image.get("feature_cache_dir") or default_root())
  size = int(config.image.size)
  directory = root / cache_key(img_params, tower, size, data_dir)[:24]
  if not (directory / _META).exists():
    logging.info("image features: computing the frozen image tower's "
                 "outputs once for every photo -> %s", directory)
    build(directory, tower, img_params, data_dir, size)
  else:
    logging.info("image features: reusing %s", directory)
  return ImageFeatureCache(directory)
