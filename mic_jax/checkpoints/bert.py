"""Loading Hugging Face BERT checkpoints into :class:`BertEncoder`.

A checkpoint directory holds ``config.json`` and one of
``model.safetensors`` (or a sharded ``model.safetensors.index.json``),
``pytorch_model.bin`` (read without executing pickled code) or
``flax_model.msgpack``. Tensors are renamed to our tree by rule (see
``mic_jax.models.bert``), then checked name by name and shape by shape.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mic_jax.checkpoints import common
from mic_jax.checkpoints import layer_stacks
from mic_jax.checkpoints.common import CheckpointError
from mic_jax.checkpoints.hub import resolve_dir
from mic_jax.checkpoints import tensor_files
from mic_jax.models.bert import BertConfig, BertEncoder, BertPooler

# Tensors that BERT checkpoints carry but an encoder does not use: the
# pre-training / task heads and the position-id buffer.
_IGNORED = re.compile(
    r"^(cls[./]|classifier[./]|qa_outputs[./]|lm_head[./]|.*position_ids$)")

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "flax_model.msgpack")


def read_weights(directory: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
  """Reads the first BERT weight file found, in order of safety and speed.

  Returns:
    ``({name: array}, file)`` with the file's own names.
  """
  return tensor_files.read_weight_files(directory, _WEIGHT_FILES,
                                        what="BERT weights")


def _rename(name: str) -> str | None:
  """Maps one Hugging Face name (torch or Flax style) to our path.

  Returns None for names that cannot be BERT encoder weights; those are
  reported as unexpected by the caller.
  """
  parts = re.split(r"[./]", name)
  if parts[0] == "bert":
    parts = parts[1:]
  if not parts:
    return None
  # encoder.layer.3 -> encoder/layer_3
  if len(parts) > 2 and parts[0] == "encoder" and parts[1] == "layer":
    parts = ["encoder", f"layer_{parts[2]}"] + parts[3:]
  *scope, leaf = parts
  if not scope:
    return None
  module = scope[-1]
  if module == "LayerNorm":
    leaf = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
  elif module.endswith("_embeddings"):
    leaf = {"weight": "embedding"}.get(leaf, leaf)
  else:
    leaf = {"weight": "kernel"}.get(leaf, leaf)
  return "/".join(scope + [leaf])


def convert_hf_weights(tensors: dict[str, np.ndarray], *, source: str
                       ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Renames Hugging Face tensors to our paths.

  Torch ``Linear`` weights are ``[out, in]`` and are transposed to Flax's
  ``[in, out]``; Flax-format files are already ``[in, out]``.

  Returns:
    ``(flat params, ignored names)``.

  Raises:
    CheckpointError: two tensors map to the same parameter.
  """
  is_flax = source.endswith(".msgpack")
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  ignored = []
  for name, value in tensors.items():
    if _IGNORED.match(re.sub(r"^bert[./]", "", name)):
      ignored.append(name)
      continue
    ours = _rename(name)
    if ours is None:
      ours = name  # Surfaces as "unexpected" with its own name.
    elif ours.endswith("/kernel") and value.ndim == 2 and not is_flax:
      value = value.T
    if ours in out:
      raise CheckpointError(f"{source}: both {origin[ours]!r} and {name!r} "
                            f"map to {ours!r}")
    out[ours], origin[ours] = value, name
  return out, ignored


def read_config(directory: pathlib.Path) -> BertConfig:
  """Reads and validates ``config.json`` from a checkpoint directory."""
  path = directory / "config.json"
  if not path.exists():
    raise CheckpointError(f"{path}: missing; a BERT checkpoint directory "
                          "needs config.json next to its weights")
  try:
    return BertConfig.from_json_file(str(path))
  except (ValueError, json.JSONDecodeError) as e:
    raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}"
                          ) from e


def abstract_params(model: BertEncoder) -> dict[str, Any]:
  """The model's parameter shapes and dtypes, with nothing allocated."""
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))
  return nn.meta.unbox(shapes)["params"]


def load_bert_params(directory: pathlib.Path, model: BertEncoder,
                     *, seed: int = 0) -> dict[str, Any]:
  """Reads, renames and checks the weights; returns a numpy param tree.

  Host numpy arrays let the caller place them with any sharding. For a
  model with ``scan_layers`` the layers come stacked on a leading axis
  (``encoder/layer/...``), as that model wants them.
  """
  tensors, source = read_weights(directory)
  flat, ignored = convert_hf_weights(tensors, source=source)
  if ignored:
    logging.info("%s: ignoring %d tensors an encoder does not use (%s%s)",
                 source, len(ignored), ", ".join(sorted(ignored)[:5]),
                 ", ..." if len(ignored) > 5 else "")
  if not any(k.startswith("pooler/") for k in flat):
    # Some exports drop the pooler; it is a small, freshly trainable layer.
    logging.warning("%s: no pooler weights; initialising pooler/ randomly",
                    source)
    hidden = model.config.hidden_size
    pooler = BertPooler(model.config, param_dtype=model.param_dtype).init(
        jax.random.key(seed), jnp.zeros((1, 1, hidden)))
    flat.update({f"pooler/{k}": np.asarray(v) for k, v in common.flatten(
        nn.meta.unbox(pooler)["params"]).items()})
  unrolled = model.clone(scan_layers=False)
  params = common.merge_into(abstract_params(unrolled), flat, source=source)
  if model.scan_layers:
    params = layer_stacks.to_layout(params, {"layer": layer_stacks.STACKED})
  return params


def load_bert(path_or_hub_id: str | os.PathLike[str], *,
              dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              remat: bool = False, scan_layers: bool = False,
              **config_overrides: Any
              ) -> tuple[BertEncoder, dict[str, Any]]:
  """Loads a Hugging Face BERT checkpoint as ``(model, params)``.

  Args:
    path_or_hub_id: a checkpoint directory or a hub id.
    dtype: compute dtype of the returned module.
    param_dtype: dtype the parameters are cast to.
    remat: rematerialise layers in the backward pass.
    scan_layers: build the model with its layers under ``nn.scan``; the
      weights are stacked to match.
    **config_overrides: e.g. ``hidden_dropout_prob=0.0``; architecture
      fields that change shapes will fail the shape check.

  Returns:
    The module and its parameters (``jax.Array`` on the default device);
    ``model.apply({"params": params}, ids, mask, types)`` gives
    ``(sequence, pooled)``.
  """
  directory = resolve_dir(path_or_hub_id, what="BERT checkpoint")
  config = read_config(directory)
  if config_overrides:
    config = BertConfig(**{**config.__dict__, **config_overrides})
  model = BertEncoder(config, dtype=dtype, param_dtype=param_dtype,
                      remat=remat, scan_layers=scan_layers)
  params = load_bert_params(directory, model)
  return model, jax.tree.map(jnp.asarray, params)
