"""Loading pretrained towers from their published checkpoint formats.

* :func:`load_bert`: Hugging Face BERT directories or hub ids.
* :func:`load_vit`: Google's ViT ``.npz`` files (vision_transformer, big_vision)
  and Hugging Face ViTModel / Dinov2Model directories or hub ids;
  :func:`vit_config_from_checkpoint` gives the config without the weights.
* :func:`load_bit`: Google's BiT-M ResNet-v2 ``.npz`` files.

Imports are lazy so that ``import mic_jax.checkpoints`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from mic_jax.checkpoints.common import CheckpointError

_LAZY = {
    "load_bert": "mic_jax.checkpoints.bert",
    "load_vit": "mic_jax.checkpoints.vit",
    "vit_config_from_checkpoint": "mic_jax.checkpoints.vit",
    "load_bit": "mic_jax.checkpoints.bit",
}

__all__ = ["CheckpointError", *_LAZY]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'mic_jax.checkpoints' has no attribute {name!r}")
