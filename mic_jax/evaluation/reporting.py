"""What a run leaves in its workdir for people and scripts to read.

* ``metrics.jsonl``: one JSON object per logged step, appended and flushed
  (and fsynced) as the step completes, so a crash keeps every line already
  logged; a resumed run first drops the lines after its restored step (it
  logs those steps again) and appends after the rest.
* ``results.json``: validation and test metrics of the best checkpoint.
* ``per_class_<split>.csv``: precision / recall / F1 / support per label,
  worst F1 first.
* ``top_confusions_<split>.csv``: the most frequent (true, predicted) pairs.
* TensorBoard events and stdout, through CLU's metric writers.

Only process 0 writes files; the other hosts log to stdout.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
import time
from typing import Any, Mapping, Sequence

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from mic_jax import console
from mic_jax.evaluation import metrics
from mic_jax.train import rundir


def is_writer() -> bool:
  return jax.process_index() == 0


def _plain(value: Any) -> Any:
  """JSON-safe scalars and lists from numpy / jax values."""
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, "tolist"):
    return value.tolist()
  return value


def write_text(path: str | os.PathLike[str], text: str) -> None:
  """Writes a file atomically (temp name + rename): never half a file."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
  """Writes JSON atomically."""
  write_text(path, json.dumps(_plain(payload), indent=2, sort_keys=True) + "\n")


class MetricsLog:
  """Appends one JSON line per logged step to ``workdir/metrics.jsonl``.

  ``keep_through_step``: on resume, the restored step; lines of later steps
  (and a line a kill cut short) are dropped first, since the resumed run
  logs those steps again. ``None`` (a fresh start) drops every line.
  """

  def __init__(self, workdir: str, keep_through_step: int | None = None):
    self.path = rundir.path(workdir, rundir.METRICS)
    self._lines: list[str] = []
    if is_writer() and tf.io.gfile.exists(self.path):
      with tf.io.gfile.GFile(self.path) as f:
        lines = f.read().splitlines()
      self._lines = [l for l in lines
                     if _logged_at_or_before(l, keep_through_step)]
      if self._lines != lines:
        logging.info("metrics.jsonl: dropping %d line(s) after step %s",
                     len(lines) - len(self._lines), keep_through_step)
        write_text(self.path, "".join(l + "\n" for l in self._lines))
    self._file = open(self.path, "a", encoding="utf-8") if is_writer() and \
        not is_remote(workdir) else None

  def append(self, record: Mapping[str, Any]) -> None:
    line = json.dumps(_plain(dict(record)), sort_keys=True)
    if self._file is not None:
      self._file.write(line + "\n")
      self._file.flush()
      os.fsync(self._file.fileno())
    elif is_writer():  # Object stores have no append: rewrite the file.
      self._lines.append(line)
      write_text(self.path, "\n".join(self._lines) + "\n")

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def _logged_at_or_before(line: str, step: int | None) -> bool:
  if step is None:
    return False
  try:
    return int(json.loads(line)["step"]) <= step
  except (ValueError, KeyError, TypeError):  # Cut short by a kill.
    return False


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of ``metrics.jsonl`` (the last record wins per step)."""
  path = rundir.path(workdir, rundir.METRICS)
  if not tf.io.gfile.exists(path):
    return []
  by_step: dict[int, dict[str, Any]] = {}
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved as ``config.json`` (gs:// paths work)."""
  return rundir.read_config(workdir)


class Progress:
  """Steps/s, examples/s and ETA between two logged steps."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._t0, self._s0 = time.monotonic(), start_step
    self._last_t, self._last_step = self._t0, start_step

  def update(self, step: int) -> dict[str, float]:
    now = time.monotonic()
    dt = max(now - self._last_t, 1e-9)
    steps_per_s = (step - self._last_step) / dt
    overall = (step - self._s0) / max(now - self._t0, 1e-9)
    eta = (self.total_steps - step) / overall if overall > 0 else float("inf")
    self._last_t, self._last_step = now, step
    return {"train/steps_per_sec": steps_per_s,
            "train/examples_per_sec": steps_per_s * self.batch_size,
            "eta_seconds": eta}

  @staticmethod
  def format_eta(seconds: float) -> str:
    if not np.isfinite(seconds):
      return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events in ``workdir`` plus stdout logging (process 0)."""
  return metric_writers.create_default_writer(
      workdir, just_logging=not is_writer(), asynchronous=False)


def write_per_class_csv(path: str, report: Mapping[str, Any],
                        labels: Sequence[str]) -> None:
  """One row per class: id, name, precision, recall, F1, support.

  Worst first (:func:`metrics.per_class_order`: F1 ascending, then support
  descending; classes neither in the labels nor predicted last), so that
  at a thousand classes the top of the file is the list of classes to
  look at; ``label_id`` gives the class order back.
  """
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    writer = csv.writer(f)
    writer.writerow(["label_id", "label", "precision", "recall", "f1",
                     "support"])
    for i in metrics.per_class_order(dict(report)).tolist():
      writer.writerow([i, labels[i], f"{report['precision'][i]:.6f}",
                       f"{report['recall'][i]:.6f}", f"{report['f1'][i]:.6f}",
                       int(report["support"][i])])
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_top_confusions_csv(path: str, confusions: Sequence[Mapping[str, Any]],
                             labels: Sequence[str]) -> None:
  """The largest off-diagonal cells (:func:`metrics.top_confusions`), one
  row each, largest first: what the confusion matrix says, at any size."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    writer = csv.writer(f)
    writer.writerow(["true_id", "true", "predicted_id", "predicted", "count",
                     "fraction_of_true"])
    for row in confusions:
      writer.writerow([row["true"], labels[row["true"]], row["predicted"],
                       labels[row["predicted"]], row["count"],
                       f"{row['fraction']:.6f}"])
  tf.io.gfile.rename(tmp, path, overwrite=True)


def log_line(step: int, total: int, record: Mapping[str, Any]) -> None:
  """The progress line of a logged step, on the console."""
  console.say(
      "step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.1f ex/s  ETA %s",
      step, total, record.get("train/loss", float("nan")),
      record.get("train/learning_rate", float("nan")),
      record.get("train/grad_norm", float("nan")),
      record.get("train/examples_per_sec", float("nan")),
      Progress.format_eta(record.get("eta_seconds", float("inf"))))


def ensure_dir(path: str) -> None:
  if is_writer():
    tf.io.gfile.makedirs(path)


def is_remote(path: str) -> bool:
  """True for gs:// and other ``scheme://`` paths (tf.io.gfile only)."""
  return "://" in os.fspath(path)


def local_path(path: str) -> pathlib.Path | None:
  """A pathlib path for local directories, None for gs:// and the like."""
  return None if is_remote(path) else pathlib.Path(path)
