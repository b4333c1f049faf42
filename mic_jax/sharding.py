"""The device mesh, logical-axis rules and the shardings derived from them.

Models name their weight and activation axes (``mic_jax.layers.partitioning``);
the config maps those names onto the three mesh axes ``data``, ``fsdp`` and
``tensor``. Data parallelism is ``mesh = (all, 1, 1)``; FSDP shards every
weight along its ``embed`` axis over ``fsdp`` (optimizer state follows);
tensor parallelism shards ``mlp``/``heads``/``vocab`` over ``tensor``.
The batch is split over ``data`` and ``fsdp`` together.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from mic_jax.layers import partitioning

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]

#: Default logical -> mesh rules. Axes of size 1 make a rule a no-op, so the
#: same rules serve single-device, data-parallel, FSDP and tensor runs.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_embed", None),
    ("length", None),
    ("positions", None),
    ("types", None),
    ("classes", None),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(data: int, fsdp: int, tensor: int,
               num_devices: int) -> tuple[int, int, int]:
  """Resolves ``-1`` (all remaining devices) and checks the product.

  A mesh smaller than ``num_devices`` is allowed: it uses the first devices.
  """
  dims = [data, fsdp, tensor]
  if any(d == 0 or d < -1 for d in dims):
    raise ValueError(f"mesh sizes must be positive or -1, got {dims}")
  if dims.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dims}")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into mesh {dims}")
    dims[dims.index(-1)] = num_devices // known
  if math.prod(dims) > num_devices:
    raise ValueError(f"mesh {tuple(dims)} needs {math.prod(dims)} devices, "
                     f"only {num_devices} are available")
  return tuple(dims)  # type: ignore[return-value]


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh a config asks for."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(int(mesh_config.data), int(mesh_config.fsdp),
                     int(mesh_config.tensor), len(devices))
  used = devices[:math.prod(shape)]
  return Mesh(np.asarray(used).reshape(shape), MESH_AXES)


def validate_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """Rejects unknown logical names, unknown mesh axes and conflicts."""
  seen: dict[str, Any] = {}
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"a sharding rule is (logical_name, mesh_axes), got "
                       f"{rule!r}")
    name, target = rule[0], rule[1]
    if name not in partitioning.ALL_AXES:
      raise ValueError(f"sharding rule for unknown logical axis {name!r}; "
                       f"known: {partitioning.ALL_AXES}")
    targets = (target,) if isinstance(target, str) or target is None else \
        tuple(target)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise ValueError(f"sharding rule {name!r} -> {target!r}: unknown mesh "
                         f"axis {t!r}; mesh axes are {MESH_AXES}")
    target = targets[0] if len(targets) == 1 else targets
    if name in seen and seen[name] != target:
      raise ValueError(f"conflicting sharding rules for {name!r}: "
                       f"{seen[name]!r} and {target!r}")
    seen[name] = target
    out.append((name, target))
  return tuple(out)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves may carry logical names.

  Leaves without names (step counters, RNG keys, optimizer scalars) are
  replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def opt_state_shardings(abstract_opt: Any, abstract_params: Any,
                        param_shardings: Any, replicated: NamedSharding
                        ) -> Any:
  """Optimizer moments shard like their parameters; scalars replicate.

  A moment is recognised by its key path: the trailing dictionary keys of an
  optimizer-state leaf are the path of the parameter it belongs to (optax
  keeps the params' tree inside every per-param state, with ``MaskedNode``
  holes for parameters another lr group or the freeze mask owns).
  """
  by_path = {
      tuple(k.key for k in path): (param.shape, sharding)
      for (path, param), sharding in zip(
          jax.tree_util.tree_flatten_with_path(abstract_params)[0],
          jax.tree.leaves(param_shardings))}

  def sharding_of(path, leaf):
    keys = []
    for entry in reversed(path):
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.append(entry.key)
    shape, sharding = by_path.get(tuple(reversed(keys)), (None, replicated))
    return sharding if shape == leaf.shape else replicated

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of a batch's leading axis (``batch`` rule), rest replicated."""
  spec = nn.logical_to_mesh_axes(("batch",), list(rules))
  return NamedSharding(mesh, PartitionSpec(*spec))


def log_param_shardings(shardings: Any, shapes: Any) -> None:
  """Logs each parameter's shape and PartitionSpec once, for the record."""
  flat_sh = jax.tree_util.tree_flatten_with_path(shardings)[0]
  flat_shape = jax.tree.leaves(shapes)
  for (path, sharding), shape in zip(flat_sh, flat_shape):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    logging.info("param %-70s %-20s %s", name, tuple(shape.shape),
                 sharding.spec)


def bytes_per_device(tree: Any) -> dict[Any, int]:
  """Measured bytes of ``tree``'s arrays held on each device."""
  totals: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals


def per_host_batch_size(global_size: int) -> int:
  """Each host reads ``global_size / process_count`` examples per step."""
  if global_size % jax.process_count():
    raise ValueError(f"batch size {global_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  return global_size // jax.process_count()


def host_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding
                   ) -> dict[str, jax.Array]:
  """Assembles per-host numpy batches into global arrays on the mesh.

  Non-numeric entries (product ids, raw titles) stay on the host.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()
          if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}
