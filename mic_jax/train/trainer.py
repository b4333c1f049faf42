"""The one trainer: ``train_and_evaluate(config, workdir)``.

Reads top to bottom in the order a run happens:

1. data: the prepared data set (or the built-in demo) and its labels;
2. mesh and model, abstract shapes (``jax.eval_shape``) and the shardings
   derived from them before anything is allocated;
3. state: resume from the workdir, else ``config.init_checkpoint``, else
   pretrained towers, else from scratch, each placed directly into its
   sharding;
4. the jitted train step (state donated) and eval step;
5. the loop: log, evaluate, checkpoint; stop loudly on NaN, save on SIGTERM;
6. the end: test evaluation of the best checkpoint, results.json, plots.

Resume is exact: the input stream is a pure function of (seed, step), the
dropout key is ``fold_in(seed, step)``, and the checkpoint holds params,
optimizer state and step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Iterator

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from mic_jax import sharding as shd
from mic_jax.train import checkpointing, evaluation, optimizer, reporting, steps
from mic_jax.train import towers
from mic_jax.data import pipeline


class TrainingError(RuntimeError):
  """A run cannot continue; the message says why and what to do."""


@dataclasses.dataclass
class Run:
  """What the sections of a run share."""
  config: ml_collections.ConfigDict
  workdir: str
  data_dir: str
  info: Any
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]
  model: nn.Module
  state_shardings: Any
  abstract_state: Any


# ---------------------------------------------------------------- data --


def resolve_data(config: ml_collections.ConfigDict, workdir: str
                 ) -> tuple[str, Any]:
  """The prepared data directory and its :class:`DatasetInfo`.

  Stops at once, before any model is built, when the data is missing.
  """
  if config.data.demo:
    from mic_jax.data import demo  # pylint: disable=g-import-not-at-top
    demo_dir = os.path.join(workdir, "demo_data")
    if jax.process_index() == 0:  # One writer; the others wait for it.
      demo.ensure_demo_dataset(demo_dir, max_length=config.text.max_length,
                               image_size=config.image.size, seed=0)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mic_jax demo data ready")
    data_dir = os.path.join(demo_dir, "prepared")
  else:
    data_dir = config.data.dir
    if not data_dir:
      raise TrainingError(
          "config.data.dir is empty. Prepare your catalogue first:\n"
          "  python -m data_prep.prepare --input=CATALOGUE.csv "
          "--id_column=... --title_column=... --label_column=... "
          "--image_pattern='images/{id}.jpg' --tokenizer=TOKENIZER_DIR "
          f"--max_length={config.text.max_length} --output_dir=PREPARED\n"
          "then pass --config.data.dir=PREPARED (see README, 'Preparing your "
          "own catalogue'), or try the built-in demo with the ':demo' config "
          "argument.")
  try:
    info = pipeline.DatasetInfo.load(data_dir)
  except FileNotFoundError as e:
    raise TrainingError(
        f"config.data.dir={data_dir!r} is not a prepared data set ({e}); "
        "create it with `python -m data_prep.prepare` (see README)") from e
  if info.max_length != config.text.max_length:
    raise TrainingError(
        f"{data_dir} was prepared with max_length={info.max_length} but "
        f"config.text.max_length={config.text.max_length}; set "
        f"--config.text.max_length={info.max_length} or prepare again")
  return data_dir, info


# ------------------------------------------------------- model & state --


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Data, mesh, model and the abstract sharded state of a run."""
  data_dir, info = resolve_data(config, workdir)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.num_classes = info.num_classes
  mesh = shd.make_mesh(config.mesh)
  rules = shd.validate_rules(config.mesh.rules or shd.DEFAULT_RULES)
  devices_per_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % (devices_per_batch * config.grad_accum_steps):
    raise TrainingError(
        f"batch_size {config.batch_size} must be divisible by data*fsdp "
        f"({devices_per_batch}) times grad_accum_steps "
        f"({config.grad_accum_steps})")
  model = towers.build_model(config)
  dummy = evaluation.dummy_batch(config, info, batch_size=1)
  boxed = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, dummy,
      train=False))["params"]
  param_shardings = shd.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.meta.unbox(boxed)
  tx, _ = optimizer.make_optimizer(config.optim, abstract_params,
                                   config.total_steps)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = _opt_state_shardings(abstract_opt, abstract_params,
                                       param_shardings, replicated)
  state_shardings = steps.TrainState(step=replicated, params=param_shardings,
                                     opt_state=opt_shardings)
  abstract_state = steps.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
      opt_state=abstract_opt)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)
  if jax.process_index() == 0:
    shd.log_param_shardings(param_shardings, abstract_params)
  return Run(config, workdir, data_dir, info, mesh, rules, model,
             state_shardings, abstract_state)


def _opt_state_shardings(abstract_opt, abstract_params, param_shardings,
                         replicated):
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


def init_state(run: Run, checkpoints: checkpointing.RunCheckpoints
               ) -> tuple[steps.TrainState, str]:
  """The initial state by the explicit restore order. Returns (state, how)."""
  config = run.config
  if checkpoints.latest_step() is not None:
    return checkpoints.restore_state(run.abstract_state), (
        f"resumed from {run.workdir} step {checkpoints.latest_step()}")
  tx, _ = optimizer.make_optimizer(config.optim, run.abstract_state.params,
                                   config.total_steps)
  dummy = evaluation.dummy_batch(config, run.info, batch_size=1)

  def fresh():
    params = nn.meta.unbox(run.model.init(
        {"params": jax.random.key(config.seed),
         "dropout": jax.random.key(config.seed + 1)}, dummy,
        train=False)["params"])
    return params

  params = jax.jit(fresh, out_shardings=run.state_shardings.params)()
  if config.init_checkpoint:
    params = checkpointing.restore_params_from(
        config.init_checkpoint, run.abstract_state.params)
    how = f"initialised from checkpoint {config.init_checkpoint}"
  else:
    params, loaded = towers.load_pretrained(config, params,
                                            run.state_shardings.params)
    how = ("pretrained " + ", ".join(loaded)) if loaded else "from scratch"
  opt_state = jax.jit(tx.init, out_shardings=run.state_shardings.opt_state)(
      params)
  step = jax.device_put(jnp.zeros((), jnp.int32), run.state_shardings.step)
  return steps.TrainState(step, params, opt_state), how


def jit_train_step(run: Run, *, donate: bool = True):
  """The run's train step, jitted with the state's shardings in and out.

  Call it under ``jax.set_mesh(run.mesh)`` and ``nn.logical_axis_rules(
  run.rules)`` so the models' activation constraints apply.
  """
  config = run.config
  tx, schedule = optimizer.make_optimizer(config.optim,
                                          run.abstract_state.params,
                                          config.total_steps)
  weights = steps.class_weights(run.info.class_counts("train"),
                                config.loss.class_weighting)
  return jax.jit(
      steps.make_train_step(
          run.model, tx, schedule, seed=config.seed,
          grad_accum_steps=config.grad_accum_steps,
          label_smoothing=config.loss.label_smoothing,
          loss_class_weights=weights, loss_kind=config.loss.kind,
          focal_gamma=float(config.loss.focal_gamma)),
      in_shardings=(run.state_shardings, None),
      out_shardings=(run.state_shardings, None),
      donate_argnums=(0,) if donate else ())


# ---------------------------------------------------------------- loop --


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler, no flag.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint before exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, losses: list[tuple[int, Any]]) -> None:
  for s, loss in losses:
    value = float(loss)
    if not math.isfinite(value):
      raise TrainingError(
          f"loss is {value} at step {s}: training stopped. Lower "
          "config.optim.lr, check the data (python -m data_prep.prepare "
          "reports bad rows), or use dtype=float32; the last good "
          f"checkpoint is kept (this step, {step}, was not saved)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any]:
  """Trains, evaluates and writes every output of one run; returns results."""
  if config.model.kind == "late":
    from mic_jax.train import late_fusion  # pylint: disable=g-import-not-at-top
    return late_fusion.run(config, workdir)
  reporting.ensure_dir(workdir)
  run = build_run(config, workdir)
  config = run.config
  if reporting.is_writer():
    reporting.write_json(os.path.join(workdir, "config.json"),
                         json.loads(config.to_json_best_effort()))
  checkpoints = checkpointing.RunCheckpoints(workdir,
                                             keep=config.keep_checkpoints)
  state, how = init_state(run, checkpoints)
  start_step = int(state.step)
  logging.info("state %s; training steps %d..%d", how, start_step,
               config.total_steps)

  train_step = jit_train_step(run)
  evaluator = evaluation.Evaluator(run)
  data_sharding = shd.batch_sharding(run.mesh, run.rules)
  writer = reporting.create_writer(workdir)
  log = reporting.MetricsLog(workdir)
  progress = reporting.Progress(start_step, config.total_steps,
                                config.batch_size)
  batches: Iterator[dict[str, np.ndarray]] = pipeline.train_batches(
      run.data_dir, batch_size=shd.per_host_batch_size(config.batch_size),
      image_size=config.image.size, seed=config.seed, start_step=start_step,
      shuffle_buffer=config.data.shuffle_buffer)

  pending: list[tuple[int, Any]] = []  # (step, device loss) since last check.
  step = start_step
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules), _Preemption() as preempt:
    if start_step == 0:
      _evaluate_and_keep_best(evaluator, state, 0, writer, log, checkpoints)
    while step < config.total_steps:
      batch = shd.host_to_global(next(batches), data_sharding)
      state, metrics = train_step(state, batch)
      step += 1
      pending.append((step, metrics["train/loss"]))
      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or is_last:
        _check_finite(step, pending)
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        record["train/loss"] = float(np.mean([float(l) for _, l in pending]))
        record.update(progress.update(step))
        pending = []
        writer.write_scalars(step, {k: v for k, v in record.items()
                                    if k != "eta_seconds"})
        log.append({"step": step, **record})
        reporting.log_line(step, config.total_steps, record)
      if step % config.eval_every_steps == 0 or is_last:
        _evaluate_and_keep_best(evaluator, state, step, writer, log,
                                checkpoints)
      stop = preempt.requested or checkpoints.reached_preemption(step)
      if step % config.checkpoint_every_steps == 0 or is_last or stop:
        _check_finite(step, pending)
        checkpoints.save_state(step, state, force=True)
      if stop:
        checkpoints.wait()
        log.close()
        raise SystemExit(f"preempted at step {step}; checkpoint saved, rerun "
                         "the same command to resume")
    checkpoints.wait()
  writer.flush()
  log.close()
  results = evaluator.final_report(checkpoints)
  checkpoints.close()
  return results


def _evaluate_and_keep_best(evaluator, state, step, writer, log, checkpoints):
  report = evaluator.evaluate(state.params, "validation")
  scalars = {"validation/macro_f1": report["macro_f1"],
             "validation/accuracy": report["accuracy"]}
  writer.write_scalars(step, scalars)
  log.append({"step": step, **scalars})
  logging.info("step %d validation macro-F1 %.4f accuracy %.4f", step,
               report["macro_f1"], report["accuracy"])
  checkpoints.save_best(step, state.params, scalars)
