"""Pretrained towers of a run: which checkpoint goes into which sub-tree.

The classifier names its towers ``txt`` and ``img``
(:mod:`mic_jax.models.classifier`). This module reads ``config.text.
checkpoint`` (a Hugging Face BERT directory or hub id) and ``config.image.
checkpoint`` (a ViT or BiT ``.npz``), converts them with the loaders of
:mod:`mic_jax.checkpoints`, checks every name and shape against the
freshly initialised sub-tree, and places the result straight into the
sub-tree's sharding. A tower whose checkpoint is empty keeps its random
initialisation (training from scratch), and says so.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import jax
import ml_collections

from mic_jax.checkpoints import architecture
from mic_jax.checkpoints import common
from mic_jax.checkpoints import hub
from mic_jax.checkpoints import layer_stacks
from mic_jax.models import bert as bert_lib
from mic_jax.models import classifier


# Re-exported for existing callers; models are built by
# mic_jax.models.classifier (build_model, or build for shapes as well).
build_model = classifier.build_model


def _text_params(config: ml_collections.ConfigDict) -> tuple[Any, str]:
  from mic_jax.checkpoints import bert as bert_ckpt  # pylint: disable=g-import-not-at-top
  source = config.text.checkpoint
  directory = hub.resolve_dir(source, what="BERT checkpoint")
  encoder = bert_lib.BertEncoder(
      classifier.text_config(architecture.resolve(config)))
  return bert_ckpt.load_bert_params(directory, encoder, seed=config.seed), source


def _image_params(config: ml_collections.ConfigDict) -> tuple[Any, str]:
  source = config.image.checkpoint
  if config.image.kind == "vit":
    from mic_jax.checkpoints import vit as vit_ckpt  # pylint: disable=g-import-not-at-top
    # A named variant is checked against the file; otherwise the model was
    # built from the checkpoint's own architecture.
    variant = (None if classifier.vit_architecture_from_checkpoint(
        config.image) else config.image.variant)
    _, params = vit_ckpt.load_vit(source, config.image.size, variant=variant)
  elif config.image.kind == "bit":
    from mic_jax.checkpoints import bit as bit_ckpt  # pylint: disable=g-import-not-at-top
    _, params = bit_ckpt.load_bit(source, variant=config.image.variant)
  else:
    raise ValueError(f"config.image.kind must be 'vit' or 'bit', got "
                     f"{config.image.kind!r}")
  return params, source


def load_pretrained(config: ml_collections.ConfigDict, params: dict[str, Any],
                    shardings: dict[str, Any]
                    ) -> tuple[dict[str, Any], list[str]]:
  """Replaces the ``txt``/``img`` sub-trees of ``params`` by checkpoints.

  Args:
    config: the run's config (reads ``text.checkpoint``, ``image.
      checkpoint``, ``image.kind``, ``image.variant``, ``image.size``).
    params: the freshly initialised, sharded parameters.
    shardings: their shardings (same tree).

  Returns:
    ``(params, names)``: the new tree and a description of each loaded
    tower, e.g. ``["txt <- /ckpt/bert"]``.

  Raises:
    CheckpointError: a checkpoint lacks a tensor, has an extra one, or a
      shape differs from the configured architecture.
  """
  readers = {"txt": (config.text.get("checkpoint"), _text_params),
             "img": (config.image.get("checkpoint"), _image_params)}
  params = dict(params)
  loaded = []
  for tower, (source, read) in readers.items():
    if tower not in params:
      continue
    if not source:
      logging.info("%s: no checkpoint configured, trained from scratch", tower)
      continue
    host_params, source = read(config)
    # Loaders give unrolled layers; a scan_layers model wants them stacked.
    host_params = layer_stacks.match_layout(host_params, params[tower])
    checked = common.merge_into(params[tower], common.flatten(host_params),
                                source=str(source))
    params[tower] = jax.device_put(checked, shardings[tower])
    loaded.append(f"{tower} <- {source}")
  return params, loaded
