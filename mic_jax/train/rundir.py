"""The one owner of a run directory's layout: which file is where.

A training run (``python -m mic_jax.main --workdir=W``) leaves::

  W/config.json          the resolved config (written first)
  W/metrics.jsonl        one JSON line per logged step
  W/results.json         validation and test metrics of the best checkpoint
  W/calibration.json     the temperature fitted on validation
  W/photo_ablation.json  figures with every photo withheld (when measured)
  W/checkpoints/<step>/  Orbax train states (resume)
  W/best/<step>/         Orbax parameters of the best validation step
  W/demo_data/           the built-in demo catalogue (raw/, prepared/)

Every module that reads or writes one of these asks this module for its
path (and reads ``config.json`` / ``results.json`` through it), so a change
of layout is made here once. Paths are strings (``gs://`` works).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import tensorflow as tf

from mic_jax.data import demo

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CALIBRATION = "calibration.json"
PHOTO_ABLATION = "photo_ablation.json"
CHECKPOINTS = "checkpoints"
BEST = "best"
DEMO_DATA = "demo_data"  # Its inside is mic_jax.data.demo's (raw/, prepared/).


def path(workdir: str | os.PathLike[str], name: str) -> str:
  """``workdir/name`` for one of this module's names."""
  return os.path.join(os.fspath(workdir), name)


def checkpoint_dir(workdir: str | os.PathLike[str],
                   step: int | None = None, *, best: bool = False) -> str:
  """``checkpoints/`` (or ``best/``), or one step's directory in it."""
  root = path(workdir, BEST if best else CHECKPOINTS)
  return root if step is None else os.path.join(root, str(step))


def demo_dir(workdir: str | os.PathLike[str]) -> str:
  """Where a demo run generates and prepares its catalogue."""
  return path(workdir, DEMO_DATA)


def data_dir(config: ml_collections.ConfigDict,
             workdir: str | os.PathLike[str]) -> str:
  """The prepared data a run with ``config`` trains on."""
  if config.data.demo:
    return os.path.join(demo_dir(workdir), demo.PREPARED)
  return str(config.data.dir)


def has_results(workdir: str | os.PathLike[str]) -> bool:
  """Whether the run finished (its ``results.json`` exists)."""
  return tf.io.gfile.exists(path(workdir, RESULTS))


def read_json(workdir: str | os.PathLike[str], name: str) -> Any:
  """A JSON file of the run; a missing one raises naming it."""
  file = path(workdir, name)
  if not tf.io.gfile.exists(file):
    raise FileNotFoundError(f"{file} not found: not a (finished) mic_jax "
                            "training run")
  with tf.io.gfile.GFile(file) as f:
    return json.load(f)


def read_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """The resolved config the run saved as ``config.json``."""
  return ml_collections.ConfigDict(read_json(workdir, CONFIG))


def read_results(workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """The run's ``results.json``."""
  return read_json(workdir, RESULTS)
