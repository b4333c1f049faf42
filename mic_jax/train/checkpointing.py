"""Orbax checkpoints of a run: the latest states for resuming, the best params.

``workdir/checkpoints/<step>`` holds full train states (params, optimizer
state, step), the newest ``keep`` of them, written asynchronously so training
continues while they are written. ``workdir/best/<step>`` holds the
parameters with the best validation macro-F1 (Orbax keeps only the best),
also written asynchronously.

Crash safety: Orbax writes a step into a temporary directory and renames it
when complete, so a killed save leaves no step behind. A state save first
waits for every pending best save, so a durable state at step s implies
every best candidate up to s is durable. A resumed run replays the steps
after its restored state s; :meth:`RunCheckpoints.forget_best_after` drops
the best candidates after s first, so the replay offers them again in the
original order and Orbax keeps the same best (ties included) as a run never
interrupted. ``save_best`` and ``save_state`` skip a step already on disk.
A latest step that cannot be restored (truncated or
missing files, or a non-finite state) is moved to ``corrupt_checkpoints/``
with a warning and the previous step is used, but only when a previous step
restores; otherwise the error stands and nothing is moved.

Restores always go through an abstract target whose leaves carry the
*current* run's shardings, so a checkpoint written on one mesh restores onto
another. Likewise a checkpoint whose layer stacks are unrolled restores into
a run with ``config.model.scan_layers`` and back: the target is converted to
the checkpoint's layout (read from its metadata), and the restored tree to
the run's (:mod:`mic_jax.checkpoints.layer_stacks`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
import tensorflow as tf

from mic_jax.checkpoints import layer_stacks
from mic_jax.train import faults
from mic_jax.train import rundir

BEST_METRIC = "validation/macro_f1"


class RunCheckpoints:
  """The two checkpoint managers of a workdir."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True,
               cleanup_tmp: bool = False):
    """``cleanup_tmp``: delete temporary dirs of killed saves (the trainer
    sets it; readers of a run that may still be training must not)."""
    # Orbax's OCDBT saves need an absolute path, and refuse a relative one
    # only in the background thread of an async save, so a run started with
    # --workdir=runs/x would train on until the next save failed.
    if "://" not in os.fspath(workdir):
      workdir = os.path.abspath(workdir)
    self.latest = ocp.CheckpointManager(
        rundir.checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=cleanup_tmp, create=True))
    self.best = ocp.CheckpointManager(
        rundir.checkpoint_dir(workdir, best=True),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m[BEST_METRIC], best_mode="max",
            keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=cleanup_tmp, create=True))
    self.corrupt_dir = os.path.join(workdir, "corrupt_checkpoints")

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save_state(self, step: int, state: Any, *, force: bool = False) -> None:
    """Starts writing ``state`` as step ``step``; a step on disk is kept.

    Waits for pending best saves first: a state on disk must never be ahead
    of the best candidates evaluated before it.
    """
    self.best.wait_until_finished()
    faults.point("before_state_save")
    if step in self.latest.all_steps():
      logging.info("state of step %d already saved; keeping it", step)
      return
    self.latest.save(step, args=ocp.args.StandardSave(state), force=force)
    faults.point("state_saving")

  def restore_state(self, abstract_state: Any, step: int | None = None,
                    validate: Callable[[Any], str | None] | None = None
                    ) -> Any:
    """The newest restorable train state (or exactly ``step`` if given).

    Steps are tried newest first. A step that fails to restore, or that
    ``validate`` (returns an error text or None) rejects, is skipped with a
    warning; once an older step restores, the newer broken ones are moved to
    ``corrupt_checkpoints/`` so later saves can reuse their step numbers. If
    no step restores, a RuntimeError names every step's error and nothing
    moves (a changed model config must not cost a run its checkpoints).
    """
    if step is not None:
      return _restore_in_layout(self.latest, step, abstract_state,
                                ocp.args.StandardRestore)
    broken: list[tuple[int, str]] = []
    first_error: Exception | None = None
    for candidate in sorted(self.latest.all_steps(), reverse=True):
      logging.info("restoring train state from step %d", candidate)
      try:
        state = _restore_in_layout(self.latest, candidate, abstract_state,
                                   ocp.args.StandardRestore)
        problem = validate(state) if validate is not None else None
      except Exception as e:  # pylint: disable=broad-except
        first_error = first_error or e
        problem = f"{type(e).__name__}: {e}"
      if problem is None:
        if broken:
          self._quarantine([s for s, _ in broken])
        return state
      logging.warning("checkpoint step %d in %s is unusable (%s); trying the "
                      "previous step", candidate, self.latest.directory,
                      problem[:2000])
      broken.append((candidate, problem))
    raise RuntimeError(
        f"no restorable train state in {self.latest.directory} ("
        + "; ".join(f"step {s}: {why[:500]}" for s, why in broken)
        + "); nothing was moved. If the config changed since these steps "
        "were written, run with the one that wrote them (config.json in the "
        "workdir); only if the steps themselves are damaged, move that "
        "directory away, which starts the run again from its beginning and "
        "discards the trained state") from first_error

  def _quarantine(self, steps: list[int]) -> None:
    """Moves broken steps out of ``checkpoints/`` (process 0; all wait)."""
    if jax.process_index() == 0:
      tf.io.gfile.makedirs(self.corrupt_dir)
      for step in steps:
        source = os.path.join(os.fspath(self.latest.directory), str(step))
        target = os.path.join(self.corrupt_dir, f"{step}-{int(time.time())}")
        logging.warning("moving unusable checkpoint %s to %s", source, target)
        try:
          tf.io.gfile.rename(source, target)
        except (tf.errors.OpError, OSError) as e:  # Object stores: delete.
          logging.warning("could not move %s (%s); deleting it", source, e)
          tf.io.gfile.rmtree(source)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mic_jax corrupt steps moved")
    self.latest.reload()

  def save_best(self, step: int, params: Any, metrics: dict[str, float]
                ) -> None:
    """Offers ``params`` as the best; a step already on disk is kept.

    Asynchronous: the next :meth:`save_state` waits for it. A step already
    on disk needs no second save (replaying a step gives the same
    parameters bit for bit).
    """
    if step in self.best.all_steps():
      logging.info("best candidate of step %d already saved; keeping it",
                   step)
      return
    self.best.save(step, args=ocp.args.StandardSave(params),
                   metrics={BEST_METRIC: float(metrics[BEST_METRIC])},
                   force=True)
    faults.point("best_saving")

  def forget_best_after(self, step: int | None) -> None:
    """Deletes best candidates after ``step`` (all of them if None).

    Called on (re)start with the restored step: the replay evaluates those
    steps again and offers them in their original order.
    """
    for candidate in sorted(self.best.all_steps()):
      if step is None or candidate > step:
        logging.info("dropping best candidate %d (after the restored step "
                     "%s; it will be evaluated again)", candidate, step)
        self.best.delete(candidate)

  def best_step(self) -> int | None:
    return self.best.best_step()

  def restore_best(self, abstract_params: Any) -> tuple[int, Any]:
    self.best.wait_until_finished()
    step = self.best.best_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint in {self.best.directory}")
    return step, _restore_in_layout(self.best, step, abstract_params,
                                    ocp.args.StandardRestore)

  def reached_preemption(self, step: int) -> bool:
    return self.latest.reached_preemption(step)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


def _locate(directory: str) -> tuple[str, int] | None:
  """(manager directory, step) that ``directory`` names, if any."""
  directory = directory.rstrip("/")
  name = os.path.basename(directory)
  if name.isdigit():  # One step: best/N or checkpoints/N.
    return os.path.dirname(directory), int(name)
  managers = (rundir.BEST, rundir.CHECKPOINTS)
  subs = managers if name not in managers else ("",)
  for sub in subs:
    path = os.path.join(directory, sub) if sub else directory
    if not tf.io.gfile.isdir(path):
      continue
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        read_only=True))
    step = (manager.best_step() if os.path.basename(path) == rundir.BEST
            else manager.latest_step())
    manager.close()
    if step is not None:
      return path, step
  return None


def restore_params_from(directory: str, abstract_params: Any) -> Any:
  """Params of a checkpoint written by another run (``config.init_checkpoint``).

  Accepts a run's workdir (its best checkpoint, else its latest state), a
  ``best/`` or ``checkpoints/`` directory, or one step directory in them.
  """
  found = _locate(directory)
  if found is None:
    raise FileNotFoundError(
        f"{directory!r}: no Orbax checkpoint found (give a run's workdir, its "
        "checkpoints/ or best/ directory, or one step directory)")
  manager_dir, step = found
  manager = ocp.CheckpointManager(manager_dir,
                                  options=ocp.CheckpointManagerOptions(
                                      read_only=True))
  try:
    if os.path.basename(manager_dir) == rundir.CHECKPOINTS:  # Full train states.
      def params_of_state(target):
        return ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": jax.tree.map(_restore_arg, target)},
            partial_restore=True)
      return _restore_in_layout(manager, step, abstract_params,
                                params_of_state, key="params")
    return _restore_in_layout(manager, step, abstract_params,
                              ocp.args.StandardRestore)
  finally:
    manager.close()


def _restore_in_layout(manager: ocp.CheckpointManager, step: int,
                       abstract: Any, make_args: Callable[[Any], Any],
                       key: str | None = None) -> Any:
  """Restores ``step`` into ``abstract``'s layer layout and shardings.

  The checkpoint's layout (unrolled ``layer_{i}`` or stacked ``layer``) is
  read from its metadata; when it differs from ``abstract``'s, the restore
  target is converted to it first and the restored tree back afterwards,
  then placed with ``abstract``'s shardings. ``key``: the restored item's
  entry that holds the tree (for partial restores).
  """
  saved = layer_stacks.layout(_tree_metadata(manager, step))
  wanted = layer_stacks.layout(abstract)
  differs = any(saved.get(name, form) != form for name, form in wanted.items())
  target = layer_stacks.to_layout(abstract, saved) if differs else abstract
  restored = manager.restore(step, args=make_args(target))
  if key is not None:
    restored = restored[key]
  if not differs:
    return restored
  logging.info("converting checkpoint step %d from layer layout %s to %s",
               step, saved, wanted)
  converted = layer_stacks.to_layout(restored, wanted)
  return jax.tree.map(
      lambda x, a: x if a.sharding is None else jax.device_put(x, a.sharding),
      converted, abstract)


def _tree_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
  """The saved tree's metadata (names, shapes) of ``step``.

  A manager opened only to read knows no item handler yet and gives None;
  the step's ``default`` item is then read directly.
  """
  metadata = manager.item_metadata(step)
  if metadata is None:
    path = os.path.join(os.fspath(manager.directory), str(step), "default")
    metadata = ocp.PyTreeCheckpointer().metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
  return metadata


def _restore_arg(x: Any) -> ocp.ArrayRestoreArgs:
  return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                              dtype=x.dtype)
