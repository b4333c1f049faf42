"""Compile the real train step ahead of time for a mesh of N devices.

What the estimator's ``--compile`` runs. The step is the trainer's own
(:func:`mic_jax.trainer.jit_train_step`: the same model, optimizer,
loss, ``NamedSharding`` in and out and donated state), lowered on abstract
inputs only (``jax.ShapeDtypeStruct`` with their shardings; nothing is
allocated) and compiled by XLA for the mesh the config builds on N devices.
On a machine without N accelerators the devices are fake CPU devices
(:func:`request_cpu_devices`, before JAX starts).

What XLA reports, and how to read it:

* ``cost_analysis()["flops"]`` of an SPMD-partitioned program is the FLOP
  count of *one device's* program. The whole mesh's figure is that times the
  number of devices in the mesh. Work every device repeats (e.g. the AdamW
  update of replicated parameters under pure data parallelism) is then
  counted once per device, where the analytic count has it once; for the
  paper config that is below 1% of a step.
* ``memory_analysis()`` is per device too: argument, output, alias (output
  buffers that reuse a donated argument) and temporary bytes. The peak is
  ``arguments + outputs - aliased + temporaries``.
* The figures are the CPU compiler's: buffer assignment, fusion and layouts
  on a TPU or GPU differ, so memory is a close guide, not the accelerator's
  exact figure (the XLA CPU backend may also keep some bf16 temporaries in
  f32).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from mic_jax import sharding as shd

# compiled.memory_analysis() fields reported, short name -> attribute.
MEMORY_FIELDS = {
    "arguments": "argument_size_in_bytes",
    "outputs": "output_size_in_bytes",
    "aliased": "alias_size_in_bytes",
    "temporaries": "temp_size_in_bytes",
    "generated_code": "generated_code_size_in_bytes",
}


def request_cpu_devices(num_devices: int) -> None:
  """Asks JAX for ``num_devices`` CPU devices; call before JAX starts.

  Raises:
    RuntimeError: JAX's backend is already running with fewer devices.
  """
  try:
    jax.config.update("jax_num_cpu_devices", int(num_devices))
  except RuntimeError as e:
    if jax.device_count() >= num_devices:
      return
    raise RuntimeError(
        f"--compile needs {num_devices} devices but JAX already started with "
        f"{jax.device_count()}; run the estimator as its own program, or set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} "
        "before anything imports JAX") from e


@dataclasses.dataclass
class CompiledStep:
  """XLA's own figures for one compiled train step."""
  mesh: tuple[int, ...]
  flops_per_device: float
  memory: dict[str, int]
  lower_seconds: float
  compile_seconds: float
  # Process CPU time of the compile (all threads): on a shared machine the
  # wall time above depends on the load, this much less.
  compile_cpu_seconds: float = float("nan")

  @property
  def num_devices(self) -> int:
    n = 1
    for d in self.mesh:
      n *= d
    return n

  @property
  def flops(self) -> float:
    """FLOPs of one step on the whole mesh (per-device count x devices)."""
    return self.flops_per_device * self.num_devices

  @property
  def peak_bytes_per_device(self) -> int:
    m = self.memory
    return (m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"])


def _stand_in_data(config: ml_collections.ConfigDict) -> Any:
  """A :class:`DatasetInfo` with ``config.num_classes`` labels and no files."""
  from mic_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  num_classes = int(config.num_classes)
  if num_classes < 1:
    raise ValueError(f"config.num_classes must be set to compile the train "
                     f"step, got {num_classes}")
  return pipeline.DatasetInfo(
      data_dir="", labels=tuple(f"class_{i}" for i in range(num_classes)),
      max_length=int(config.text.max_length), shards={})


def single_device_train_step(config: ml_collections.ConfigDict
                             ) -> tuple[Any, Any, Any]:
  """``(jitted step, abstract state, abstract batch)`` for one device, no mesh.

  The train step as the trainer makes it (AdamW, the loss, batch
  ``config.batch_size``), on ``ShapeDtypeStruct`` inputs, for lowering only:
  what the estimator's ``--compare_xla`` and ``bench/bench_compile.py``
  compile. A config naming checkpoints reads their architecture.
  """
  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from mic_jax.checkpoints import architecture
  from mic_jax.models import classifier
  from mic_jax.train import optimizer, steps
  # pylint: enable=g-import-not-at-top
  spec = classifier.build(architecture.resolve(config),
                          batch_size=int(config.batch_size))
  params = spec.abstract_params
  tx, schedule = optimizer.make_optimizer(config.optim, params, 1000)
  state = steps.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                           jax.eval_shape(tx.init, params))
  step = steps.make_train_step(
      spec.model, tx, schedule, seed=0, grad_accum_steps=1,
      label_smoothing=0.0,
      loss_class_weights=np.ones(config.num_classes, np.float32))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       spec.example_batch)
  return jax.jit(step), state, batch


def compile_train_step(config: ml_collections.ConfigDict, num_devices: int
                       ) -> CompiledStep:
  """Lowers and compiles the trainer's step for ``num_devices`` devices.

  Args:
    config: a full config with ``num_classes`` filled in; its mesh is built
      on the first ``num_devices`` of ``jax.devices()``.
    num_devices: devices the mesh spans.

  Raises:
    ValueError: fewer devices than asked for, or a batch the mesh cannot
      split (the trainer's own check).
  """
  from mic_jax import trainer  # pylint: disable=g-import-not-at-top
  from mic_jax.models import classifier  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if len(devices) < num_devices:
    raise ValueError(f"compiling for {num_devices} devices, but JAX has only "
                     f"{len(devices)}; see request_cpu_devices")
  info = _stand_in_data(config)
  run = trainer.build_run(config, workdir="", data=("", info),
                          devices=devices[:num_devices])
  step = trainer.jit_train_step(run)
  batch_sharding = shd.batch_sharding(run.mesh, run.rules)
  shapes = jax.eval_shape(lambda: classifier.example_batch(
      run.config, batch_size=int(run.config.batch_size)))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in shapes.items()}
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    start = time.perf_counter()
    lowered = step.lower(run.abstract_state, batch)
    lowered_at = time.perf_counter()
    cpu_start = time.process_time()
    compiled = lowered.compile()
    done = time.perf_counter()
    cpu_seconds = time.process_time() - cpu_start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  stats = compiled.memory_analysis()
  memory = {k: int(getattr(stats, attr)) for k, attr in MEMORY_FIELDS.items()}
  return CompiledStep(mesh=tuple(run.mesh.devices.shape),
                      flops_per_device=float(cost["flops"]), memory=memory,
                      lower_seconds=lowered_at - start,
                      compile_seconds=done - lowered_at,
                      compile_cpu_seconds=cpu_seconds)


def report(compiled: CompiledStep, analytic_flops: float,
           hbm_bytes: float | None = None, accelerator: str = "") -> str:
  """XLA's figures next to the analytic step FLOPs, as readable lines."""
  gib = 2**30
  m = compiled.memory
  lines = [
      f"XLA, train step compiled for mesh {compiled.mesh} "
      f"(lower {compiled.lower_seconds:.1f} s, compile "
      f"{compiled.compile_seconds:.1f} s, "
      f"{compiled.compile_cpu_seconds:.1f} s of CPU time):",
      f"  FLOPs/step, whole mesh: XLA {compiled.flops:.4g} "
      f"({compiled.flops_per_device:.4g} per device x "
      f"{compiled.num_devices}), analytic {analytic_flops:.4g} "
      f"(analytic / XLA = {analytic_flops / compiled.flops:.3f})",
      "  memory per device (GiB): " + ", ".join(
          f"{k} {m[k] / gib:.2f}" for k in ("arguments", "outputs", "aliased",
                                            "temporaries")) +
      f"; peak {compiled.peak_bytes_per_device / gib:.2f}"]
  if hbm_bytes:
    fits = "fits" if compiled.peak_bytes_per_device <= hbm_bytes else \
        "DOES NOT FIT"
    lines.append(f"  {fits} in {hbm_bytes / gib:.0f} GiB per device on "
                 f"{accelerator} ({compiled.peak_bytes_per_device / hbm_bytes:.0%})")
  return "\n".join(lines)


def json_record(compiled: CompiledStep, analytic_flops: float
                ) -> dict[str, Any]:
  """What ``--json`` writes: the step's FLOPs (whole mesh), memory, time."""
  return {
      "analytic_flops": float(analytic_flops),
      "xla_flops": compiled.flops,
      "xla_flops_per_device": compiled.flops_per_device,
      "memory_bytes_per_device": {**compiled.memory,
                                  "peak": compiled.peak_bytes_per_device},
      "compile_seconds": compiled.compile_seconds,
      "compile_cpu_seconds": compiled.compile_cpu_seconds,
      "lower_seconds": compiled.lower_seconds,
      "mesh": list(compiled.mesh),
  }
