"""What the photo contributes to a trained fused model, and why so little.

Three views of one run's best checkpoint on one split (validation by
default: the split choices are made on):

* **the visual gate of eq. (3)**, ``VG_i = sigmoid(W_1 h_i + W_2 v_0 + b)``,
  averaged per product over its real title tokens and the width: how far
  the cross-attention term is let into ``h'`` (cross-modal runs only);
* **the photo ablation per class**: F1 of every class with its photos and
  with every photo withheld (:mod:`mic_jax.analysis.ablation` gives the
  totals), so one sees which categories lean on the photo;
* **what a linear photo model gets that the fused model does not**: with
  the per-class report of the photo-only linear anchor
  (:mod:`mic_jax.baselines.linear_baseline`, a ``per_class_<split>.csv``),
  the classes where that model's F1 is higher than the fused model's.

With ``fusion.image_to_head`` the head also reads the photo's global token;
the share of the head's weight norm on that block is reported too.

Writes ``WORKDIR/photo_contribution_<split>.json`` and ``.md``, and
``photo_contribution_<split>.png`` (gate histogram and per-class F1 with and
without photos).
"""

from __future__ import annotations

import csv
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from mic_jax import sharding as shd
from mic_jax.analysis import ablation
from mic_jax.data import pipeline
from mic_jax.evaluation import reporting

GATE_BINS = 20


def _gate_fn(model):
  """Per-example mean gate over real tokens and width (float32 ``[B]``)."""

  def gates(params, batch):
    _, state = model.apply({"params": params}, batch, train=False,
                           mutable=["intermediates"])
    gate = state["intermediates"]["fusion"]["gate"][0].astype(jnp.float32)
    tokens = (batch["attention_mask"] > 0).astype(jnp.float32)
    per_token = gate.mean(-1)
    return (per_token * tokens).sum(-1) / jnp.maximum(tokens.sum(-1), 1.0)

  return jax.jit(gates)


def gate_values(run: Any, params: Any, split: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(gate [N], label [N], image_present [N])`` of every product of ``split``."""
  features = run.features
  batch_size = shd.per_host_batch_size(int(run.config.data.eval_batch_size
                                           or run.config.batch_size))
  batches = pipeline.eval_batches(run.data_dir, split, batch_size=batch_size,
                                  image_size=run.config.image.size,
                                  image_keys=features is not None,
                                  info=run.info)
  if features is not None:
    batches = features.attach(batches)
  fn = _gate_fn(run.model)
  sharding = shd.batch_sharding(run.mesh, run.rules)
  gates, labels, present = [], [], []
  for batch in batches:
    keep = batch["mask"] > 0
    values = np.asarray(fn(params, shd.host_to_global(batch, sharding)))
    gates.append(values[keep])
    labels.append(batch["label"][keep])
    present.append(batch["image_present"][keep])
  return (np.concatenate(gates), np.concatenate(labels).astype(np.int64),
          np.concatenate(present))


def read_per_class_f1(path: str) -> dict[str, float]:
  """``{label: F1}`` of a ``per_class_<split>.csv`` (classes with support)."""
  with tf.io.gfile.GFile(path) as f:
    return {row["label"]: float(row["f1"]) for row in csv.DictReader(f)
            if int(row["support"]) > 0}


def _head_image_share(params: Any, text_width: int) -> float | None:
  """Share of the head kernel's norm on the photo block (image_to_head)."""
  kernel = np.asarray(params["head"]["output"]["kernel"], np.float64)
  if kernel.shape[0] <= text_width:
    return None
  total = np.linalg.norm(kernel)
  return float(np.linalg.norm(kernel[text_width:]) / max(total, 1e-12))


def photo_contribution(workdir: str, split: str = "validation",
                       photo_linear_workdir: str = "") -> dict[str, Any]:
  """The three views above for the best checkpoint of ``workdir``."""
  best = ablation.restore_best(workdir)
  run, step, params = best.run, best.step, best.params
  config = run.config
  labels = list(run.info.labels)
  reports = best.reports(split)
  with_f1, without_f1 = (np.asarray(reports[n]["f1"]) for n in reports)
  support = np.asarray(reports["with_photos"]["support"])
  per_class = sorted(
      ({"label": labels[i], "support": int(support[i]),
        "f1_with_photos": float(with_f1[i]),
        "f1_photos_withheld": float(without_f1[i]),
        "photo_gain": float(with_f1[i] - without_f1[i])}
       for i in range(len(labels)) if support[i] > 0),
      key=lambda r: -r["photo_gain"])
  results: dict[str, Any] = {
      "workdir": workdir, "split": split, "best_step": step,
      "model": config.model.kind,
      "macro_f1_with_photos": reports["with_photos"]["macro_f1"],
      "macro_f1_photos_withheld": reports["photos_withheld"]["macro_f1"],
      "classes_helped": sum(r["photo_gain"] > 0 for r in per_class),
      "classes_hurt": sum(r["photo_gain"] < 0 for r in per_class),
      "per_class": per_class,
  }
  if config.model.kind == "cross_modal" and config.fusion.get("gate", True):
    gate, gate_labels, present = gate_values(run, params, split)
    with_photo = gate[present > 0]
    counts, edges = np.histogram(with_photo, bins=GATE_BINS, range=(0, 1))
    results["gate"] = {
        "mean": float(with_photo.mean()), "std": float(with_photo.std()),
        "quantiles": {str(q): float(np.quantile(with_photo, q))
                      for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "products_with_photo": int(len(with_photo)),
    }
    by_class = {labels[c]: float(gate[(gate_labels == c) & (present > 0)]
                                 .mean())
                for c in np.unique(gate_labels[present > 0])}
    for row in per_class:
      row["mean_gate"] = by_class.get(row["label"])
  width = int(run.model.txt.config.hidden_size) if run.model.txt else 0
  if config.fusion.get("image_to_head") and width:
    results["head_image_share"] = _head_image_share(params, width)
  if photo_linear_workdir:
    linear = read_per_class_f1(os.path.join(photo_linear_workdir,
                                            f"per_class_{split}.csv"))
    results["photo_linear_workdir"] = photo_linear_workdir
    results["photo_linear_beats_fused"] = sorted(
        ({"label": r["label"], "support": r["support"],
          "f1_photo_linear": linear[r["label"]],
          "f1_fused": r["f1_with_photos"]}
         for r in per_class if linear.get(r["label"], 0.0) > r["f1_with_photos"]),
        key=lambda r: r["f1_fused"] - r["f1_photo_linear"])
  if reporting.is_writer():
    base = os.path.join(workdir, f"photo_contribution_{split}")
    reporting.write_json(base + ".json", results)
    with tf.io.gfile.GFile(base + ".md", "w") as f:
      f.write(markdown(results))
    _plot(base + ".png", results)
  return results


def markdown(results: dict[str, Any], top: int = 10) -> str:
  """The findings as a short report: totals, gate, the classes that move."""
  r = results
  lines = [f"# Photo contribution: {r['workdir']} ({r['split']}, best step "
           f"{r['best_step']})", "",
           f"macro-F1 with photos {r['macro_f1_with_photos']:.3f}, photos "
           f"withheld {r['macro_f1_photos_withheld']:.3f} "
           f"({r['classes_helped']} classes helped by the photo, "
           f"{r['classes_hurt']} hurt)."]
  if "gate" in r:
    g = r["gate"]
    q = g["quantiles"]
    lines += ["", f"Visual gate (eq. 3), mean over title tokens and width, "
              f"{g['products_with_photo']} products with a photo: mean "
              f"{g['mean']:.3f}, 5/50/95% {q['0.05']:.3f} / {q['0.5']:.3f} / "
              f"{q['0.95']:.3f}."]
  if r.get("head_image_share") is not None:
    lines += ["", f"Share of the head's weight norm on the photo token: "
              f"{r['head_image_share']:.3f}."]
  lines += ["", f"Classes the photo helps most (top {top}):", "",
            "| class | n | F1 with photos | photos withheld | gain |",
            "|---|---:|---:|---:|---:|"]
  for row in r["per_class"][:top]:
    lines.append(f"| {row['label']} | {row['support']} | "
                 f"{row['f1_with_photos']:.3f} | "
                 f"{row['f1_photos_withheld']:.3f} | "
                 f"{row['photo_gain']:+.3f} |")
  if "photo_linear_beats_fused" in r:
    beats = r["photo_linear_beats_fused"]
    lines += ["", f"Classes the photo-only linear model gets right more often "
              f"than the fused model: {len(beats)}", "",
              "| class | n | F1 photo-only linear | F1 fused |",
              "|---|---:|---:|---:|"]
    for row in beats[:top]:
      lines.append(f"| {row['label']} | {row['support']} | "
                   f"{row['f1_photo_linear']:.3f} | {row['f1_fused']:.3f} |")
  return "\n".join(lines) + "\n"


def _plot(path: str, results: dict[str, Any]) -> None:
  # pylint: disable=g-import-not-at-top
  from mic_jax.evaluation import plots
  # pylint: enable=g-import-not-at-top
  plots.photo_contribution(path, results)
