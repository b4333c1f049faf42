r"""Trains the paper's five systems on one prepared data set: Table 2.

  python -m mic_jax.reproduce --preset=small --data_dir=PREPARED \
      --workdir=runs/table2 [--set=total_steps=1500 --set=seed=1]

Writes ``WORKDIR/<system>/`` (a normal run each; late fusion reuses the
text-only and image-only runs) and ``WORKDIR/table2.md``, a markdown table of
validation and test macro-F1 and accuracy. Finished runs (with a
``results.json``) are not trained again, so an interrupted reproduction
continues where it stopped.
"""

from __future__ import annotations

import importlib
import json
import os

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from configs import common

SYSTEMS = (  # (row name, config module, config argument suffix)
    ("Text-BERT", "text_only", ""),
    ("Image-ViT", "image_only", ""),
    ("Fusion-late", "late_fusion", ""),
    ("Fusion-early", "early_fusion", ""),
    ("Fusion cross-modal", "cross_modal", ""),
)
BIT = ("Image-BiT", "image_only", "image=bit")

_PRESET = flags.DEFINE_enum("preset", "small", ["paper", "small", "demo"],
                            "Config preset for every system.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Prepared data (data_prep "
                                "output); empty only for the demo preset.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root of the five runs.")
_WITH_BIT = flags.DEFINE_bool("with_bit", False, "Also train image-only BiT.")
_SET = flags.DEFINE_multi_string("set", [], "Config overrides KEY=VALUE "
                                 "applied to every system, e.g. seed=1.")
flags.mark_flag_as_required("workdir")


def _config(module: str, arg: str, workdir: str):
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  with config.unlocked():
    if _DATA_DIR.value:
      config.data.dir = _DATA_DIR.value
      config.data.demo = False
    if module == "late_fusion":
      config.late.text_workdir = os.path.join(workdir, "text_only")
      config.late.image_workdir = os.path.join(workdir, "image_only")
  for item in _SET.value:
    key, value = item.split("=", 1)
    old = common.get_field(config, key)  # Raises on a typo.
    common.override(config, key, type(old)(value) if not isinstance(
        old, bool) else value.lower() in ("1", "true", "yes"))
  return config


def main(argv):
  del argv
  from mic_jax.train import trainer  # pylint: disable=g-import-not-at-top
  root = _WORKDIR.value
  tf.io.gfile.makedirs(root)
  systems = list(SYSTEMS) + ([BIT] if _WITH_BIT.value else [])
  rows = []
  for name, module, extra in systems:
    arg = ",".join(filter(None, [_PRESET.value, extra]))
    subdir = module if not extra else f"{module}_{extra.split('=')[1]}"
    workdir = os.path.join(root, subdir)
    results_path = os.path.join(workdir, "results.json")
    if not tf.io.gfile.exists(results_path):
      logging.info("=== %s: configs/%s.py:%s -> %s", name, module, arg, workdir)
      trainer.train_and_evaluate(_config(module, arg, root), workdir)
    with tf.io.gfile.GFile(results_path) as f:
      results = json.load(f)
    rows.append((name, results))
  lines = ["| Model | val macro-F1 | test macro-F1 | test accuracy |",
           "|---|---:|---:|---:|"]
  for name, r in rows:
    extra = f" (alpha={r['alpha']:.2f})" if "alpha" in r else ""
    lines.append(f"| {name}{extra} | {r['validation']['macro_f1']:.3f} | "
                 f"{r['test']['macro_f1']:.3f} | {r['test']['accuracy']:.3f} |")
  table = "\n".join(lines) + "\n"
  with tf.io.gfile.GFile(os.path.join(root, "table2.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
