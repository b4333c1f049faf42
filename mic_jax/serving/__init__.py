"""Serving an exported model: ``Predictor(EXPORT_DIR).predict(titles, images)``."""

from mic_jax.serving.predictor import ExportDirError
from mic_jax.serving.predictor import PredictionError
from mic_jax.serving.predictor import Predictor
from mic_jax.serving.predictor import read_manifest
from mic_jax.serving.predictor import read_params

__all__ = ["ExportDirError", "PredictionError", "Predictor",
           "read_manifest", "read_params"]
