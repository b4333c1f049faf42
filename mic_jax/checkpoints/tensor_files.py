"""Reading tensors from safetensors and PyTorch files without torch.

Both readers return ``{name: numpy array}``. Neither executes code from the
file: safetensors is a JSON header plus raw bytes, and PyTorch's zip format
is a pickle that we unpickle with an allow-list that only rebuilds tensors
(any other global is refused with an error naming it). torch therefore is
not a runtime dependency of mic_jax, and an untrusted ``pytorch_model.bin``
cannot run anything.
"""

from __future__ import annotations

import collections
import json
import pathlib
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from mic_jax.checkpoints.common import CheckpointError

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads every tensor of a ``.safetensors`` file (memory-mapped)."""
  path = pathlib.Path(path)
  try:
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(header_len))
  except (OSError, struct.error, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})"
                          ) from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                            f"{info['dtype']}")
    start, end = info["data_offsets"]
    out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(
        info["shape"])
  return out


class _TorchMarker:
  """Stands for a torch storage class in the pickle; carries the dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _TORCH_STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused_args):
  itemsize = storage.dtype.itemsize
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused_args):
  return data


class _SafeTorchUnpickler(pickle.Unpickler):
  """Rebuilds tensors from a torch zip checkpoint; refuses everything else."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._source = source
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) in (("torch._utils", "_rebuild_tensor_v2"),
                          ("torch._utils", "_rebuild_tensor")):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return _TorchMarker(name)
    raise CheckpointError(
        f"{self._source}: refusing to unpickle {module}.{name}; only plain "
        "tensor state dicts are read (convert the file to safetensors)")

  def persistent_load(self, pid: Any) -> np.ndarray:
    kind, marker, key = pid[0], pid[1], pid[2]
    if kind != "storage" or not isinstance(marker, _TorchMarker):
      raise CheckpointError(f"{self._source}: unsupported storage {pid!r}")
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}data/{key}")
      self._storages[key] = np.frombuffer(raw, dtype=marker.dtype)
    return self._storages[key]


def read_torch_zip(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a ``torch.save`` state dict (zip format, torch >= 1.6) safely."""
  path = pathlib.Path(path)
  if not zipfile.is_zipfile(path):
    raise CheckpointError(
        f"{path}: not a zip-format PyTorch file (legacy torch<1.6 pickles "
        "are not read because they cannot be loaded safely; re-save it with "
        "a current torch or convert it to safetensors)")
  with zipfile.ZipFile(path) as archive:
    pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise CheckpointError(f"{path}: expected one data.pkl, found {pkl}")
    prefix = pkl[0][:-len("data.pkl")]
    with archive.open(pkl[0]) as f:
      state = _SafeTorchUnpickler(f, archive, prefix, str(path)).load()
  if not isinstance(state, dict):
    raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a "
                          "state dict of tensors")
  bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
  return dict(state)


def read_weight_files(directory: pathlib.Path, candidates: tuple[str, ...],
                      what: str = "weights"
                      ) -> tuple[dict[str, np.ndarray], str]:
  """The tensors of the first of ``candidates`` found in a HF directory.

  ``candidates`` are file names in order of preference (safer and faster
  first): ``model.safetensors``, a sharded ``model.safetensors.index.json``,
  ``pytorch_model.bin`` (read without running pickled code) and
  ``flax_model.msgpack``. Returns ``({name: array}, file)`` with the file's
  own names.
  """
  for name in candidates:
    path = directory / name
    if not path.exists():
      continue
    if name == "model.safetensors":
      return read_safetensors(path), str(path)
    if name.endswith(".index.json"):
      with open(path, encoding="utf-8") as f:
        shards = sorted(set(json.load(f).get("weight_map", {}).values()))
      tensors: dict[str, np.ndarray] = {}
      for shard in shards:
        tensors.update(read_safetensors(directory / shard))
      return tensors, str(path)
    if name == "pytorch_model.bin":
      return read_torch_zip(path), str(path)
    if name.endswith(".msgpack"):
      # pylint: disable=g-import-not-at-top
      from flax import serialization
      from mic_jax.checkpoints import common
      # pylint: enable=g-import-not-at-top
      with open(path, "rb") as f:
        try:
          tree = serialization.msgpack_restore(f.read())
        except Exception as e:  # pylint: disable=broad-except
          raise CheckpointError(f"{path}: not a Flax msgpack file ({e})") from e
      return {k: np.asarray(v) for k, v in common.flatten(tree).items()}, str(
          path)
    raise ValueError(f"unknown weight file kind {name!r}")
  raise CheckpointError(f"{directory}: no {what} found; expected one of "
                        f"{', '.join(candidates)}")
