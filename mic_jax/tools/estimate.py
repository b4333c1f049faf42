r"""Memory and FLOPs of a config before you rent the accelerators.

  python -m mic_jax.tools.estimate --config=configs/cross_modal.py \
      --num_devices=16 --accelerator=v4 --mfu=0.4 [--compare_xla]

Nothing is allocated: parameter shapes and shardings come from
``jax.eval_shape`` of the real model and the config's mesh rules, the same
way the trainer derives them.

* **Parameters** per tower (``txt``, ``img``, ``fusion``, ``head``).
* **Bytes per device** for parameters (f32), AdamW moments (2x f32) and
  gradients (f32), each divided by the mesh axes its PartitionSpec names;
  activations by the per-layer estimate of Korthikanti et al. (2022),
  ``s * b * h * (34 + 5 * a * s / h)`` bytes per transformer layer in 16-bit
  (doubled for float32 compute; only the layer inputs, ``2 * s * b * h``,
  with remat), ``b`` = examples per device.
* **FLOPs per example**: forward ``2 * P * T`` for each tower's matmul
  parameters ``P`` (embedding tables excluded) applied to its ``T`` tokens,
  plus attention ``4 * s * s_kv * h`` per layer; a train step is 3x the
  forward (the backward pass costs twice the forward), plus the AdamW
  update, ``ADAMW_FLOPS_PER_PARAM * params / batch`` per example (moments,
  bias correction, decay, global-norm clipping: ~18 element-wise FLOPs per
  parameter per step; it matters only for tiny models with big embedding
  tables and small batches). Convolutions (BiT) are not counted
  analytically: use ``--compare_xla``.
* **Step time** = train FLOPs per step / (devices x peak x MFU).

``--compare_xla`` compiles the real train step for one device and prints
XLA's own FLOP count next to the analytic one.

``--compile`` compiles the trainer's real train step for the config's mesh
on ``--num_devices`` devices (fake CPU devices, requested before JAX
starts; abstract inputs only) and prints XLA's FLOPs and per-device memory
next to the analytic figures, with the compile time; ``--json=FILE`` writes
them (:mod:`mic_jax.tools.compile_check`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags

from configs import common
from mic_jax import sharding as shd
from mic_jax.tools import compile_check

# Dense bf16 peak FLOP/s and memory per device (chip or GPU), from the
# vendors' published specifications; "cpu" is this project's 2-core
# development VM measured in float32 (bench/README.md).
ACCELERATORS = {
    "v4": (275e12, 32 * 2**30),
    "v5e": (197e12, 16 * 2**30),
    "v5p": (459e12, 95 * 2**30),
    "v6e": (918e12, 32 * 2**30),
    "a100": (312e12, 80 * 2**30),
    "h100": (989e12, 80 * 2**30),
    "cpu": (0.3e12, 24 * 2**30),
}
# Element-wise FLOPs of one AdamW step per parameter: 3 + 4 for the two
# moments, 2 bias corrections, eps and the division, weight decay, learning
# rate and the update (5), global-norm clipping (3), rounded up.
ADAMW_FLOPS_PER_PARAM = 18
_EMBEDDING_NAMES = ("word_embeddings", "position_embeddings",
                    "token_type_embeddings", "pos_embedding", "cls")


@dataclasses.dataclass
class Estimate:
  """What :func:`estimate` finds; all sizes in bytes, FLOPs per example."""
  params: dict[str, int]
  mesh: tuple[int, int, int]
  param_bytes: float
  optimizer_bytes: float
  gradient_bytes: float
  activation_bytes: float
  forward_flops: float
  optimizer_flops: float
  convolutions_uncounted: bool

  @property
  def train_flops(self) -> float:
    return 3.0 * self.forward_flops + self.optimizer_flops

  @property
  def total_bytes(self) -> float:
    return (self.param_bytes + self.optimizer_bytes + self.gradient_bytes +
            self.activation_bytes)


def _abstract_params(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(model, boxed abstract params) without allocating anything."""
  spec = _model_spec(config)
  return spec.model, spec.boxed_params


def _model_spec(config: ml_collections.ConfigDict, batch_size: int = 1):
  """The model as the trainer builds it (:func:`classifier.build`)."""
  # pylint: disable=g-import-not-at-top
  from mic_jax.checkpoints import architecture
  from mic_jax.models import classifier
  # pylint: enable=g-import-not-at-top
  return classifier.build(architecture.resolve(config), batch_size=batch_size)


def count_params(tree: Any) -> dict[str, int]:
  """Parameters per top-level tower and in total."""
  counts = {name: sum(math.prod(x.shape) for x in jax.tree.leaves(sub))
            for name, sub in nn.meta.unbox(tree).items()}
  counts["total"] = sum(counts.values())
  return counts


def _sharded_bytes(boxed: Any, mesh_sizes: dict[str, int], rules: Any
                   ) -> float:
  """f32 bytes of one device's shard of every parameter."""
  specs = nn.get_partition_spec(boxed)
  total = 0.0
  for leaf, spec in zip(jax.tree.leaves(nn.meta.unbox(boxed)),
                        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
                            x, jax.sharding.PartitionSpec))):
    mesh_axes = nn.logical_to_mesh_axes(tuple(spec), list(rules)) if len(
        spec) else ()
    divisor = 1
    for axes in mesh_axes:
      for axis in (axes,) if isinstance(axes, str) else (axes or ()):
        divisor *= mesh_sizes[axis]
    total += 4.0 * math.prod(leaf.shape) / divisor
  return total


def _matmul_params(tree: Any) -> int:
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
  return sum(math.prod(x.shape) for path, x in flat
             if len(x.shape) >= 2 and not any(
                 getattr(k, "key", None) in _EMBEDDING_NAMES for k in path))


def _layers(model: Any, config: ml_collections.ConfigDict
            ) -> list[tuple[str, int, int, int, int]]:
  """(tower, layers, tokens, kv tokens, width) of each attention stack."""
  stacks = []
  if model.txt is not None:
    c = model.txt.config
    stacks.append(("txt", c.num_hidden_layers, config.text.max_length,
                   config.text.max_length, c.hidden_size))
  if model.img is not None and hasattr(model.img.config, "patch_size"):
    c = model.img.config
    n = (config.image.size // c.patch_size) ** 2 + 1
    stacks.append(("img", c.depth, n, n, c.width))
  return stacks


def estimate(config: ml_collections.ConfigDict, num_devices: int,
             dtype_bytes: int | None = None) -> Estimate:
  """The estimate of ``config`` on ``num_devices`` devices."""
  # Fields a preset leaves to the towers (image.size = 0) as a run has them.
  config = common.resolve_auto(config)
  model, boxed = _abstract_params(config)
  params = count_params(boxed)
  mesh = shd.mesh_shape(int(config.mesh.data), int(config.mesh.fsdp),
                        int(config.mesh.tensor), num_devices)
  sizes = dict(zip(shd.MESH_AXES, mesh))
  rules = shd.validate_rules(config.mesh.rules or shd.DEFAULT_RULES)
  param_bytes = _sharded_bytes(boxed, sizes, rules)

  stacks = _layers(model, config)
  tokens = {"txt": config.text.max_length, "fusion": config.text.max_length,
            "head": 1}
  forward = 0.0
  for name, layers, s, s_kv, width in stacks:
    tokens[name] = s
    forward += layers * 4.0 * s * s_kv * width
  unboxed = nn.meta.unbox(boxed)
  for name, sub in unboxed.items():
    forward += 2.0 * _matmul_params(sub) * tokens.get(name, 1)
  if config.model.kind == "cross_modal" and len(stacks) == 2:
    s_t, s_v, width = stacks[0][2], stacks[1][2], stacks[0][4]
    forward += 4.0 * s_t * (s_t + s_v) * width
  convs = model.img is not None and not hasattr(model.img.config,
                                                "patch_size")

  per_device_batch = config.batch_size / (sizes["data"] * sizes["fsdp"])
  if dtype_bytes is None:
    dtype_bytes = 2 if config.dtype in ("bfloat16", "float16") else 4
  activations = 0.0
  for name, layers, s, _, width in stacks:
    tower = config.text if name == "txt" else config.image
    heads = (model.txt.config.num_attention_heads if name == "txt"
             else model.img.config.num_heads)
    if tower.remat:
      per_layer = 2.0 * s * per_device_batch * width
    else:
      per_layer = s * per_device_batch * width * (34 + 5 * heads * s / width)
    activations += layers * per_layer * dtype_bytes / 2
  return Estimate(params=params, mesh=mesh, param_bytes=param_bytes,
                  optimizer_bytes=2 * param_bytes, gradient_bytes=param_bytes,
                  activation_bytes=activations, forward_flops=forward,
                  optimizer_flops=(ADAMW_FLOPS_PER_PARAM * params["total"] /
                                   config.batch_size),
                  convolutions_uncounted=convs)


def xla_train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs XLA counts for one compiled train step on one device, per example."""
  step, state, batch = compile_check.single_device_train_step(config)
  cost = step.lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / config.batch_size


def report(est: Estimate, config: ml_collections.ConfigDict, accelerator: str,
           mfu: float, xla_flops: float | None = None) -> str:
  """The estimate as a readable table."""
  peak, memory = ACCELERATORS[accelerator]
  devices = math.prod(est.mesh)
  gib = 2**30
  lines = [f"model {config.model.kind}; mesh (data, fsdp, tensor) = "
           f"{est.mesh}; global batch {config.batch_size}", "",
           "| tower | parameters |", "|---|---:|"]
  lines += [f"| {k} | {v:,} |" for k, v in est.params.items()]
  lines += ["", "| per device | GiB |", "|---|---:|",
            f"| parameters (f32) | {est.param_bytes / gib:.2f} |",
            f"| AdamW moments | {est.optimizer_bytes / gib:.2f} |",
            f"| gradients | {est.gradient_bytes / gib:.2f} |",
            f"| activations (estimate) | {est.activation_bytes / gib:.2f} |",
            f"| total | {est.total_bytes / gib:.2f} of "
            f"{memory / gib:.0f} on {accelerator} |", ""]
  note = " (convolutions not counted)" if est.convolutions_uncounted else ""
  lines.append(f"forward GFLOPs/example {est.forward_flops / 1e9:.2f}, "
               f"train {est.train_flops / 1e9:.2f}{note}")
  if xla_flops is not None:
    lines.append(f"XLA compiled train step: {xla_flops / 1e9:.2f} GFLOPs/"
                 f"example (analytic / XLA = "
                 f"{est.train_flops / xla_flops:.3f})")
  step_flops = est.train_flops * config.batch_size
  seconds = step_flops / (devices * peak * mfu)
  lines.append(f"predicted on {devices} x {accelerator} at MFU {mfu:.0%}: "
               f"{seconds * 1e3:.1f} ms/step, "
               f"{config.batch_size / seconds:,.0f} examples/s")
  if est.total_bytes > memory:
    lines.append("WARNING: does not fit; add fsdp, remat, or a smaller "
                 "per-device batch")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines this program's flags (when it runs, never on import)."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py "
                                  "file, optionally with ':arg'.",
                                  lock_config=True)
  flags.DEFINE_integer("num_devices", None, "Devices (chips) the "
                       "mesh spans; default: this machine's.")
  flags.DEFINE_enum("accelerator", "v4", list(ACCELERATORS),
                    "Peak FLOP/s and memory per device.")
  flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed.")
  flags.DEFINE_integer("num_classes", 1000, "Categories (the "
                       "trainer takes them from the data).")
  flags.DEFINE_bool("compare_xla", False, "Compile the train step on "
                    "this machine and print XLA's FLOP count too.")
  flags.DEFINE_bool("compile", False, "AOT-compile the real train "
                    "step for the mesh on --num_devices (fake CPU) "
                    "devices; print XLA's FLOPs and memory.")
  flags.DEFINE_string("json", None, "With --compile: write analytic "
                      "and XLA figures of the train step to this file.")


def main(argv):
  del argv
  if FLAGS.json and not FLAGS.compile:
    raise app.UsageError("--json needs --compile")
  if FLAGS.compile and FLAGS.num_devices:
    # Before anything starts JAX's backend.
    compile_check.request_cpu_devices(FLAGS.num_devices)
  config = FLAGS.config.copy_and_resolve_references()
  with config.unlocked():
    config.num_classes = FLAGS.num_classes
  try:
    est = estimate(config, FLAGS.num_devices or jax.device_count())
  except Exception as e:  # pylint: disable=broad-except
    if not config.text.checkpoint:
      raise
    # The text tower's architecture comes from its checkpoint's config.json.
    logging.warning("cannot read %s (%s); estimating with the named size "
                    "config.text.size=%s", config.text.checkpoint, e,
                    config.text.size)
    with config.unlocked():
      config.text.checkpoint = ""
    est = estimate(config, FLAGS.num_devices or jax.device_count())
  xla = xla_train_step_flops(config) if FLAGS.compare_xla else None
  print(report(est, config, FLAGS.accelerator, FLAGS.mfu, xla))
  if FLAGS.compile:
    compiled = compile_check.compile_train_step(
        config, FLAGS.num_devices or jax.device_count())
    analytic = est.train_flops * config.batch_size
    print(compile_check.report(compiled, analytic,
                               ACCELERATORS[FLAGS.accelerator][1], FLAGS.accelerator))
    if FLAGS.json:
      with open(FLAGS.json, "w", encoding="utf-8") as f:
        json.dump(compile_check.json_record(compiled, analytic), f, indent=2)


def run():
  """Runs the estimator as a program (``python -m mic_jax.tools.estimate``)."""
  _define_flags()
  flags.mark_flag_as_required("config")
  app.run(main)


if __name__ == "__main__":
  run()
