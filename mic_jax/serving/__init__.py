"""Serving an exported model: ``Predictor(EXPORT_DIR).predict(titles, images)``.

The names below are imported on first use (PEP 562): code that needs only the
bundle's file format (``from mic_jax.serving import bundle``, as the review
page does at every start) does not pay for JAX, which the predictor loads.
"""

import importlib
from typing import Any

_FROM_PREDICTOR = ("ExportDirError", "PredictionError", "Predictor",
                   "read_manifest", "read_params")
__all__ = list(_FROM_PREDICTOR)


def __getattr__(name: str) -> Any:
  if name in _FROM_PREDICTOR:
    return getattr(importlib.import_module("mic_jax.serving.predictor"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
