"""Reading the flat ``.npz`` files Google publishes its vision models in.

ViT (vision_transformer, big_vision) and BiT files are NumPy archives whose
keys are ``/``-joined parameter paths. They usually live on Cloud Storage,
so ``gs://`` (and any other scheme TensorFlow's file systems know) is read
through ``tf.io.gfile``; TensorFlow is imported only for such paths.
"""

from __future__ import annotations

import os
import zipfile
from typing import BinaryIO

import ml_dtypes
import numpy as np

from mic_jax.checkpoints.common import CheckpointError, FlatParams


def _is_remote(path: str) -> bool:
  return "://" in path


def _open(path: str) -> BinaryIO:
  if _is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(path):
      raise CheckpointError(f"{path}: no such checkpoint file")
    return tf.io.gfile.GFile(path, "rb")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such checkpoint file")
  return open(path, "rb")


def _fix_dtype(array: np.ndarray) -> np.ndarray:
  # NumPy has no bfloat16: bf16 arrays saved by JAX come back as raw 2-byte
  # records ("V2"). Reinterpret them rather than failing later on a cast.
  if array.dtype.kind == "V" and array.dtype.itemsize == 2:
    return array.view(ml_dtypes.bfloat16)
  return array


def read_npz(path: str | os.PathLike[str]) -> FlatParams:
  """Reads every array of a local or ``gs://`` ``.npz`` file.

  Returns:
    ``{name: array}`` with the file's own names.

  Raises:
    CheckpointError: the file is missing or is not a readable ``.npz``.
  """
  path = os.fspath(path)
  with _open(path) as f:
    try:
      with np.load(f, allow_pickle=False) as archive:
        arrays = {name: _fix_dtype(archive[name]) for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise CheckpointError(f"{path}: not a readable .npz file ({e})") from e
  if not arrays:
    raise CheckpointError(f"{path}: the .npz file holds no arrays")
  return arrays
