"""Loading the released BiT ``.npz`` checkpoints (e.g. ``BiT-M-R152x4.npz``).

The files (google-research/big_transfer, ``gs://bit_models/``) use the names
of BiT's TensorFlow model, which :mod:`mic_jax.models.bit` reproduces, so
loading is a pass-through plus checks. The architecture (stage depths,
widths) is read from the file's names and shapes; a ``variant`` name, if
given, is checked against it. GroupNorm's group count is not stored in the
file: it is 32 in every released model.
"""

from __future__ import annotations

import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mic_jax.checkpoints import common
from mic_jax.checkpoints.common import CheckpointError, FlatParams
from mic_jax.checkpoints.npz import read_npz
from mic_jax.models.bit import BiT, BiTConfig, bit_config

ROOT = "resnet/root_block/standardized_conv2d/kernel"
HEAD = "resnet/head/conv2d/kernel"
_UNIT = re.compile(r"^resnet/block(\d+)/unit(\d+)/")


def infer_architecture(flat: FlatParams, source: str) -> dict[str, Any]:
  """Reads depths, width factor and head size from a BiT file.

  Returns:
    :class:`BiTConfig` fields and ``num_classes`` of the file's own head.
  """
  if ROOT not in flat:
    raise CheckpointError(f"{source}: no {ROOT!r}; is this a BiT checkpoint? "
                          f"(first names: {sorted(flat)[:5]})")
  root = flat[ROOT].shape
  if len(root) != 4 or root[:3] != (7, 7, 3):
    raise CheckpointError(f"{source}: {ROOT} has shape {root}, expected "
                          "[7, 7, 3, width]")
  units: dict[int, set[int]] = {}
  for name in flat:
    if m := _UNIT.match(name):
      units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  stages = sorted(units)
  if not stages or stages != list(range(1, len(stages) + 1)) or any(
      sorted(units[s]) != list(range(1, len(units[s]) + 1)) for s in stages):
    raise CheckpointError(f"{source}: stages/units are not numbered "
                          f"block1.. / unit01..: "
                          f"{ {s: sorted(u) for s, u in units.items()} }")
  root_width = root[3]
  factor = root_width // 64 if root_width % 64 == 0 else 1
  arch = dict(depths=tuple(len(units[s]) for s in stages),
              width_factor=factor, base_width=root_width // factor)
  head = flat.get(HEAD)
  arch["num_classes"] = None if head is None else head.shape[-1]
  return arch


def load_bit(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    variant: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
    **overrides: Any,
) -> tuple[BiT, dict[str, Any]]:
  """Builds a BiT ResNet-v2 from a released ``.npz`` and loads its weights.

  BiT is fully convolutional, so there is nothing to resize for another
  image size: the token grid simply grows with the input.

  Args:
    path: local path or ``gs://...`` of a BiT ``.npz`` file.
    num_classes: None (default) drops the file's head and returns a tower
      whose ``apply`` gives tokens ``[B, 1+h*w, C]``. An int adds a head: the
      file's is kept if it has exactly this many classes, otherwise a fresh
      zero head (BiT's fine-tuning recipe) is made.
    variant: optional name (``"R152x4"``); checked against the file.
    dtype: compute dtype; ``param_dtype``: dtype of the returned params.
    seed: RNG seed for parameters that are created fresh.
    **overrides: other :class:`BiTConfig` fields (``remat``, ...).

  Returns:
    ``(model, params)`` with ``params`` a plain nested dict of arrays.

  Raises:
    CheckpointError: missing file, or names / shapes that do not fit, all
      listed in one message.
  """
  source = os.fspath(path)
  flat = read_npz(source)
  arch = infer_architecture(flat, source)
  ckpt_classes = arch.pop("num_classes")
  config = BiTConfig(**arch, num_classes=num_classes, **overrides)
  if variant is not None:
    want = bit_config(variant)
    diff = [f"{f}: {variant} has {getattr(want, f)}, file has "
            f"{getattr(config, f)}" for f in ("depths", "root_width")
            if getattr(want, f) != getattr(config, f)]
    if diff:
      raise CheckpointError(f"{source} is not a BiT {variant}: "
                            + "; ".join(diff))
  model = BiT(config, dtype=dtype, param_dtype=param_dtype)

  dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)
  expected = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(seed), dummy))["params"])
  reinit, init_params = None, None
  if num_classes and ckpt_classes != num_classes:
    reinit = r"^resnet/head/"
    # Only the head leaves the jitted init; XLA drops the rest unrun.
    init_params = {"resnet": {"head": jax.device_get(jax.jit(
        lambda: nn.meta.unbox(model.init(jax.random.key(seed), dummy))[
            "params"]["resnet"]["head"])())}}
  params = common.merge_into(
      expected, flat, source=source, reinit=reinit, init_params=init_params,
      allow_unexpected=None if num_classes else r"^resnet/head/")
  return model, params
