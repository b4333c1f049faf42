"""Converting layer stacks between the unrolled and the scanned layout.

An unrolled tower keeps one sub-tree per layer (BERT's ``encoder/layer_3``,
ViT's ``Transformer/encoderblock_3``); a tower built with
``config.model.scan_layers`` keeps one sub-tree of the same names whose
leaves carry a leading layer axis (``encoder/layer``,
``Transformer/encoderblock``). The two hold the same numbers:
``stacked[...][i]`` is layer ``i``'s weight. Pretrained loaders produce the
unrolled layout and Orbax checkpoints may hold either, so both are converted
here, at load and restore, by :func:`match_layout`.

The functions walk any pytree (train states, optimizer states with their
``MaskedNode`` holes, abstract trees) and change only mappings that hold a
stack. Leaves may be numpy or jax arrays or ``jax.ShapeDtypeStruct`` (whose
``NamedSharding`` gains or loses an unsharded leading axis), so an abstract
restore target can be converted before anything is read.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mic_jax.checkpoints.common import CheckpointError

#: Names of the layer stacks: ``{name}_{i}`` unrolled, ``{name}`` scanned.
STACK_NAMES = ("layer", "encoderblock")

STACKED = "stacked"
UNROLLED = "unrolled"


def _map_mappings(fn: Callable[[dict[str, Any]], dict[str, Any]],
                  tree: Any) -> Any:
  """Applies ``fn`` bottom-up to every mapping inside any pytree."""
  return _map_mappings_with_path(lambda _, node: fn(node), tree)


def _map_mappings_with_path(
    fn: Callable[[tuple[str, ...], dict[str, Any]], dict[str, Any]],
    tree: Any, path: tuple[str, ...] = ()) -> Any:
  """``_map_mappings`` whose ``fn`` also gets the mapping's name path.

  The path holds the keys of the mappings above it up to the nearest
  non-mapping container: inside an optimizer state, ``mu`` and ``nu``
  of every learning-rate group give ``("img", "Transformer")`` for the
  same node as the params do.
  """
  if isinstance(tree, Mapping):
    return fn(path, {k: _map_mappings_with_path(fn, v, path + (str(k),))
                     for k, v in tree.items()})
  children, treedef = jax.tree_util.tree_flatten(
      tree, is_leaf=lambda x: x is not tree)
  if jax.tree_util.treedef_is_leaf(treedef):
    return tree
  return treedef.unflatten([_map_mappings_with_path(fn, c) for c in children])


def _layer_keys(node: Mapping[str, Any], name: str) -> list[str]:
  """``[name_0, ..., name_{n-1}]`` in ``node``; gaps raise."""
  pattern = re.compile(re.escape(name) + r"_(\d+)")
  indices = sorted(int(m.group(1)) for k in node
                   if (m := pattern.fullmatch(str(k))))
  if indices != list(range(len(indices))):
    raise CheckpointError(f"layers {name}_i are not numbered 0..n-1 without "
                          f"gaps: found {indices}")
  return [f"{name}_{i}" for i in indices]


def _stack_leaves(*leaves: Any) -> Any:
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = first.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype,
                                sharding=sharding)
  if isinstance(first, jax.Array):
    return jnp.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def _unstack_leaf(leaf: Any, i: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
  return leaf[i]


def stack_layers(tree: Any, name: str) -> Any:
  """``{name}_0 .. {name}_{n-1}`` sub-trees -> one ``{name}`` sub-tree.

  Every leaf of the result is the layers' leaves stacked on a new leading
  axis. Layers whose trees differ in structure raise.
  """
  def fn(node):
    keys = _layer_keys(node, name)
    if not keys:
      return node
    if name in node:
      raise CheckpointError(f"both {name!r} and {keys[0]!r} present; the "
                            "tree mixes the scanned and unrolled layouts")
    layers = [node[k] for k in keys]
    try:
      stacked = jax.tree.map(_stack_leaves, *layers)
    except ValueError as e:
      raise CheckpointError(f"layers {keys[0]}..{keys[-1]} differ in "
                            f"structure and cannot be stacked: {e}") from e
    rest = {k: v for k, v in node.items() if k not in keys}
    return {**rest, name: stacked}
  return _map_mappings(fn, tree)


def _num_layers(stacked: Any, name: str) -> int | None:
  """The leading layer axis shared by ``stacked``'s leaves; None without
  leaves (an optimizer state's ``MaskedNode`` hole, a frozen tower's)."""
  sizes = {leaf.shape[0] if leaf.shape else None
           for leaf in jax.tree.leaves(stacked)}
  if not sizes:
    return None
  if len(sizes) != 1 or None in sizes:
    raise CheckpointError(f"stacked {name!r} leaves do not share one leading "
                          f"layer axis: sizes {sorted(map(str, sizes))}")
  return sizes.pop()


def _layer_counts(tree: Any, name: str) -> dict[tuple[str, ...], int]:
  """Layer count of each stacked ``{name}`` with leaves, by its name path."""
  counts: dict[tuple[str, ...], int] = {}

  def fn(path, node):
    if name in node and isinstance(node[name], Mapping):
      count = _num_layers(node[name], name)
      if count is not None:
        if counts.setdefault(path, count) != count:
          raise CheckpointError(
              f"stacked {'/'.join(path + (name,))!r} has {count} layers in "
              f"one place and {counts[path]} in another")
    return node
  _map_mappings_with_path(fn, tree)
  return counts


def unstack_layers(tree: Any, name: str) -> Any:
  """One stacked ``{name}`` sub-tree -> ``{name}_0 .. {name}_{n-1}``.

  A stack without leaves (every entry a ``MaskedNode`` or None: the
  optimizer state of a frozen tower, or of the parameters another
  learning-rate group holds) has no layer axis to read; it takes the count
  of the stack with leaves at the same name path (the params' own), so it
  is converted as it is: n copies of its holes.
  """
  counts = _layer_counts(tree, name)

  def fn(path, node):
    if name not in node or not isinstance(node[name], Mapping):
      return node
    stacked = node[name]
    count = _num_layers(stacked, name)
    if count is None:
      count = counts.get(path)
      if count is None and len(set(counts.values())) == 1:
        count = next(iter(counts.values()))
      if count is None:
        raise CheckpointError(
            f"stacked {'/'.join(path + (name,))!r} holds no arrays and no "
            "other stack of that name gives its layer count")
    rest = {k: v for k, v in node.items() if k != name}
    for i in range(count):
      rest[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: _unstack_leaf(x, i),
                                         stacked)
    return rest
  return _map_mappings_with_path(fn, tree)


def layout(tree: Any) -> dict[str, str]:
  """``{stack name: STACKED or UNROLLED}`` for each stack found in ``tree``.

  ``tree`` may be any pytree whose mappings carry the parameter names,
  e.g. Orbax's metadata tree of a checkpoint.
  """
  found: dict[str, str] = {}

  def fn(node):
    for name in STACK_NAMES:
      if name in node and isinstance(node[name], Mapping):
        found[name] = STACKED
      elif f"{name}_0" in node:
        found[name] = UNROLLED
    return node
  _map_mappings(fn, tree)
  return found


def to_layout(tree: Any, wanted: Mapping[str, str]) -> Any:
  """``tree`` with each stack of ``wanted`` converted to that layout."""
  have = layout(tree)
  for name, form in wanted.items():
    if have.get(name, form) == form:
      continue
    tree = (stack_layers(tree, name) if form == STACKED
            else unstack_layers(tree, name))
  return tree


def match_layout(tree: Any, like: Any) -> Any:
  """``tree`` converted to the layer layout of ``like`` (a no-op if equal)."""
  return to_layout(tree, layout(like))
