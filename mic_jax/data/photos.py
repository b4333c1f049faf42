"""Validate a product photo and re-encode it as an RGB JPEG.

Everything is converted here, once, so the tf.data graph only ever sees
baseline RGB JPEGs: CMYK, grayscale, 16-bit, palette and alpha images are
converted (alpha composited on white, the usual catalogue background), EXIF
rotation is applied, and the long side is reduced to ``max_side``.

Both ``data_prep`` (which stores the result in the TFRecords) and the
serving Predictor (which re-encodes a raw photo the same way) use this
module, with the :class:`PhotoPreprocessing` the data was prepared with:
``data_prep`` records it in ``dataset_info.json``, the export copies it into
its manifest, so a served photo goes through exactly the trained-on steps.
Only PIL is imported here (no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Any

from PIL import Image, ImageOps

# Larger inputs are refused rather than decoded (memory safety).
MAX_PIXELS = 100_000_000

# data_prep's --max_image_side / --jpeg_quality defaults; also what data
# prepared before these were recorded was made with.
DEFAULT_MAX_SIDE = 512
DEFAULT_JPEG_QUALITY = 90
INFO_KEY = "photo_preprocessing"  # In dataset_info.json and the manifest.

NOT_GIVEN = "image_not_given"  # The catalogue lists no image: not an error.
MISSING = "image_missing"
CORRUPT = "image_corrupt"
TOO_LARGE = "image_too_large"


@dataclasses.dataclass(frozen=True)
class ImageResult:
  jpeg: bytes = b""
  original_size: tuple[int, int] = (0, 0)  # (width, height) as read.
  error: str = ""
  detail: str = ""


@dataclasses.dataclass(frozen=True)
class PhotoPreprocessing:
  """How photos were reduced and re-encoded before tf.data saw them.

  Recorded as data (``{"max_image_side": ..., "jpeg_quality": ...}``, the
  names of data_prep's flags) so serving can repeat it exactly.
  """
  max_side: int = DEFAULT_MAX_SIDE
  jpeg_quality: int = DEFAULT_JPEG_QUALITY

  def __post_init__(self):
    if (not isinstance(self.max_side, int) or isinstance(self.max_side, bool)
        or self.max_side < 1):
      raise ValueError(f"max_image_side must be a positive integer, got "
                       f"{self.max_side!r}")
    if (not isinstance(self.jpeg_quality, int) or
        isinstance(self.jpeg_quality, bool) or
        not 1 <= self.jpeg_quality <= 100):
      raise ValueError(f"jpeg_quality must be an integer in [1, 100], got "
                       f"{self.jpeg_quality!r}")

  def to_dict(self) -> dict[str, int]:
    return {"max_image_side": self.max_side,
            "jpeg_quality": self.jpeg_quality}

  @classmethod
  def from_dict(cls, record: dict[str, Any] | None, *, where: str = ""
                ) -> PhotoPreprocessing:
    """The recorded settings; ``None`` (recorded before they were) means
    the defaults every earlier preparation used. ``where`` names the file
    in errors."""
    if record is None:
      return cls()
    if not isinstance(record, dict) or set(record) != {"max_image_side",
                                                       "jpeg_quality"}:
      raise ValueError(f"{where}: {INFO_KEY} must be "
                       '{"max_image_side": int, "jpeg_quality": int}, got '
                       f"{record!r}")
    try:
      return cls(record["max_image_side"], record["jpeg_quality"])
    except ValueError as e:
      raise ValueError(f"{where}: {INFO_KEY}: {e}") from e

  def reencode(self, data: bytes) -> ImageResult:
    """:func:`reencode` with these settings."""
    return reencode(data, max_side=self.max_side, quality=self.jpeg_quality)


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode in ("RGBA", "LA", "PA") or (
      img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    img = img.point(lambda v: v / 256).convert("L")
  return img.convert("RGB") if img.mode != "RGB" else img


def reencode(data: bytes, *, max_side: int = DEFAULT_MAX_SIDE,
             quality: int = DEFAULT_JPEG_QUALITY
             ) -> ImageResult:
  """Decodes ``data`` fully, converts to RGB, reduces, encodes JPEG.

  Never raises on bad input: the failure comes back as ``error``.
  """
  if not data:
    return ImageResult(error=CORRUPT, detail="empty file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      size = img.size
      if size[0] * size[1] > MAX_PIXELS:
        return ImageResult(original_size=size, error=TOO_LARGE,
                           detail=f"{size[0]}x{size[1]}")
      if img.format == "JPEG" and max(size) > 2 * max_side:
        img.draft("RGB", (max_side, max_side))  # Cheap DCT-domain reduce.
      img.load()  # Raises on truncated or corrupt data.
      img = ImageOps.exif_transpose(img)
      img = _to_rgb(img)
      if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
      if min(img.size) < 1:
        return ImageResult(original_size=size, error=CORRUPT,
                           detail="zero-sized image")
      out = io.BytesIO()
      img.save(out, format="JPEG", quality=quality)
      return ImageResult(jpeg=out.getvalue(), original_size=size)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    return ImageResult(error=TOO_LARGE, detail=str(e)[:200])
  except Image.UnidentifiedImageError:  # Its message names a BytesIO object.
    return ImageResult(error=CORRUPT, detail="not a picture in a format PIL "
                       "reads (JPEG, PNG, WebP, ...)")
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, ValueError, struct.error,
    # ...) on hostile bytes; any of them means "not a usable image".
    return ImageResult(error=CORRUPT, detail=f"{type(e).__name__}: {e}"[:200])


def load(path: str, *, max_side: int = DEFAULT_MAX_SIDE,
         quality: int = DEFAULT_JPEG_QUALITY) -> ImageResult:
  """Reads and re-encodes the image at ``path`` ("" = no image given)."""
  if not path:
    return ImageResult(error=NOT_GIVEN, detail="no image given")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return ImageResult(error=MISSING, detail=f"{type(e).__name__}: {path}")
  return reencode(data, max_side=max_side, quality=quality)
