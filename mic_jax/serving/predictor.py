"""Predictions from an export directory, without the model code.

Imports jax (to run the serialized StableHLO), numpy, the title tokenizers
of :mod:`mic_jax.text`, the photo checks of :mod:`mic_jax.data.photos` (PIL)
and the image transform of :mod:`mic_jax.data.preprocess` (TensorFlow ops):
a photo goes through exactly the steps an evaluated product went through
(decode, RGB, EXIF rotation, long side reduced and JPEG re-encoded with the
settings the data was prepared with, as recorded in the manifest; resize and
centre crop), and nothing of :mod:`mic_jax.models`, :mod:`mic_jax.train` or
flax is loaded.

The bundle's files are read through :mod:`mic_jax.serving.bundle`, the
format's one owner. An export directory is checked before use: every file
the manifest lists must be present with its recorded size and SHA-256, so a half-written,
truncated or tampered export is refused with the file named instead of
being served. Exports from before the manifest listed files (or the photo
settings, or a calibration temperature) still load, with today's defaults.
"""

from __future__ import annotations

import io
import os
import pathlib
import threading
from typing import Any, Sequence, Union

import jax
from jax import export as jax_export
import numpy as np

from mic_jax.data import photos
from mic_jax.serving import bundle

ImageInput = Union[str, os.PathLike, bytes, np.ndarray, None]
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # Padded batch sizes: few compilations.


class PredictionError(ValueError):
  """A product cannot be scored; the message names it and says why."""


# The bundle's own names, re-exported for existing callers.
ExportDirError = bundle.ExportDirError
file_sha256 = bundle.file_sha256
read_manifest = bundle.read_manifest
read_params = bundle.read_params


class Predictor:
  """Categorizes products with an exported model.

  ``Predictor(EXPORT_DIR).predict(titles, images, top_k=5)`` returns one
  dict per product: ``top_k`` (label and probability, highest first),
  ``abstain`` (top probability below the threshold chosen at export time
  for a target precision on the validation split) and, when the export has
  a taxonomy, ``parents`` (the top label's parent categories by level).
  Images are file paths, encoded bytes, ``uint8 [H, W, 3]`` arrays or
  ``None`` (no photo).

  Safe to call from several threads (the server encodes requests in
  parallel): tokenization is serialized because a MeCab tagger is not
  thread-safe; photo decoding and scoring run concurrently.
  """

  def __init__(self, export_dir: str | os.PathLike[str], *,
               verify: bool = True):
    """Loads ``export_dir``; ``verify=False`` checks file sizes only
    (not hashes). Raises :class:`ExportDirError` for a directory that is
    not a whole export."""
    from mic_jax.text import load_tokenizer  # pylint: disable=g-import-not-at-top
    self.dir = pathlib.Path(export_dir)
    self.manifest = bundle.read_manifest(self.dir, verify=verify)
    # Which export scored a product (see bundle.identity).
    self.identity = bundle.identity(self.dir)
    self.labels = bundle.read_labels(self.dir, self.manifest)
    self.taxonomy = bundle.read_taxonomy(self.dir, self.manifest)
    self.max_length = int(self.manifest["text"]["max_length"])
    self.image_size = int(self.manifest["image"]["size"])
    self.threshold = float(self.manifest["abstain"]["threshold"])
    # The photo settings the training data was prepared with (exports
    # from before they were recorded used the defaults).
    try:
      self.photo = photos.PhotoPreprocessing.from_dict(
          self.manifest["image"].get(photos.INFO_KEY),
          where=str(self.dir / bundle.MANIFEST))
    except ValueError as e:
      raise ExportDirError(str(e)) from e
    # Probabilities come out of the exported function calibrated with this
    # temperature (recorded here; 1 for exports made before calibration).
    self.temperature = float(
        (self.manifest.get("calibration") or {}).get("temperature", 1.0))
    self._tokenize_lock = threading.Lock()
    self.tokenizer = load_tokenizer(bundle.tokenizer_path(self.dir,
                                                          self.manifest))
    exported = jax_export.deserialize(bytearray(bundle.read_model(self.dir)))
    self._params = jax.device_put(bundle.read_params(self.dir))
    self._call = jax.jit(exported.call)

  # ------------------------------------------------------------ inputs --

  def encode_titles(self, titles: Sequence[str]) -> dict[str, np.ndarray]:
    """Token ids, mask and types ``[N, max_length]``; empty titles refused."""
    for i, title in enumerate(titles):
      if not isinstance(title, str) or not title.strip():
        raise PredictionError(f"product {i}: the title is empty or not a "
                              f"string ({title!r})")
    with self._tokenize_lock:
      return self.tokenizer.encode_batch(list(titles),
                                         max_length=self.max_length)

  def encode_image(self, image: ImageInput, index: int = 0
                   ) -> tuple[np.ndarray, int]:
    """``([S, S, 3] float32 in [-1, 1], present)`` of one product's photo."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from mic_jax.data import preprocess  # pylint: disable=g-import-not-at-top
    size = self.image_size
    if image is None:
      return np.zeros((size, size, 3), np.float32), 0
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise PredictionError(f"product {index}: an image array must be "
                              f"uint8 [H, W, 3], got {image.dtype} "
                              f"{image.shape}")
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format="PNG")
      data = buffer.getvalue()
    elif isinstance(image, bytes):
      data = image
    else:
      try:
        data = pathlib.Path(image).read_bytes()
      except OSError as e:
        raise PredictionError(f"product {index}: cannot read {image}: "
                              f"{e.strerror or e}") from e
    result = self.photo.reencode(data)  # Exactly what data_prep did.
    if result.error:
      raise PredictionError(f"product {index}: unusable image "
                            f"({result.error}: {result.detail})")
    pixels = tf.io.decode_jpeg(result.jpeg, channels=3)
    return preprocess.eval_pixels(pixels, size).numpy(), 1

  # ------------------------------------------------------------ output --

  def zero_inputs(self, n: int) -> dict[str, np.ndarray]:
    """``n`` all-zero rows of the exported signature's arrays."""
    ids = np.zeros((n, self.max_length), np.int32)
    size = self.image_size
    return {"input_ids": ids, "attention_mask": ids, "token_type_ids": ids,
            "image": np.zeros((n, size, size, 3), np.float32),
            "image_present": np.zeros((n,), np.int32)}

  def encode(self, titles: Sequence[str],
             images: Sequence[ImageInput] | None = None
             ) -> dict[str, np.ndarray]:
    """The model inputs of the products (the exported signature's arrays).

    Raises :class:`PredictionError` naming the first product that cannot
    be scored (empty title, unreadable or unusable photo).
    """
    images = [None] * len(titles) if images is None else list(images)
    if len(images) != len(titles):
      raise PredictionError(f"{len(titles)} titles but {len(images)} images")
    if not titles:
      return self.zero_inputs(0)
    text = self.encode_titles(titles)
    pixels = [self.encode_image(im, i) for i, im in enumerate(images)]
    return {**text, "image": np.stack([p for p, _ in pixels]),
            "image_present": np.array([f for _, f in pixels], np.int32)}

  def probabilities(self, titles: Sequence[str],
                    images: Sequence[ImageInput] | None = None
                    ) -> np.ndarray:
    """Class probabilities ``[N, C]`` of the products."""
    return self.probabilities_of_arrays(self.encode(titles, images))

  def probabilities_of_arrays(self, batch: dict[str, np.ndarray]
                              ) -> np.ndarray:
    """Probabilities of already encoded inputs (the exported signature)."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "image",
            "image_present")
    n = len(batch["input_ids"])
    out = [np.zeros((0, len(self.labels)), np.float32)]
    for start in range(0, n, BUCKETS[-1]):
      chunk = [np.asarray(batch[k])[start:start + BUCKETS[-1]] for k in keys]
      m = len(chunk[0])
      size = next(b for b in BUCKETS if b >= m)
      padded = [np.concatenate([x, np.zeros((size - m, *x.shape[1:]),
                                            x.dtype)]) for x in chunk]
      out.append(np.asarray(self._call(self._params, *padded))[:m])
    return np.concatenate(out)

  def warm_up(self, max_batch_size: int = BUCKETS[-1]) -> None:
    """Compiles every padded batch size up to ``max_batch_size`` now.

    A server calls this before taking traffic, so no client pays for a
    compilation when a batch of a new size first comes along.
    """
    for bucket in BUCKETS:
      if bucket > max(1, max_batch_size):
        break
      self.probabilities_of_arrays(self.zero_inputs(bucket))

  def _parents(self, label: str) -> dict[str, str] | None:
    paths = (self.taxonomy or {}).get("parents", {}).get(label) or {}
    if not paths:
      return None
    path = max(paths, key=paths.get)  # The most frequent parent path.
    return dict(zip(self.taxonomy["levels"], path.split(" > ")))

  def results(self, probs: np.ndarray, *, top_k: int = 5
              ) -> list[dict[str, Any]]:
    """One result dict per row of probabilities (see the class docstring)."""
    results = []
    for p in probs:
      order = np.argsort(-p, kind="stable")[:top_k]
      result: dict[str, Any] = {
          "top_k": [{"label": self.labels[i], "prob": float(p[i])}
                    for i in order],
          "abstain": bool(p[order[0]] < self.threshold)}
      parents = self._parents(self.labels[order[0]])
      if parents is not None:
        result["parents"] = parents
      results.append(result)
    return results

  def predict(self, titles: Sequence[str],
              images: Sequence[ImageInput] | None = None, *, top_k: int = 5
              ) -> list[dict[str, Any]]:
    """One result dict per product (see the class docstring)."""
    return self.results(self.probabilities(titles, images), top_k=top_k)
