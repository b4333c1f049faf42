"""Photo checks and re-encoding: moved to :mod:`mic_jax.data.photos`.

Serving needs them too, and serving should not import ``data_prep``; the
names stay importable from here for existing callers.
"""

from mic_jax.data.photos import CORRUPT
from mic_jax.data.photos import DEFAULT_JPEG_QUALITY
from mic_jax.data.photos import DEFAULT_MAX_SIDE
from mic_jax.data.photos import ImageResult
from mic_jax.data.photos import load
from mic_jax.data.photos import MAX_PIXELS
from mic_jax.data.photos import MISSING
from mic_jax.data.photos import NOT_GIVEN
from mic_jax.data.photos import PhotoPreprocessing
from mic_jax.data.photos import reencode
from mic_jax.data.photos import TOO_LARGE

__all__ = ["CORRUPT", "DEFAULT_JPEG_QUALITY", "DEFAULT_MAX_SIDE",
           "ImageResult", "load", "MAX_PIXELS", "MISSING", "NOT_GIVEN",
           "PhotoPreprocessing", "reencode", "TOO_LARGE"]
