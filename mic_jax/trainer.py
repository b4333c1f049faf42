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
optimizer state and step. A resumed run drops what the killed one wrote
after its restored step (best candidates, metrics.jsonl lines) and replays
it, so its outputs equal a never-interrupted run's (see docs/reliability.md).

Never saved: a state with a NaN/Inf anywhere in params or optimizer state
(the train step reports finiteness of the updated state; checked before
every evaluation, save and log). SIGTERM on any host stops every host after
the same step (a per-step all-reduce of the flag on multi-host runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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

from configs import common
from mic_jax import hostmem
from mic_jax import sharding as shd
from mic_jax.checkpoints import architecture
from mic_jax.data import pipeline
from mic_jax.evaluation import evaluation, reporting
from mic_jax.features import image_features
from mic_jax.models import classifier
from mic_jax.train import checkpointing, optimizer, steps
from mic_jax.train import faults, finite, rundir, summary, towers


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
  # The model's input spec and abstract params (mic_jax.models.classifier).
  spec: classifier.ModelSpec | None = None
  # The optimizer and its learning-rate schedule, made once per run.
  tx: Any = None
  schedule: Any = None
  # Cached outputs of a frozen image tower (image_features), once attached.
  features: Any = None
  # Title lengths batches are cut to (pipeline.resolve_buckets); () = padded.
  buckets: tuple[int, ...] = ()
  # Packed titles (config.data.pack_titles; pipeline.resolve_packing).
  packing: pipeline.Packing | None = None

  def train_batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's training stream from ``start_step`` (pixels or tokens)."""
    config = self.config
    batches = pipeline.train_batches(
        self.data_dir, batch_size=shd.per_host_batch_size(config.batch_size),
        image_size=config.image.size, seed=config.seed, start_step=start_step,
        shuffle_buffer=config.data.shuffle_buffer,
        image_keys=self.features is not None, length_buckets=self.buckets,
        packing=self.packing, info=self.info)
    return batches if self.features is None else self.features.attach(batches)


# ---------------------------------------------------------------- data --


def resolve_data(config: ml_collections.ConfigDict, workdir: str
                 ) -> tuple[str, Any]:
  """The prepared data directory and its :class:`DatasetInfo`.

  Stops at once, before any model is built, when the data is missing.
  """
  if config.data.demo:
    from mic_jax.data import demo  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:  # One writer; the others wait for it.
      demo.ensure_demo_dataset(rundir.demo_dir(workdir),
                               max_length=config.text.max_length,
                               image_size=config.image.size, seed=0)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mic_jax demo data ready")
    data_dir = rundir.data_dir(config, workdir)
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


def build_run(config: ml_collections.ConfigDict, workdir: str, *,
              data: tuple[str, Any] | None = None,
              devices: list[jax.Device] | None = None) -> Run:
  """Data, mesh, model and the abstract sharded state of a run.

  ``data`` is ``(data_dir, info)`` when already known (the estimator's
  ahead-of-time compile passes a stand-in with the label count); ``devices``
  the devices the mesh is built from (default: all).
  """
  config = common.resolve_auto(config)
  data_dir, info = data if data is not None else resolve_data(config, workdir)
  buckets = pipeline.resolve_buckets(info, config.data.length_buckets,
                                     global_batch_size=config.batch_size)
  with config.unlocked():
    config.num_classes = info.num_classes
    # The lengths this run uses ('auto' resolved), as config.json records them.
    config.data.length_buckets = ",".join(map(str, buckets))
  mesh = shd.make_mesh(config.mesh, devices)
  packing = None
  if config.data.get("pack_titles"):
    if buckets:
      raise TrainingError("data.pack_titles and data.length_buckets are "
                          "exclusive: packed rows have one static length")
    packing = pipeline.resolve_packing(
        info, pack_length=int(config.data.get("pack_length", 0) or 0),
        slots=int(config.data.get("pack_slots", 0) or 0),
        global_batch_size=config.batch_size,
        row_multiple=(mesh.shape["data"] * mesh.shape["fsdp"]
                      * config.grad_accum_steps),
        process_count=jax.process_count())
    with config.unlocked():  # Recorded resolved, as buckets are.
      config.data.pack_length = packing.length
      config.data.pack_slots = packing.slots
  rules = shd.validate_rules(config.mesh.rules or shd.DEFAULT_RULES)
  devices_per_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % (devices_per_batch * config.grad_accum_steps):
    raise TrainingError(
        f"batch_size {config.batch_size} must be divisible by data*fsdp "
        f"({devices_per_batch}) times grad_accum_steps "
        f"({config.grad_accum_steps})")
  # The config is resolved once, above; fill reads the checkpoints' shapes.
  spec = classifier.build(architecture.fill(config), info.num_classes)
  # image.train_top_blocks: which of a frozen tower's blocks still train.
  config = image_features.resolve_top_blocks(config, spec.model.img)
  param_shardings = shd.logical_shardings(spec.boxed_params, mesh, rules)
  abstract_params = spec.abstract_params
  tx, schedule = optimizer.make_optimizer(config.optim, abstract_params,
                                          config.total_steps)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = shd.opt_state_shardings(abstract_opt, abstract_params,
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
  return Run(config, workdir, data_dir, info, mesh, rules, spec.model,
             state_shardings, abstract_state, spec=spec, tx=tx,
             schedule=schedule, buckets=buckets, packing=packing)


def init_state(run: Run, checkpoints: checkpointing.RunCheckpoints
               ) -> tuple[steps.TrainState, str]:
  """The initial state by the explicit restore order. Returns (state, how)."""
  config = run.config
  if checkpoints.latest_step() is not None:
    state = checkpoints.restore_state(run.abstract_state,
                                      validate=_restored_state_problem)
    return state, f"resumed from {run.workdir} step {int(state.step)}"
  params = jax.jit(lambda: run.spec.init_params(config.seed),
                   out_shardings=run.state_shardings.params)()
  if config.init_checkpoint:
    params = checkpointing.restore_params_from(
        config.init_checkpoint, run.abstract_state.params)
    how = f"initialised from checkpoint {config.init_checkpoint}"
  else:
    params, loaded = towers.load_pretrained(config, params,
                                            run.state_shardings.params)
    how = ("pretrained " + ", ".join(loaded)) if loaded else "from scratch"
  opt_state = jax.jit(run.tx.init,
                      out_shardings=run.state_shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), run.state_shardings.step)
  return steps.TrainState(step, params, opt_state), how


def _restored_state_problem(state: steps.TrainState) -> str | None:
  """Why a restored state must not be trained on, or None (it is fine)."""
  if bool(jax.jit(finite.all_finite)((state.params, state.opt_state))):
    return None
  return "non-finite values (" + finite.describe(state) + ")"


FINITE_METRIC = "train/state_finite"


def jit_train_step(run: Run, *, donate: bool = True):
  """The run's train step, jitted with the state's shardings in and out.

  Its metrics include ``train/state_finite``: whether the *updated* params
  and optimizer state are all finite (not logged; checked before saves).
  Call it under ``jax.set_mesh(run.mesh)`` and ``nn.logical_axis_rules(
  run.rules)`` so the models' activation constraints apply.
  """
  config = run.config
  weights = steps.class_weights(run.info.class_counts("train"),
                                config.loss.class_weighting)
  train_step = steps.make_train_step(
      run.model, run.tx, run.schedule, seed=config.seed,
      grad_accum_steps=config.grad_accum_steps,
      label_smoothing=config.loss.label_smoothing,
      loss_class_weights=weights, loss_kind=config.loss.kind,
      focal_gamma=float(config.loss.focal_gamma),
      image_dropout=float(config.model.get("image_dropout", 0.0)),
      title_dropout=float(config.model.get("title_dropout", 0.0)),
      aux_loss_weight=float(config.model.get("aux_loss_weight", 0.0)))

  def checked_step(state, batch):
    state, metrics = train_step(state, batch)
    metrics = dict(metrics)
    metrics[FINITE_METRIC] = finite.all_finite((state.params, state.opt_state))
    return state, metrics

  return jax.jit(
      checked_step,
      in_shardings=(run.state_shardings, None),
      out_shardings=(run.state_shardings, None),
      donate_argnums=(0,) if donate else ())


def attach_image_features(run: Run, params: Any) -> None:
  """Sets ``run.features`` when the run's image tower is frozen and cached.

  Then the train and eval streams carry cached tower outputs instead of
  pixels (:mod:`mic_jax.features.image_features`).
  """
  if not image_features.wanted(run.config, run.abstract_state.params,
                               run.model.img):
    return
  img = params["img"]
  if not all(getattr(x, "is_fully_addressable", True)
             for x in jax.tree.leaves(img)):
    img = multihost_utils.process_allgather(img, tiled=True)
  run.features = image_features.ensure(run.config, run.model.img, img,
                                       run.data_dir, info=run.info)


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


class _StopVote:
  """Every process's stop flag, OR-ed over all processes, one step late.

  A SIGTERM reaches one host at one step; stopping there alone would leave
  it in the save barrier while the others run the next step's collectives.
  Each step every process contributes its flag to a tiny jitted max over
  all devices; the result is read one step later (it is done by then, so
  the host never waits on the device for it), and all processes read the
  same value at the same step, so they stop after the same step. A single
  process uses its flag directly.
  """

  def __init__(self, mesh: jax.sharding.Mesh):
    self._mesh = mesh
    self._vote = None
    if jax.process_count() > 1:
      self._flags = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
      self._any = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))

  def __call__(self, requested: bool) -> bool:
    """Whether every process stops now (``requested``: this one's flag)."""
    if jax.process_count() == 1:
      return requested
    shards = [jax.device_put(np.full((1,), int(requested), np.int32), d)
              for d in self._flags.addressable_devices]
    flags = jax.make_array_from_single_device_arrays(
        (self._mesh.devices.size,), self._flags, shards)
    previous, self._vote = self._vote, self._any(flags)
    return previous is not None and bool(previous)


@contextlib.contextmanager
def _saves_finish_on_error(checkpoints: checkpointing.RunCheckpoints):
  """On an error in the loop, saves already started (all of checked, finite
  states) still finish before the error propagates."""
  try:
    yield
  except Exception:
    try:
      checkpoints.wait()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("a pending checkpoint save failed too: %s", e)
    raise


def _check_finite(step: int, pending: list[tuple[int, Any, Any]],
                  state: steps.TrainState) -> None:
  """Stops the run if a loss or an updated state since the last check is
  NaN/Inf, naming the first bad step (and for a state, the bad leaves)."""
  for s, loss, state_finite in pending:
    value = float(loss)
    if not math.isfinite(value):
      raise TrainingError(
          f"loss is {value} at step {s}: training stopped. Lower "
          "config.optim.lr, check the data (python -m data_prep.prepare "
          "reports bad rows), or use dtype=float32; the last good "
          f"checkpoint is kept (this step, {step}, was not saved)")
    if not bool(state_finite):
      raise TrainingError(
          f"the update of step {s} made the train state non-finite "
          f"(NaN/Inf at step {step} in {finite.describe(state)}): training "
          "stopped. Check config.optim (a NaN/Inf learning rate, "
          "clip_norm) and lower config.optim.lr; the last good checkpoint is "
          f"kept (nothing from step {s} on was saved)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any]:
  """Trains, evaluates and writes every output of one run; returns results.

  One model: late fusion (two runs and a mix) sits above the trainer, in
  :func:`mic_jax.baselines.late_fusion.run`, which the entry points choose.
  """
  if config.model.kind == "late":
    raise TrainingError(
        "late fusion is two runs and a mix, not one model: run it with "
        "mic_jax.baselines.late_fusion.run(config, workdir) (python -m "
        "mic_jax.main chooses it for a 'late' config)")
  reporting.ensure_dir(workdir)
  untuned = hostmem.untuned_warning(jax.default_backend())
  if untuned:
    logging.warning("%s", untuned)
  run = build_run(config, workdir)
  config = run.config
  if reporting.is_writer():
    reporting.write_json(rundir.path(workdir, rundir.CONFIG),
                         json.loads(config.to_json_best_effort()))
  checkpoints = checkpointing.RunCheckpoints(workdir,
                                             keep=config.keep_checkpoints,
                                             cleanup_tmp=True)
  state, how = init_state(run, checkpoints)
  start_step = int(state.step)
  # What a killed run wrote after the restored step is replayed, not kept.
  resumed_at = start_step if checkpoints.latest_step() is not None else None
  checkpoints.forget_best_after(resumed_at)
  summary.start(run, how, start_step)

  train_step = jit_train_step(run)
  evaluator = evaluation.Evaluator(run)
  data_sharding = shd.batch_sharding(run.mesh, run.rules)
  writer = reporting.create_writer(workdir)
  log = reporting.MetricsLog(workdir, keep_through_step=resumed_at)
  progress = reporting.Progress(start_step, config.total_steps,
                                config.batch_size)
  attach_image_features(run, state.params)
  batches = run.train_batches(start_step)

  # (step, device loss, device state-finite flag) since the last log.
  pending: list[tuple[int, Any, Any]] = []
  step = start_step
  vote = _StopVote(run.mesh)
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules), \
      _Preemption() as preempt, _saves_finish_on_error(checkpoints):
    if start_step == 0:
      _evaluate_and_keep_best(evaluator, state, 0, writer, log, checkpoints)
    while step < config.total_steps:
      batch = shd.host_to_global(next(batches), data_sharding)
      state, metrics = train_step(state, batch)
      step += 1
      faults.point("after_step")
      pending.append((step, metrics["train/loss"], metrics.pop(FINITE_METRIC)))
      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or is_last:
        _check_finite(step, pending, state)
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        record["train/loss"] = float(np.mean([float(l) for _, l, _ in pending]))
        record.update(progress.update(step))
        pending = []
        writer.write_scalars(step, {k: v for k, v in record.items()
                                    if k != "eta_seconds"})
        log.append({"step": step, **record})
        reporting.log_line(step, config.total_steps, record)
      if step % config.eval_every_steps == 0 or is_last:
        _check_finite(step, pending, state)
        _evaluate_and_keep_best(evaluator, state, step, writer, log,
                                checkpoints)
      stop = vote(preempt.requested) or checkpoints.reached_preemption(step)
      if step % config.checkpoint_every_steps == 0 or is_last or stop:
        _check_finite(step, pending, state)
        checkpoints.save_state(step, state, force=True)
      if stop:
        checkpoints.wait()
        log.close()
        raise SystemExit(f"preempted at step {step}; checkpoint saved, rerun "
                         "the same command to resume")
    checkpoints.wait()
    faults.point("trained")
  writer.flush()
  log.close()
  results = evaluator.final_report(checkpoints)
  faults.point("after_results")
  checkpoints.close()
  return results


def _evaluate_and_keep_best(evaluator, state, step, writer, log, checkpoints):
  faults.point("before_eval")
  report = evaluator.evaluate(state.params, "validation")
  scalars = {"validation/macro_f1": report["macro_f1"],
             "validation/accuracy": report["accuracy"]}
  writer.write_scalars(step, scalars)
  log.append({"step": step, **scalars})
  summary.evaluation_line(step, report)
  faults.point("after_eval")
  checkpoints.save_best(step, state.params, scalars)
