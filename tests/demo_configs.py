"""Short runs of the demo preset, for the tests that train.

One place for how a test shortens a demo run, so the trainer, late-fusion
and feature-cache tests cannot drift apart in how they build one.
"""

from __future__ import annotations

import ml_collections

from configs import common


def short_demo(kind: str, *, total_steps: int, log_every: int,
               eval_every: int, batch_size: int = 16,
               **overrides: object) -> ml_collections.ConfigDict:
  """The ``kind:demo`` config trained ``total_steps`` steps.

  Evaluates and checkpoints every ``eval_every`` steps. ``overrides`` are
  dotted fields (``**{"model.text_repr": "mean"}``), applied last; a typo
  raises. Callers that keep their own defaults pass
  ``**{"total_steps": 6, ..., **overrides}``, so a test can still change them.
  """
  config = common.make_config(kind, "demo")
  with config.unlocked():
    config.total_steps = total_steps
    config.log_every_steps = log_every
    config.eval_every_steps = eval_every
    config.checkpoint_every_steps = eval_every
    config.batch_size = batch_size
    for key, value in overrides.items():
      common.override(config, key, value)
  return config
