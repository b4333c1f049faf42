"""Which architecture a run's checkpoints dictate, read before building.

The model builder (:func:`mic_jax.models.classifier.build`) reads no files:
it takes a plain config. A pretrained tower must be built with its
checkpoint's own architecture (a Hugging Face BERT's ``config.json``; a
ViT's sizes, patch, LayerScale and pixel normalization), so this module
reads them and puts them into a copy of the config (``text.bert``,
``image.vit``) that the builder then follows. Only the towers the model
kind builds are read (an image-only run never reads its text checkpoint).
"""

from __future__ import annotations

import ml_collections

from configs import common
from mic_jax.models import classifier


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the checkpoints' architectures filled in.

  ``text.bert`` (a :class:`~mic_jax.models.bert.BertConfig`) when
  ``text.checkpoint`` is set and no explicit ``text.bert`` is; ``image.vit``
  (a :class:`~mic_jax.models.vit.ViTConfig`) when
  :func:`~mic_jax.models.classifier.vit_architecture_from_checkpoint` says
  the ViT comes from its checkpoint. Reading may download a hub id.
  Fields a preset left to the photo tower (``image.size = 0``,
  ``image.freeze_pretrained``) are filled in first
  (:func:`configs.common.resolve_auto`). Other configs come back as an
  equal copy.
  """
  return fill(common.resolve_auto(config))


def fill(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """:func:`resolve` of a config already resolved by
  :func:`configs.common.resolve_auto` (a run's: the trainer resolves it
  once), without resolving it again."""
  # pylint: disable=g-import-not-at-top
  from mic_jax.checkpoints import bert as bert_ckpt
  from mic_jax.checkpoints import hub
  # pylint: enable=g-import-not-at-top
  resolved = config.copy_and_resolve_references()
  kind = resolved.model.kind
  builds = kind in classifier.KINDS
  with resolved.unlocked():
    text = resolved.text
    if (builds and classifier.uses_text(kind) and text.get("checkpoint") and
        not text.get("bert")):
      text.bert = bert_ckpt.read_config(
          hub.resolve_dir(text.checkpoint, what="BERT checkpoint"))
    image = resolved.image
    if (builds and classifier.uses_image(kind) and
        image.get("kind", "vit") == "vit" and
        classifier.vit_architecture_from_checkpoint(image) and
        image.get("vit") is None):
      from mic_jax.checkpoints import vit as vit_ckpt  # pylint: disable=g-import-not-at-top
      image.vit = vit_ckpt.vit_config_from_checkpoint(image.checkpoint,
                                                      int(image.size))
  return resolved
