"""Pieces every checkpoint loader shares: errors, flat trees and merging.

Loaders convert a foreign checkpoint into a flat ``{"a/b/c": array}`` dict
whose keys are our parameter paths, then :func:`merge_into` checks it against
the parameters the model expects (built abstractly with ``jax.eval_shape``,
so nothing is allocated twice) and reports every problem at once: missing
names, unexpected names and shape mismatches, each with the file it came
from.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

FlatParams = dict[str, np.ndarray]


class CheckpointError(ValueError):
  """A checkpoint cannot be used as asked; the message says exactly why."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> ``{"a/b/c": leaf}`` (plain Python: serving imports it
  without flax)."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a/b/c": leaf}`` -> nested dict."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _short_list(names: Iterable[str], limit: int = 20) -> str:
  names = sorted(names)
  text = ", ".join(names[:limit])
  if len(names) > limit:
    text += f", ... ({len(names) - limit} more)"
  return text


def merge_into(
    expected: Mapping[str, Any],
    loaded: FlatParams,
    *,
    source: str,
    reinit: str | None = None,
    init_params: Mapping[str, Any] | None = None,
    allow_missing: str | None = None,
    allow_unexpected: str | None = None,
) -> dict[str, Any]:
  """Checks ``loaded`` against the ``expected`` tree and returns a full tree.

  Args:
    expected: nested tree of arrays or ``jax.ShapeDtypeStruct`` giving the
      names, shapes and dtypes the model wants.
    loaded: flat checkpoint params, already renamed to our paths.
    source: the file (or hub id) they came from, for error messages.
    reinit: regex; expected names matching it are taken from ``init_params``
      instead of the checkpoint (e.g. a classifier head for new classes).
    init_params: freshly initialised params used for ``reinit`` names and
      for names allowed to be missing.
    allow_missing: regex of expected names the checkpoint may lack; they are
      taken from ``init_params``.
    allow_unexpected: regex of checkpoint names that may be ignored (e.g.
      pre-training heads).

  Returns:
    A nested dict of numpy arrays cast to the expected dtypes.

  Raises:
    CheckpointError: listing every missing, unexpected and mis-shaped name.
  """
  flat_expected = flatten(expected)
  flat_init = flatten(init_params) if init_params is not None else {}
  reinit_re = re.compile(reinit) if reinit else None
  missing_re = re.compile(allow_missing) if allow_missing else None
  unexpected_re = re.compile(allow_unexpected) if allow_unexpected else None

  out: dict[str, Any] = {}
  missing, mismatched = [], []
  for name, want in flat_expected.items():
    from_init = (reinit_re is not None and reinit_re.search(name)) or (
        name not in loaded and missing_re is not None and missing_re.search(name))
    if from_init:
      if name not in flat_init:
        raise CheckpointError(
            f"{source}: {name!r} is to be re-initialised but no fresh "
            "parameters were given")
      out[name] = flat_init[name]
      continue
    if name not in loaded:
      missing.append(name)
      continue
    value = np.asarray(loaded[name])
    if tuple(value.shape) != tuple(want.shape):
      mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model "
                        f"{tuple(want.shape)}")
      continue
    out[name] = value.astype(want.dtype)
  unexpected = [n for n in loaded if n not in flat_expected and not (
      unexpected_re is not None and unexpected_re.search(n))]
  problems = []
  if mismatched:
    problems.append("shape mismatch: " + "; ".join(mismatched))
  if missing:
    problems.append("missing from checkpoint: " + _short_list(missing))
  if unexpected:
    problems.append("unexpected in checkpoint: " + _short_list(unexpected))
  if problems:
    raise CheckpointError(f"cannot load {source}:\n  " + "\n  ".join(problems))
  return unflatten(out)
