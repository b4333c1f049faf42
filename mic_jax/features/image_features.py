"""Outputs of a frozen image tower, computed once and reused.

A pretrained image tower that is not fine-tuned (``optim.freeze`` covers
every ``img/`` parameter) computes the same tokens for a photo in every
epoch and in every run that shares it. On a CPU that forward pass is most
of a step's cost, so here it runs once per photo and its output is kept on
disk; the train and eval streams then carry a photo's content key
(``image_key``, :func:`mic_jax.data.preprocess.photo_key`) instead of
pixels, and the model reads ``image_tokens`` instead of running the tower
(:class:`mic_jax.models.classifier.MultimodalClassifier`).

``image.train_top_blocks = N`` fine-tunes the top N blocks of such a tower:
the cache then holds the hidden tokens entering block ``depth - N`` (keyed by
the frozen lower part's weights only), batches carry them as
``image_hidden``, and each step runs just the top N blocks and the final
LayerNorm on them. Export and serving run the whole tower on pixels.

What changes against running the tower: training photos are not augmented
(every epoch sees the eval transform of the photo), which for a frozen
tower is the usual linear-probe / feature-extraction practice. The tokens
are exactly the tower's eval-mode output in float32, so evaluation is
unchanged (tested).

Not used when the tower would train differently from its eval mode
(dropout > 0 in the tower: :func:`train_mode_differs`): cached eval-mode
tokens would silently drop the configured dropout, so such a run feeds
pixels and says why.

A cache is keyed by the tower's weights (a hash of every parameter), its
config, the image size and the prepared data (``dataset_info.json`` but for
the tokenizer's path, and shard sizes), so changing any of them builds a new
one. Its files, key,
atomic writes, checks on open and the sweep of killed builds live in
:mod:`mic_jax.features.feature_store`.

Across hosts (:class:`Hosts`): when every host sees the same cache root (a
``gs://``-style root, or ``image.feature_cache_shared=True`` for a shared
file system), host i of N computes only its share and publishes it as its
own shard (``<key>.<i>-of-<N>``), then waits for the others' shards and
reads all of them. The share is every N-th *batch* of the single-process
build (the distinct photos enumerated in the same order, cut into the same
padded batches), so each photo goes through the same compiled program with
the same batch as on one host: the rows equal the single-process cache
bit for bit. A host killed mid-build and rerun rebuilds only its shard (the
others are complete and reused). On separate local disks (the default root,
``~/.cache``) each host builds the whole cache itself, as it must.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from configs import common
from mic_jax.data import pipeline
from mic_jax.data import preprocess
from mic_jax.data import records
from mic_jax.evaluation import reporting
from mic_jax.features import feature_store
from mic_jax.train import optimizer

FORMAT_VERSION = 1


def default_root() -> str:
  """``$MIC_JAX_CACHE/image_features``, else ``~/.cache/mic_jax/...``.

  ``$MIC_JAX_CACHE`` may be a ``gs://`` path (read via a local copy).
  """
  base = os.environ.get("MIC_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mic_jax")
  return feature_store.join(base, "image_features")


def top_blocks(config: ml_collections.ConfigDict) -> int:
  """``image.train_top_blocks``: top ViT blocks trained above the cache."""
  return int(config.image.get("train_top_blocks", 0) or 0)


def top_block_pattern(tower: nn.Module, count: int) -> str:
  """Regex of the parameters of ``tower``'s top ``count`` blocks and norm."""
  depth = int(tower.config.depth)
  blocks = "|".join(str(i) for i in range(depth - count, depth))
  return f"img/Transformer/(encoderblock_({blocks})|encoder_norm)/"


def resolve_top_blocks(config: ml_collections.ConfigDict,
                       tower: nn.Module | None) -> ml_collections.ConfigDict:
  """``config`` with ``optim.unfreeze`` covering the top blocks to train.

  ``image.train_top_blocks = N`` keeps the top N blocks (and the final
  LayerNorm) of a frozen pretrained ViT training; the rest stays frozen and
  its output is what the feature cache holds; N equal to the depth trains
  the whole tower from pixels. Raises when that cannot hold: no frozen
  ViT, a scanned stack, N above the depth. Resolving twice changes nothing.
  """
  count = top_blocks(config)
  if count == 0:
    return config
  from mic_jax.models import vit  # pylint: disable=g-import-not-at-top
  where = f"image.train_top_blocks={count}"
  if not isinstance(tower, vit.VisionTransformer):
    raise ValueError(f"{where} needs a ViT photo tower (got "
                     f"{type(tower).__name__})")
  if tower.config.scan_layers:
    raise ValueError(f"{where}: a scanned ViT (model.scan_layers) trains all "
                     "its blocks or none")
  if not 0 < count <= tower.config.depth:
    raise ValueError(f"{where}: the tower has {tower.config.depth} blocks")
  if not common.freezes_image_tower(config):
    raise ValueError(f"{where} trains the top of a frozen photo tower: set "
                     "image.freeze_pretrained=True (or optim.freeze=img)")
  # All blocks: the whole tower trains, embeddings included, from pixels
  # (nothing is left frozen to cache).
  pattern = ("img/" if count == tower.config.depth
             else top_block_pattern(tower, count))
  patterns = [p for p in str(config.optim.unfreeze).split("|") if p]
  config = config.copy_and_resolve_references()
  if pattern not in str(config.optim.unfreeze):
    with config.unlocked():
      config.optim.unfreeze = "|".join(patterns + [pattern]) if patterns \
          else pattern
  return config


def frozen_part(img_params: Any, depth: int | None) -> Any:
  """The parameters the cached tokens depend on: all of them, or those of
  the embedding and the first ``depth`` blocks (so the cache's key does not
  change while the top blocks train, nor on resuming a run)."""
  if depth is None:
    return img_params
  def below(name: str) -> bool:
    if name == "encoder_norm":
      return False
    return not (name.startswith("encoderblock_") and
                int(name.rsplit("_", 1)[1]) >= depth)
  params = dict(img_params)
  params["Transformer"] = {k: v for k, v in params["Transformer"].items()
                           if below(k)}
  return params


def cached_depth(config: ml_collections.ConfigDict,
                 tower: nn.Module) -> int | None:
  """How many blocks the cache computes: None for the whole tower's output,
  else the frozen lower blocks below ``image.train_top_blocks``."""
  count = top_blocks(config)
  return int(tower.config.depth) - count if count else None


def tower_is_frozen(config: ml_collections.ConfigDict,
                    abstract_params: dict[str, Any]) -> bool:
  """True when ``optim.freeze`` covers every parameter of the ``img`` tower
  (but for the top blocks ``image.train_top_blocks`` trains, which must
  then all train)."""
  if "img" not in abstract_params or not config.optim.freeze:
    return False
  img = {"img": abstract_params["img"]}
  labels, _ = optimizer.group_labels(img, config.optim)
  frozen = {path: label == optimizer.FROZEN for path, label in zip(
      jax.tree.leaves(optimizer.tree_paths(img)), jax.tree.leaves(labels))}
  if not top_blocks(config):
    return all(frozen.values())
  top = re.compile(str(config.optim.unfreeze))
  # All blocks trained (train_top_blocks = depth): nothing below to cache.
  return any(frozen.values()) and all(
      frozen[p] != bool(top.match(p)) for p in frozen)


def train_mode_differs(tower: nn.Module) -> str | None:
  """Why ``tower(train=True)`` differs from its eval mode, or None.

  A tower config's ``*dropout*`` rates (ViT's ``dropout`` from
  ``image.dropout``, a checkpoint's ``attention_dropout``) act only in
  training; BiT has none.
  """
  config = getattr(tower, "config", None)
  if config is None or not dataclasses.is_dataclass(config):
    return None
  rates = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
           if "dropout" in f.name}
  active = {k: v for k, v in rates.items() if v}
  if not active:
    return None
  return ("the image tower trains with " + ", ".join(
      f"{k}={v:g}" for k, v in sorted(active.items())))


def wanted(config: ml_collections.ConfigDict,
           abstract_params: dict[str, Any],
           tower: nn.Module | None = None) -> bool:
  """Whether a run reads cached image tokens instead of running its tower.

  Also False (with a warning) when ``tower`` has dropout: eval-mode tokens
  would change training.
  """
  if not (bool(config.image.get("cache_features", True))
          and tower_is_frozen(config, abstract_params)):
    return False
  why = train_mode_differs(tower) if tower is not None else None
  if why:
    logging.warning(
        "image features: not caching the frozen image tower's outputs: %s, "
        "and cached tokens are its eval-mode output (no dropout). The tower "
        "runs on pixels every step instead; set image.dropout=0 (and no "
        "attention dropout) to use the cache.", why)
    return False
  return True


def cache_key(img_params: Any, tower: nn.Module, image_size: int,
              data_dir: str, depth: int | None = None,
              row_dtype: str = "float32",
              info: pipeline.DatasetInfo | None = None) -> str:
  """Hex digest naming one (weights, tower config, size, data, ``depth``:
  the blocks computed, None for the whole tower, and the stored row dtype)
  combination. ``info``: ``data_dir``'s, when the caller has it."""
  stop = "" if depth is None else f" blocks={depth}"
  # float32 adds nothing, so the caches built before the choice existed
  # keep their names.
  kept = "" if row_dtype == "float32" else f" rows={row_dtype}"
  return feature_store.key(
      f"v{FORMAT_VERSION} size={image_size} tower={tower!r}{stop}{kept}",
      img_params, data_dir, info)


def row_dtype(config: ml_collections.ConfigDict) -> str:
  """``image.feature_cache_dtype``, checked: how the cache keeps its rows."""
  return feature_store.check_row_dtype(
      str(config.image.get("feature_cache_dtype", "float32") or "float32"))


TOKENS = "image_tokens"   # The batch key of a whole tower's output,
HIDDEN = "image_hidden"   # ... and of the tokens entering its top blocks.


class ImageFeatureCache:
  """Image-tower tokens ``[K, T, D]`` (float32) looked up by photo key.

  ``batch_key`` is what :meth:`attach` calls them in a batch:
  :data:`TOKENS` for the tower's output, :data:`HIDDEN` for the hidden
  tokens below the top blocks that ``image.train_top_blocks`` trains.
  """

  def __init__(self, directory: str | os.PathLike[str] | Sequence[str],
               batch_key: str = TOKENS):
    """Opens a cache that :func:`feature_store.problem` found complete, or
    the shards of one (a list of directories: their rows read as one)."""
    self.directory = directory
    self.batch_key = batch_key
    parts = ([directory] if isinstance(directory, (str, os.PathLike))
             else list(directory))
    self.row_dtypes, self.shard_tokens = [], []
    keys, shard, row = [], [], []
    for i, part in enumerate(parts):
      local = feature_store.local_copy(os.fspath(part), FORMAT_VERSION)
      self.row_dtypes.append(feature_store.row_dtype_of(local))
      part_keys = np.load(local / feature_store.KEYS)
      tokens = np.load(local / feature_store.ROWS, mmap_mode="r")
      if len(part_keys) > len(tokens):
        raise ValueError(f"{part}: {len(part_keys)} keys but only "
                         f"{len(tokens)} token rows")
      self.shard_tokens.append(tokens)
      keys.append(part_keys)
      shard.append(np.full(len(part_keys), i, np.int32))
      row.append(np.arange(len(part_keys), dtype=np.int64))
    keys = np.concatenate(keys)
    order = np.argsort(keys, kind="stable")
    self.keys = keys[order]
    self._shard = np.concatenate(shard)[order]
    self._row = np.concatenate(row)[order]
    self.row_dtype = self.row_dtypes[0]
    self.tokens = self.shard_tokens[0]
    self.no_photo = preprocess.no_photo_key()

  def lookup(self, keys: np.ndarray) -> np.ndarray:
    """Tokens of each key (``[B, T, D]``; ``[R, S, T, D]`` for a packed
    batch's ``[R, S]`` keys); an unknown key is an error."""
    keys = np.asarray(keys, np.int64)
    if keys.ndim != 1:
      flat = self.lookup(keys.reshape(-1))
      return flat.reshape(*keys.shape, *flat.shape[1:])
    rows = np.searchsorted(self.keys, keys)
    rows = np.minimum(rows, len(self.keys) - 1)
    missing = self.keys[rows] != keys
    if missing.any():
      raise KeyError(f"{int(missing.sum())} photos are not in the image "
                     f"feature cache {self.directory} (first key "
                     f"{int(keys[missing][0])}); the cache is keyed by the "
                     "data, so this means the data changed while in use")
    shards, rows = self._shard[rows], self._row[rows]
    if len(self.shard_tokens) == 1:
      return self._read(0, rows)
    out = np.empty((len(keys), *self.tokens.shape[1:]), np.float32)
    for i in np.unique(shards).tolist():
      here = shards == i
      out[here] = self._read(i, rows[here])
    return out

  def _read(self, shard: int, rows: np.ndarray) -> np.ndarray:
    """Rows of one shard as float32; sorted, unique row reads are much
    faster from a memory map."""
    unique, inverse = np.unique(rows, return_inverse=True)
    return feature_store.from_stored(self.shard_tokens[shard][unique],
                                     self.row_dtypes[shard])[inverse]

  def attach(self, batches: Iterable[dict[str, np.ndarray]],
             *, withhold: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Replaces each batch's ``image_key`` by the tokens (``batch_key``).

    ``withhold`` scores every product as one without a photo (the tokens of
    the empty image, ``image_present = 0``), as the pixel path does.
    """
    for batch in batches:
      batch = dict(batch)
      keys = batch.pop("image_key")
      if withhold:
        keys = np.full_like(keys, self.no_photo)
        batch["image_present"] = np.zeros_like(batch["image_present"])
      batch[self.batch_key] = self.lookup(keys)
      yield batch


def _unique_photos(data_dir: str, image_size: int, batch_size: int,
                   info: pipeline.DatasetInfo | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(keys, eval pixels) of every distinct photo of every split, in batches.

  The empty image (products without a photo) is always included: withheld
  photos are scored with it.
  """
  if info is None:
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
                              process_count=1, image_keys=True, info=info),
        pipeline.eval_batches(data_dir, split, batch_size=batch_size,
                              image_size=image_size, process_index=0,
                              process_count=1, info=info)):
      new = []  # Rows with a photo not seen before (also in this batch).
      for i, key in enumerate(keyed["image_key"].tolist()):
        if keyed["mask"][i] > 0 and key not in seen:
          seen.add(key)
          new.append(i)
      if new:
        yield keyed["image_key"][new], pixels["image"][new]


def _count_photos(data_dir: str,
                  info: pipeline.DatasetInfo | None = None) -> int:
  if info is None:
    info = pipeline.DatasetInfo.load(data_dir)
  return sum(info.split_size(s) for s in records.SPLITS)


def build(directory: str | os.PathLike[str], tower: nn.Module,
          img_params: Any, data_dir: str, image_size: int, *,
          batch_size: int = 64, depth: int | None = None,
          row_dtype: str = "float32", share: Hosts | None = None,
          info: pipeline.DatasetInfo | None = None) -> None:
  """Runs ``tower`` over every distinct photo and writes the cache.

  ``depth``: only the first ``depth`` blocks (their hidden tokens are
  cached); None: the whole tower. ``row_dtype``: how the rows are kept
  (:data:`feature_store.ROW_DTYPES`). ``share``: only the batches of host
  ``share.index`` of ``share.count`` (every count-th batch of the whole
  build, so each row is computed exactly as the whole build computes it).
  Written as :class:`feature_store.Writer` does (complete or absent, also
  on SIGTERM). ``info``: ``data_dir``'s, when the caller has it.
  """
  share = share or Hosts()
  kwargs = {} if depth is None else {"stop_block": depth}
  apply = jax.jit(lambda p, x: tower.apply({"params": p}, x, train=False,
                                           **kwargs))
  params = jax.device_get(img_params)
  directory = os.fspath(directory)
  total = _count_photos(data_dir, info) + 1
  with feature_store.Writer(directory, total, feature_store.mirror_root(),
                            row_dtype) as writer:
    last = 0.0
    for index, (batch_keys, pixels) in enumerate(_unique_photos(
        data_dir, image_size, batch_size, info)):
      if index % share.count != share.index:
        continue  # Another host's batch.
      n = len(batch_keys)
      padded = np.zeros((batch_size, *pixels.shape[1:]), np.float32)
      padded[:n] = pixels  # One compiled shape.
      tokens = np.asarray(apply(params, padded))[:n].astype(np.float32)
      writer.add(batch_keys, tokens)
      now = time.monotonic()
      if now - last > 30:
        last = now
        rate = writer.count / max(now - writer.started, 1e-9)
        logging.info("image features: %d photos done (at most %d), %.1f/s",
                     writer.count, total, rate)
    if writer.count == 0:  # More hosts than batches: an empty shard.
      shape = jax.eval_shape(apply, params, jax.ShapeDtypeStruct(
          (1, image_size, image_size, 3), np.float32)).shape
      writer.add(np.zeros(0, np.int64), np.zeros((0, *shape[1:]), np.float32))
    # Row i of tokens.npy belongs to keys[i]; rows past len(keys) are unused.
    writer.commit({"shard": share.index, "shards": share.count,
                   "batch_size": batch_size, "image_size": image_size,
                   "data_dir": os.path.abspath(data_dir)
                   if not reporting.is_remote(data_dir) else data_dir,
                   "tower": repr(tower), "blocks": depth}, FORMAT_VERSION)
    logging.info("image features: cached %d photos in %s (%.0f s)",
                 writer.count, directory, time.monotonic() - writer.started)


@dataclasses.dataclass(frozen=True)
class Hosts:
  """Which share of a cache build this process computes: host ``index`` of
  ``count`` (count 1: the whole cache)."""
  index: int = 0
  count: int = 1


def shared_root(config: ml_collections.ConfigDict, root: str) -> bool:
  """Whether every host sees the same cache ``root``.

  ``image.feature_cache_shared``: True or False says so; unset (None or
  "auto") means yes for ``gs://``-style roots only, since a local path
  (``~/.cache`` by default) is usually each host's own disk, where waiting
  for the other hosts' shards would only time out.
  """
  value = config.image.get("feature_cache_shared", None)
  if value is None or value == "auto":
    return reporting.is_remote(root)
  if isinstance(value, str):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"image.feature_cache_shared={value!r}: use True, "
                       "False or auto")
    return value.lower() in ("true", "1")
  return bool(value)


def hosts_of_run(config: ml_collections.ConfigDict, root: str) -> Hosts:
  """This process's share: its JAX process index of the count, when the
  root is shared (:func:`shared_root`), else the whole cache."""
  count = jax.process_count()
  if count > 1 and shared_root(config, root):
    return Hosts(jax.process_index(), count)
  if count > 1:
    logging.info("image features: the cache root %s is not shared by the %d "
                 "hosts (set image.feature_cache_shared=True if it is), so "
                 "this host builds the whole cache", root, count)
  return Hosts()


WAIT_SECONDS = 3600.0


def _check_same_split(shards: Sequence[str]) -> None:
  """Raises unless every shard was cut with the same batch size and host
  count: hosts that disagree would each skip photos the other took (or
  compute them twice), which only a lookup would reveal later."""
  seen = {}
  for path in shards:
    with tf.io.gfile.GFile(feature_store.join(path, feature_store.META)) as f:
      meta = json.load(f)
    seen[path] = (meta.get("batch_size"), meta.get("shards"))
  if len(set(seen.values())) > 1:
    raise ValueError(
        "image feature cache shards built with different (batch size, host "
        "count): " + ", ".join(f"{p}: {v}" for p, v in seen.items()) +
        "; run the same command (image.feature_cache_batch_size) on every "
        "host, after moving these shards away")


def ensure(config: ml_collections.ConfigDict, tower: nn.Module,
           img_params: Any, data_dir: str, hosts: Hosts | None = None,
           info: pipeline.DatasetInfo | None = None) -> ImageFeatureCache:
  """The cache of this run's frozen tower, built first if it is missing.

  Sweeps abandoned builds first; a cache that fails its checks on open (on
  a local disk also one that has lost its ``cache.json``) is moved aside
  with a warning and built again. ``hosts`` (default :func:`hosts_of_run`):
  with several, a complete whole cache or complete shards of any host count
  are reused; else this host builds its own shard unless it is already
  complete, then waits (``image.feature_cache_wait_seconds``) for the
  others' and reads them all. ``info``: ``data_dir``'s :class:`DatasetInfo`
  when the caller has read it (a run hands its own on).
  """
  root = os.fspath(config.image.get("feature_cache_dir") or default_root())
  size = int(config.image.size)
  depth = cached_depth(config, tower)
  batch_key = TOKENS if depth is None else HIDDEN
  feature_store.sweep(root)
  if reporting.is_remote(root):  # Its builds are staged on local disk.
    feature_store.sweep(str(feature_store.mirror_root()))
  kept = row_dtype(config)
  digest = cache_key(frozen_part(img_params, depth), tower, size, data_dir,
                     depth, kept, info)
  directory = feature_store.directory(root, digest)
  if feature_store.usable(directory, FORMAT_VERSION):
    logging.info("image features: reusing %s", directory)
    return ImageFeatureCache(directory, batch_key)
  shards = feature_store.complete_shards(root, digest, FORMAT_VERSION)
  if shards:
    logging.info("image features: reusing the %d shards %s", len(shards),
                 shards[0].rsplit(".", 1)[0] + ".*")
    return ImageFeatureCache(shards, batch_key)
  hosts = hosts or hosts_of_run(config, root)
  what = ("outputs" if depth is None else
          f"hidden tokens after block {depth} (the top "
          f"{top_blocks(config)} train)")
  batch_size = int(config.image.get("feature_cache_batch_size", None) or 64)
  if hosts.count == 1:
    logging.info("image features: computing the frozen image tower's %s "
                 "once for every photo -> %s", what, directory)
    build(directory, tower, img_params, data_dir, size, depth=depth,
          row_dtype=kept, batch_size=batch_size, info=info)
    return ImageFeatureCache(directory, batch_key)
  shards = [feature_store.shard_directory(root, digest, i, hosts.count)
            for i in range(hosts.count)]
  mine = shards[hosts.index]
  if feature_store.usable(mine, FORMAT_VERSION):
    logging.info("image features: reusing this host's shard %s", mine)
  else:
    logging.info("image features: computing the frozen image tower's %s for "
                 "this host's share (%d of %d) of the photos -> %s", what,
                 hosts.index, hosts.count, mine)
    build(mine, tower, img_params, data_dir, size, depth=depth,
          row_dtype=kept, share=hosts, batch_size=batch_size, info=info)
  wait = float(config.image.get("feature_cache_wait_seconds", None)
               or WAIT_SECONDS)
  feature_store.wait_for(shards, FORMAT_VERSION, wait)
  _check_same_split(shards)
  logging.info("image features: reading the %d hosts' shards", hosts.count)
  return ImageFeatureCache(shards, batch_key)
