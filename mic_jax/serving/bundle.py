"""The one owner of the export bundle's format: it writes it and reads it.

An export directory (``python -m mic_jax.export``) holds::

  manifest.json     written last; lists every other file with its size and
                    SHA-256 (``files``), so a loader knows the directory is
                    whole
  model.stablehlo   the serialized inference function (``jax.export``)
  params.bin        the parameters, raw little-endian arrays back to back,
  params.json       in sorted ``/``-joined names, with this index
                    (``name``, ``dtype``, ``shape``, byte ``offset``)
  tokenizer/        the tokenizer files the data was prepared with (or one
                    file, a SentencePiece model or a tokenizer.json)
  labels.txt        class names, line = class id; taxonomy.json if any
  saved_model/      optionally, a TF SavedModel

Numpy, json and the standard library only: the exporter writes through
these functions and :class:`mic_jax.serving.Predictor` reads through them,
and serving loads no training, export or flax code. A directory appears
under its final name only when whole (:func:`writing`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from mic_jax.checkpoints import common

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.stablehlo"
PARAMS_BIN = "params.bin"
PARAMS_INDEX = "params.json"
TOKENIZER = "tokenizer"
LABELS = "labels.txt"
TAXONOMY = "taxonomy.json"
SAVED_MODEL = "saved_model"
# The files of a tokenizer directory that are copied into the bundle.
TOKENIZER_SUFFIXES = (".json", ".txt", ".model")

PathLike = str | os.PathLike[str]


class ExportDirError(RuntimeError):
  """The export directory is not whole or not an export; names the file."""


# ------------------------------------------------------------ integrity --


def file_sha256(path: PathLike) -> str:
  """Hex SHA-256 of a file (the manifest's check of every file)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def file_digests(directory: PathLike) -> dict[str, dict[str, Any]]:
  """``{relative path: {"bytes", "sha256"}}`` of every file but the
  manifest: what a loader checks to know the directory is whole."""
  directory = pathlib.Path(directory)
  return {path.relative_to(directory).as_posix():
          {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
          for path in sorted(directory.rglob("*"))
          if path.is_file() and path != directory / MANIFEST}


# -------------------------------------------------------------- writing --


def write_params(directory: PathLike, params: Any) -> None:
  """``params.bin`` (arrays back to back, sorted names) + ``params.json``."""
  directory = pathlib.Path(directory)
  index, offset = [], 0
  with open(directory / PARAMS_BIN, "wb") as f:
    for name, array in sorted(common.flatten(params).items()):
      raw = np.ascontiguousarray(array).tobytes()  # Little-endian hosts.
      index.append({"name": name, "dtype": str(array.dtype),
                    "shape": list(array.shape), "offset": offset})
      f.write(raw)
      offset += len(raw)
  (directory / PARAMS_INDEX).write_text(json.dumps(index, indent=1) + "\n")


def write_model(directory: PathLike, serialized: bytes) -> None:
  """``model.stablehlo``: the serialized inference function."""
  (pathlib.Path(directory) / MODEL).write_bytes(serialized)


def copy_tokenizer(source: PathLike, directory: PathLike) -> str:
  """Copies a tokenizer (one file, or a directory's ``.json``/``.txt``/
  ``.model`` files) into ``directory/tokenizer``; returns the path the
  manifest records (``tokenizer`` or ``tokenizer/<file>``)."""
  source = pathlib.Path(source)
  target = pathlib.Path(directory) / TOKENIZER
  target.mkdir()
  if source.is_file():  # A SentencePiece .model or a tokenizer.json.
    shutil.copyfile(source, target / source.name)
    return f"{TOKENIZER}/{source.name}"
  for path in sorted(source.iterdir()):
    if path.is_file() and path.suffix in TOKENIZER_SUFFIXES:
      shutil.copyfile(path, target / path.name)
  return TOKENIZER


def copy_labels(directory: PathLike, labels_file: PathLike,
                taxonomy_file: PathLike | None = None) -> str | None:
  """``labels.txt`` (and ``taxonomy.json``); returns the taxonomy's name in
  the bundle, or None."""
  directory = pathlib.Path(directory)
  shutil.copyfile(labels_file, directory / LABELS)
  if taxonomy_file is None:
    return None
  shutil.copyfile(taxonomy_file, directory / TAXONOMY)
  return TAXONOMY


def write_manifest(directory: PathLike, manifest: dict[str, Any]
                   ) -> dict[str, Any]:
  """Writes ``manifest.json`` last, with ``files`` (sizes and hashes of
  everything already written) and ``format_version``; returns it."""
  directory = pathlib.Path(directory)
  manifest = {**manifest, "format_version": FORMAT_VERSION,
              "files": file_digests(directory)}
  (directory / MANIFEST).write_text(
      json.dumps(manifest, indent=1, sort_keys=True) + "\n")
  return manifest


@contextlib.contextmanager
def writing(output: PathLike) -> Iterator[pathlib.Path]:
  """A temporary directory to fill; published at ``output`` when whole.

  The caller writes every file and the manifest (:func:`write_manifest`)
  into the yielded directory. On success it is flushed to disk and renamed
  to ``output`` (an existing ``output`` is renamed aside first and deleted
  after, so ``output`` is never half an export); on any error it is
  deleted and ``output`` is untouched.
  """
  out = pathlib.Path(output)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-",
                                      dir=out.parent))
  try:
    yield tmp
    if not (tmp / MANIFEST).exists():
      raise ExportDirError(f"{tmp}: no {MANIFEST} was written; not "
                           "publishing an incomplete export")
    _fsync_tree(tmp)
    tmp.chmod(0o755)  # mkdtemp makes it private.
    _replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _fsync_tree(directory: pathlib.Path) -> None:
  """Flushes the files to disk before the rename publishes them."""
  for path in sorted(directory.rglob("*")):
    if path.is_file():
      with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_dir(tmp: pathlib.Path, out: pathlib.Path) -> None:
  """Puts ``tmp`` at ``out`` by renames only: an existing ``out`` is
  renamed aside first and deleted after."""
  old = None
  if out.exists():
    old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
    os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    if old is not None:
      os.rename(old, out)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------- reading --


def read_manifest(export_dir: PathLike, *, verify: bool = True
                  ) -> dict[str, Any]:
  """The manifest of a whole export directory.

  Args:
    export_dir: written by ``python -m mic_jax.export``.
    verify: check every listed file's size and SHA-256 (reads them all
      once; a few seconds for a BERT-base export).

  Raises:
    ExportDirError: no or unreadable manifest (e.g. the temporary
      directory of an export that did not finish), or a listed file
      missing, of another size or another hash; the message names it.
  """
  directory = pathlib.Path(export_dir)
  path = directory / MANIFEST
  if not path.exists():
    hint = (" (it looks like the temporary directory of an export that did "
            "not finish: export again)" if ".tmp-" in directory.name else "")
    raise ExportDirError(f"{path} not found: not a complete mic_jax export"
                         f"{hint} (see python -m mic_jax.export)")
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportDirError(f"{path} is not valid JSON ({e}): the export is "
                         "damaged; export again") from e
  if not isinstance(manifest, dict):
    raise ExportDirError(f"{path}: not a mic_jax export manifest")
  files = manifest.get("files")
  if files is None:
    logging.warning("%s lists no files (an export from before integrity "
                    "checks): loading it unchecked", path)
    return manifest
  for name, entry in sorted(files.items()):
    file = directory / name
    if not file.is_file():
      raise ExportDirError(f"{file} is missing: the export {directory} is "
                           "incomplete; export again")
    size = file.stat().st_size
    if size != entry["bytes"]:
      raise ExportDirError(f"{file} has {size} bytes, the manifest says "
                           f"{entry['bytes']}: the export {directory} is "
                           "truncated or damaged; export again")
    if verify and file_sha256(file) != entry["sha256"]:
      raise ExportDirError(f"{file} does not match its SHA-256 in the "
                           f"manifest: the export {directory} is damaged; "
                           "export again")
  return manifest


def identity(export_dir: PathLike) -> str:
  """The export's identity: the hex SHA-256 of its ``manifest.json``.

  The manifest records the size and SHA-256 of every other file, so two
  exports share this value only when every file of theirs is the same; it
  is what a score row or a review decision names the model by.
  """
  return file_sha256(pathlib.Path(export_dir) / MANIFEST)


def read_params(directory: PathLike) -> dict[str, Any]:
  """The nested parameter dict of ``params.bin`` + ``params.json``."""
  directory = pathlib.Path(directory)
  index = json.loads((directory / PARAMS_INDEX).read_text())
  raw = (directory / PARAMS_BIN).read_bytes()
  flat = {}
  for entry in index:
    dtype = (np.dtype(ml_dtypes.bfloat16) if entry["dtype"] == "bfloat16"
             else np.dtype(entry["dtype"]))
    count = int(np.prod(entry["shape"], dtype=np.int64))
    flat[entry["name"]] = np.frombuffer(
        raw, dtype=dtype, count=count, offset=entry["offset"]).reshape(
            entry["shape"])
  return common.unflatten(flat)


def read_model(directory: PathLike) -> bytes:
  """The serialized inference function (``model.stablehlo``)."""
  return (pathlib.Path(directory) / MODEL).read_bytes()


def read_labels(directory: PathLike, manifest: dict[str, Any]) -> list[str]:
  """Class names, line = class id."""
  return (pathlib.Path(directory) / manifest["labels"]).read_text(
      encoding="utf-8").splitlines()


def read_taxonomy(directory: PathLike, manifest: dict[str, Any]
                  ) -> dict[str, Any] | None:
  """The taxonomy (levels and parent paths) or None."""
  if not manifest.get("taxonomy"):
    return None
  return json.loads((pathlib.Path(directory) / manifest["taxonomy"])
                    .read_text(encoding="utf-8"))


def tokenizer_path(directory: PathLike, manifest: dict[str, Any]
                   ) -> pathlib.Path:
  """Where the bundle's tokenizer is (a directory or one file)."""
  return pathlib.Path(directory) / manifest["text"]["tokenizer"]
