"""Serving an exported model: ``Predictor(EXPORT_DIR).predict(titles, images)``."""

from mic_jax.serving.predictor import PredictionError, Predictor, read_params

__all__ = ["PredictionError", "Predictor", "read_params"]
