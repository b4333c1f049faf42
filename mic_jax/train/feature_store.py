"""Where and how per-photo arrays are cached: keys, file layout, atomicity.

One place for everything a cache directory is on disk, so that a second
kind of cached output (say, an intermediate block of the photo tower)
reuses it with its own description string; :mod:`image_features` decides
what is computed, this module how it is kept. A cache is

  ROOT/<key[:24]>/keys.npy     int64 photo keys, one per row
                  tokens.npy   rows [R, ...]; row i is keys[i]'s: float32,
                               or bfloat16 kept as its 16 raw bits (uint16,
                               since .npy has no bfloat16): half the disk
                  cache.json   written last: its presence means complete;
                               ``row_dtype`` says which of the two

The key (:func:`key`) is a hash of a description (what is computed, by
which module config, at which size), every parameter, and the prepared
data, so a change of any of them names another directory.

Guarantees (docs/reliability.md lists them for the user):

* Complete or absent. A build writes into ``ROOT/.<name>.<host>.<pid>.<rand>``
  and renames it into place when complete (local disks); on an object store
  (``gs://`` and other ``scheme://`` roots, through ``tf.io.gfile``) the
  files are uploaded to the final directory with ``cache.json`` last.
* A kill leaves nothing that is read. SIGTERM during a build removes the
  temporary directory and exits (:class:`BuildInterrupted`); SIGKILL cannot
  be caught, so every :func:`sweep` (each start) removes temporary builds
  whose writer is gone (same host, process not running) or that have not
  shown a sign of life (``writer.json``, touched while building) for
  ``STALE_SECONDS``.
* Checked on open. :func:`problem` compares every file's size with its
  ``.npy`` header and ``cache.json``; a damaged cache, which on a local disk
  includes a directory without ``cache.json`` (:func:`usable`), is moved
  aside (``ROOT/.damaged-<name>-<time>``) with a warning naming it and built
  again.
* Shareable. Directories get the mode a plain ``mkdir`` would (umask
  applied), not ``mkdtemp``'s 0700, so a ``$MIC_JAX_CACHE`` shared by several
  users is readable by all of them. Two builders of the same key both
  build; the first to finish publishes and the other drops its copy (the
  contents are the same).
* Remote roots are read through a local copy (:func:`mirror_of`), since the
  rows are memory-mapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Any

from absl import logging
import jax
import ml_dtypes
import numpy as np
import tensorflow as tf

from mic_jax.data import pipeline
from mic_jax.data import records
from mic_jax.train import faults
from mic_jax.train import reporting

KEYS, ROWS, META, WRITER = "keys.npy", "tokens.npy", "cache.json", "writer.json"
NAME_LENGTH = 24
DAMAGED_PREFIX = ".damaged-"
# A temporary build that has not touched writer.json for this long is taken
# for dead even when its writer's liveness cannot be checked (another host).
STALE_SECONDS = 3600.0
HEARTBEAT_SECONDS = 30.0
# How rows may be kept: their name in cache.json -> tokens.npy's dtype.
ROW_DTYPES = {"float32": np.dtype(np.float32),
              "bfloat16": np.dtype(np.uint16)}
_TEMP_NAME = re.compile(r"\.[0-9a-f]{%d}(-[0-9a-f]{8})?\." % NAME_LENGTH)


class BuildInterrupted(SystemExit):
  """SIGTERM arrived during a build; its temporary files were removed."""


def join(root: str | os.PathLike[str], *parts: str) -> str:
  """``root/part/...`` that keeps ``gs://`` intact (pathlib would not)."""
  return "/".join([os.fspath(root).rstrip("/"), *parts])


# dataset_info.json fields left out of the key: where things lie, not what
# the photos are. ``tokenizer`` is the path data_prep read the tokenizer
# from; every copy of the same data (each demo row of mic_jax.reproduce
# prepares its own) records another one, which made each build its own
# cache. A tokenizer that differs in content changes the titles' tokens,
# so the shard sizes hashed below; the photos and their preprocessing
# (``photo_preprocessing``) stay in. Other fields (seed, corrections, label
# counts) cannot change a pixel either but are kept: they change which rows
# are in the set, and a needless rebuild is cheaper than a wrong reuse.
UNKEYED_INFO_FIELDS = ("tokenizer",)


def key(description: str, params: Any, data_dir: str) -> str:
  """Hex digest of (what is computed, its weights, the prepared data).

  The data is ``dataset_info.json`` but for :data:`UNKEYED_INFO_FIELDS`,
  and each shard's name and size.
  """
  digest = hashlib.sha256()
  digest.update(description.encode())
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  for path, leaf in flat:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  with tf.io.gfile.GFile(join(data_dir, records.INFO_FILE), "rb") as f:
    recorded = json.load(f)
  for field in UNKEYED_INFO_FIELDS:
    recorded.pop(field, None)
  digest.update(json.dumps(recorded, sort_keys=True).encode())
  info = pipeline.DatasetInfo.load(data_dir)
  for split in sorted(info.shards):
    for name in info.files(split):
      size = tf.io.gfile.stat(name).length
      digest.update(f"{os.path.basename(name)}:{size}".encode())
  return digest.hexdigest()


def check_row_dtype(name: str) -> str:
  """``name`` if rows can be kept so, else a ValueError naming the choices."""
  if name not in ROW_DTYPES:
    raise ValueError(f"feature cache row dtype {name!r}: use one of "
                     f"{', '.join(ROW_DTYPES)}")
  return name


def to_stored(rows: np.ndarray, row_dtype: str) -> np.ndarray:
  """``rows`` as kept on disk (bfloat16: rounded to nearest, its bits)."""
  if row_dtype == "bfloat16":
    return np.asarray(rows, np.float32).astype(ml_dtypes.bfloat16).view(
        np.uint16)
  return np.asarray(rows, np.float32)


def from_stored(rows: np.ndarray, row_dtype: str) -> np.ndarray:
  """Rows read from disk -> float32, what the model is fed."""
  if row_dtype == "bfloat16":
    return np.asarray(rows).view(ml_dtypes.bfloat16).astype(np.float32)
  return np.asarray(rows, np.float32)


def row_dtype_of(cache_dir: str | os.PathLike[str]) -> str:
  """The ``row_dtype`` a complete cache's ``cache.json`` records."""
  with tf.io.gfile.GFile(join(os.fspath(cache_dir), META)) as f:
    return str(json.load(f).get("row_dtype", "float32"))


def directory(root: str | os.PathLike[str], digest: str) -> str:
  """The cache directory of key ``digest`` under ``root``."""
  return join(root, digest[:NAME_LENGTH])


# ---------------------------------------------------------------- check --


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, expected file size) from a ``.npy`` file's header."""
  with tf.io.gfile.GFile(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(f)
    offset = f.tell()
  return tuple(shape), dtype, offset + int(np.prod(shape)) * dtype.itemsize


def problem(cache_dir: str, format_version: int) -> str | None:
  """Why ``cache_dir`` cannot be read, or None (complete and consistent).

  Checks what a truncated copy, a lost file or a half-upload breaks: the
  marker file, each array's size against its header, and the row counts.
  """
  try:
    if not tf.io.gfile.exists(join(cache_dir, META)):
      return f"{META} is missing"
    with tf.io.gfile.GFile(join(cache_dir, META)) as f:
      meta = json.load(f)
    if meta.get("format_version") != format_version:
      return (f"{META} has format_version {meta.get('format_version')}, "
              f"this code reads {format_version}")
    shapes = {}
    for name in (KEYS, ROWS):
      path = join(cache_dir, name)
      if not tf.io.gfile.exists(path):
        return f"{name} is missing"
      shape, dtype, size = _npy_header(path)
      have = tf.io.gfile.stat(path).length
      if have != size:
        return f"{name} has {have} bytes, its header ({shape}, {dtype}) needs {size}"
      shapes[name] = (shape, dtype)
    (key_shape, key_dtype), (row_shape, row_dtype) = shapes[KEYS], shapes[ROWS]
    stored = ROW_DTYPES.get(str(meta.get("row_dtype", "float32")))
    if stored is None:
      return f"{META} has an unknown row_dtype {meta.get('row_dtype')!r}"
    if len(key_shape) != 1 or key_dtype != np.int64 or row_dtype != stored:
      return (f"unexpected arrays: {KEYS} {key_shape} {key_dtype}, {ROWS} "
              f"{row_shape} {row_dtype}")
    if key_shape[0] != meta.get("photos") or row_shape[0] < key_shape[0]:
      return (f"{key_shape[0]} keys, {row_shape[0]} rows, {META} says "
              f"{meta.get('photos')} photos")
  except (ValueError, OSError, tf.errors.OpError, EOFError) as e:
    return f"{type(e).__name__}: {e}"
  return None


def quarantine(cache_dir: str, why: str) -> str:
  """Moves a damaged cache aside (kept for a look) and returns where to."""
  parent, name = cache_dir.rstrip("/").rsplit("/", 1)
  target = join(parent, f"{DAMAGED_PREFIX}{name}-{int(time.time())}-"
                f"{os.getpid()}")
  logging.warning("image feature cache %s is damaged (%s); moving it to %s "
                  "and building it again", cache_dir, why, target)
  try:
    tf.io.gfile.rename(cache_dir, target)
  except (tf.errors.OpError, OSError) as e:  # Object stores: delete it.
    if not tf.io.gfile.exists(cache_dir):  # Another process moved it first.
      return ""
    logging.warning("could not move %s (%s); deleting it", cache_dir, e)
    tf.io.gfile.rmtree(cache_dir)
    return ""
  return target


def usable(cache_dir: str, format_version: int) -> bool:
  """Whether a complete cache is at ``cache_dir``; a damaged one is moved
  aside (:func:`quarantine`), so that a build can take its place.

  On a local disk a directory without a complete ``cache.json`` is damaged:
  a build publishes by renaming a finished directory, so a build in
  progress never shows there, and an incomplete one (a lost file, a copy
  cut short) would otherwise be rebuilt on every run and block the rename.
  On an object store files are uploaded one by one with ``cache.json``
  last, so a directory without it may be another host's upload in
  progress: it is left alone and a build uploads over it.
  """
  if not tf.io.gfile.exists(cache_dir):
    return False
  if (reporting.is_remote(cache_dir)
      and not tf.io.gfile.exists(join(cache_dir, META))):
    return False
  why = problem(cache_dir, format_version)
  if why is None:
    return True
  quarantine(cache_dir, why)
  return False


# ---------------------------------------------------------- host shards --

# A cache built by N hosts is N sibling directories, each a complete cache
# of its own (same files, same atomic publish, same checks):
# ``ROOT/<key[:24]>.<i>-of-<N>`` holds the rows host i computed. The suffix
# starts with a dot, so a shard's temporary build (``.<name>.<i>-of-<N>.
# <host>.<pid>.<rand>``) still has the name :func:`sweep` looks for.
_SHARD_SUFFIX = re.compile(r"^\.(\d{5})-of-(\d{5})$")


def shard_directory(root: str | os.PathLike[str], digest: str, index: int,
                    count: int) -> str:
  """Where host ``index`` of ``count`` keeps its share of cache ``digest``."""
  if not 0 <= index < count:
    raise ValueError(f"shard {index} of {count}")
  return join(root, f"{digest[:NAME_LENGTH]}.{index:05d}-of-{count:05d}")


def shard_sets(root: str | os.PathLike[str], digest: str) -> list[int]:
  """Host counts N for which some ``<name>.<i>-of-<N>`` of ``digest`` is in
  ``root`` (complete or not), smallest first."""
  root = os.fspath(root)
  if not tf.io.gfile.isdir(root):
    return []
  name = digest[:NAME_LENGTH]
  counts = set()
  for entry in tf.io.gfile.listdir(root):
    entry = entry.rstrip("/")
    if entry.startswith(name):
      match = _SHARD_SUFFIX.match(entry[len(name):])
      if match:
        counts.add(int(match.group(2)))
  return sorted(counts)


def ready(cache_dir: str, format_version: int) -> bool:
  """Whether ``cache_dir`` is complete now; never moves anything (it may be
  another host's, still uploading)."""
  return (tf.io.gfile.exists(join(cache_dir, META))
          and problem(cache_dir, format_version) is None)


def complete_shards(root: str | os.PathLike[str], digest: str,
                    format_version: int) -> list[str] | None:
  """The shard directories of a complete N-host build of ``digest`` (any N),
  else None: lets a run on another host count reuse it."""
  for count in shard_sets(root, digest):
    shards = [shard_directory(root, digest, i, count) for i in range(count)]
    if all(ready(s, format_version) for s in shards):
      return shards
  return None


class ShardTimeout(TimeoutError):
  """Another host's shard did not appear in time."""


def wait_for(shards: list[str], format_version: int, timeout: float, *,
             poll: float = 2.0) -> None:
  """Returns when every shard is complete; else raises :class:`ShardTimeout`
  after ``timeout`` seconds naming the missing shards and their hosts.

  Polls the file system rather than a collective: a host that died (or
  never shared ``ROOT``) then gives a readable error instead of a hang, and
  a host restarted during the wait is simply waited for.
  """
  deadline = time.monotonic() + timeout
  pending = dict(enumerate(shards))
  while True:
    for i, path in list(pending.items()):
      if ready(path, format_version):
        del pending[i]
    if not pending:
      return
    if time.monotonic() >= deadline:
      lines = []
      for i, path in sorted(pending.items()):
        why = (problem(path, format_version) if tf.io.gfile.exists(path)
               else "not there")
        lines.append(f"shard {i} of {len(shards)} (built by process {i}): "
                     f"{path}: {why}")
      raise ShardTimeout(
          f"image feature cache: waited {timeout:.0f} s for the other hosts' "
          "shards; missing:\n  " + "\n  ".join(lines) + "\nThat host failed "
          "or is slower: rerunning it rebuilds only its own shard. Every host "
          "must see the same image.feature_cache_dir (a shared file system or "
          "gs://); raise image.feature_cache_wait_seconds for a slower host.")
    time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))


# ----------------------------------------------------------------- sweep --


def _writer_alive(info: dict[str, Any]) -> bool | None:
  """Whether the recorded writer runs (None: another host, cannot tell)."""
  if info.get("host") != socket.gethostname():
    return None
  try:
    os.kill(int(info["pid"]), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, ValueError, TypeError):
    return True if isinstance(info.get("pid"), int) else None
  # A killed writer that its parent has not reaped yet is a zombie: the
  # signal test above still finds it, yet it will never finish its build.
  return _process_state(int(info["pid"])) not in ("Z", "X")


def _process_state(pid: int) -> str | None:
  """The state letter of ``pid`` in ``/proc`` (None where there is none)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      # "pid (command) S ...": the command may hold spaces and parentheses.
      return f.read().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return None


def sweep(root: str, *, now: float | None = None) -> list[str]:
  """Deletes temporary builds in ``root`` whose writer is dead or silent.

  Returns the removed paths. Builds in progress are left alone: a writer
  on this host that runs, or one elsewhere that touched ``writer.json``
  within ``STALE_SECONDS``.
  """
  if not tf.io.gfile.isdir(root):
    return []
  now = time.time() if now is None else now
  removed = []
  for entry in tf.io.gfile.listdir(root):
    name = entry.rstrip("/")
    path = join(root, name)
    # Only what Writer names ".<cache name>.<host>.<pid>.<random>".
    if not _TEMP_NAME.match(name) or not tf.io.gfile.isdir(path):
      continue
    marker = join(path, WRITER)
    try:
      with tf.io.gfile.GFile(marker) as f:
        info = json.load(f)
      age = now - tf.io.gfile.stat(marker).mtime_nsec / 1e9
    except (ValueError, OSError, tf.errors.OpError):
      info, age = {}, None
      try:  # No (readable) marker: judge by the directory itself.
        age = now - tf.io.gfile.stat(path).mtime_nsec / 1e9
      except (OSError, tf.errors.OpError):
        pass
    alive = _writer_alive(info) if info else None
    if alive is False or (alive is None and age is not None
                          and age > STALE_SECONDS):
      logging.warning("removing an abandoned image feature cache build %s "
                      "(%s)", path, "its writer is gone" if alive is False
                      else f"no sign of life for {age:.0f} s")
      tf.io.gfile.rmtree(path)
      removed.append(path)
  return removed


# ----------------------------------------------------------------- write --


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _local_tmp(parent: pathlib.Path, name: str) -> pathlib.Path:
  """A fresh temporary build directory with a plain mkdir's mode."""
  parent.mkdir(parents=True, exist_ok=True)
  prefix = f".{name}.{socket.gethostname()}.{os.getpid()}."
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
  os.chmod(tmp, 0o777 & ~_umask())
  return tmp


@dataclasses.dataclass
class _Stop:
  """SIGTERM during a build, as a flag checked between batches."""
  requested: bool = False


class Writer:
  """Writes one cache: ``add`` row blocks, then ``commit`` (or nothing).

  Use as a context manager; leaving it without ``commit`` (an error, a
  SIGTERM) removes the temporary directory. ``capacity`` is an upper
  bound on the rows (rows past the last added one stay unused).
  """

  def __init__(self, target: str, capacity: int, local_root: pathlib.Path,
               row_dtype: str = "float32"):
    self.target = target
    self.capacity = int(capacity)
    self.row_dtype = check_row_dtype(row_dtype)
    self.remote = reporting.is_remote(target)
    name = target.rstrip("/").rsplit("/", 1)[1]
    parent = (local_root if self.remote
              else pathlib.Path(target).parent)
    self.tmp = _local_tmp(parent, name)
    self._keys: list[np.ndarray] = []
    self._rows = None
    self.count = 0
    self._stop = _Stop()
    self._previous_handler = None
    self._last_beat = 0.0
    self.started = time.monotonic()

  # -- lifecycle --
  def __enter__(self) -> Writer:
    self._beat(force=True)
    if threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_term)
    return self

  def _on_term(self, signum, frame):
    self._stop.requested = True
    if callable(self._previous_handler):  # E.g. the trainer's own flag.
      self._previous_handler(signum, frame)

  def __exit__(self, *exc) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None
    if self.tmp.exists():
      self._rows = None
      shutil.rmtree(self.tmp, ignore_errors=True)

  def _beat(self, force: bool = False) -> None:
    """Touches writer.json: the sweeper's sign that the build is alive."""
    now = time.monotonic()
    if force or now - self._last_beat > HEARTBEAT_SECONDS:
      self._last_beat = now
      (self.tmp / WRITER).write_text(json.dumps(
          {"host": socket.gethostname(), "pid": os.getpid(),
           "target": self.target, "rows_done": self.count}))

  def _check_stop(self) -> None:
    if self._stop.requested:
      raise BuildInterrupted(
          f"SIGTERM while building the image feature cache {self.target}; "
          "its partial files were removed. Rerun the same command to build "
          "it again")

  # -- rows --
  def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
    """Appends ``rows`` (float32 ``[n, ...]``) for photo ``keys``, kept as
    ``row_dtype``."""
    self._check_stop()
    n = len(keys)
    rows = to_stored(rows, self.row_dtype)
    if self._rows is None:
      self._rows = np.lib.format.open_memmap(
          self.tmp / ROWS, mode="w+", dtype=ROW_DTYPES[self.row_dtype],
          shape=(self.capacity, *rows.shape[1:]))
    if self.count + n > self.capacity:
      raise ValueError(f"{self.count + n} rows for a cache of "
                       f"{self.capacity}")
    self._rows[self.count:self.count + n] = rows
    self._keys.append(np.asarray(keys, np.int64))
    self.count += n
    self._beat()
    faults.point("feature_build_batch")

  def commit(self, meta: dict[str, Any], format_version: int) -> None:
    """Writes keys and ``cache.json`` and publishes the cache."""
    self._check_stop()
    if self._rows is None:
      raise ValueError(f"no rows were added to {self.target}")
    self._rows.flush()
    self._rows = None
    np.save(self.tmp / KEYS, np.concatenate(self._keys))
    meta = {"format_version": format_version, "photos": self.count,
            "row_dtype": self.row_dtype,
            "seconds": round(time.monotonic() - self.started, 1), **meta}
    (self.tmp / META).write_text(json.dumps(meta, indent=1))
    (self.tmp / WRITER).unlink()
    if self.remote:
      _upload(self.tmp, self.target)
      self._publish_local(mirror_of(self.target), format_version)
    else:
      self._publish_local(pathlib.Path(self.target), format_version)

  def _publish_local(self, final: pathlib.Path, format_version: int) -> None:
    """Renames the finished build to ``final``.

    A complete cache already there (another process finished first) is
    kept and this copy dropped; an incomplete one (a lost ``cache.json``)
    would make the rename fail on every run, so it is moved aside as
    damaged and the rename tried again.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
      try:
        os.replace(self.tmp, final)
        return
      except OSError:
        if not final.is_dir():
          raise
        why = problem(str(final), format_version)
        if why is None:
          logging.info("image features: %s was completed by another process "
                       "first; using that one", final)
          return
        if attempt:
          raise
        quarantine(str(final), why)


def _upload(local: pathlib.Path, target: str) -> None:
  """Copies a finished cache to an object store, ``cache.json`` last."""
  tf.io.gfile.makedirs(target)
  for name in (KEYS, ROWS, META):
    tf.io.gfile.copy(str(local / name), join(target, name), overwrite=True)


def mirror_root() -> pathlib.Path:
  """Local directory for copies of caches kept on an object store."""
  return pathlib.Path(os.path.expanduser("~")) / ".cache" / "mic_jax" / \
      "image_features_mirror"


def mirror_of(target: str) -> pathlib.Path:
  """The local copy of the remote cache ``target``."""
  digest = hashlib.sha256(target.encode()).hexdigest()[:8]
  return mirror_root() / f"{target.rstrip('/').rsplit('/', 1)[1]}-{digest}"


def local_copy(cache_dir: str, format_version: int) -> pathlib.Path:
  """``cache_dir`` itself if local, else a checked local copy of it."""
  if not reporting.is_remote(cache_dir):
    return pathlib.Path(cache_dir)
  local = mirror_of(cache_dir)
  if problem(str(local), format_version) is None:
    return local
  if local.exists():
    shutil.rmtree(local)
  tmp = _local_tmp(local.parent, local.name)
  try:
    for name in (KEYS, ROWS, META):
      tf.io.gfile.copy(join(cache_dir, name), str(tmp / name), overwrite=True)
    os.replace(tmp, local)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return local
