"""What the photo contributes: gate values, per-class ablation, linear gap."""

import csv
import json

import numpy as np
import pytest

import demo_configs
from mic_jax import trainer
from mic_jax.analysis import ablation, contribution


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("contribution")
  config = demo_configs.short_demo(
      "cross_modal", total_steps=30, log_every=10, eval_every=30,
      **{"fusion.image_to_head": True})
  workdir = str(tmp / "run")
  trainer.train_and_evaluate(config, workdir)
  return workdir, tmp


def test_report_matches_the_ablation_and_names_the_classes(trained):
  workdir, tmp = trained
  labels = [l.strip() for l in open(f"{workdir}/demo_data/prepared/"
                                    "labels.txt")]
  # A photo-only linear report that is perfect on the first class and
  # useless on the others (the CSV format linear_baseline writes).
  linear = tmp / "linear_photo"
  linear.mkdir()
  with open(linear / "per_class_validation.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["label_id", "label", "precision", "recall", "f1", "support"])
    for i, name in enumerate(labels):
      w.writerow([i, name, 1, 1, 1.0 if i == 0 else 0.0, 10])
  r = contribution.photo_contribution(workdir, "validation",
                                            str(linear))
  totals = ablation.photo_ablation(workdir, ("validation",))
  assert r["macro_f1_with_photos"] == pytest.approx(
      totals["validation"]["with_photos"]["macro_f1"])
  assert r["macro_f1_photos_withheld"] == pytest.approx(
      totals["validation"]["photos_withheld"]["macro_f1"])
  gains = [row["photo_gain"] for row in r["per_class"]]
  assert gains == sorted(gains, reverse=True)
  assert r["classes_helped"] == sum(g > 0 for g in gains)
  for row in r["per_class"]:
    assert row["photo_gain"] == pytest.approx(
        row["f1_with_photos"] - row["f1_photos_withheld"])
    assert 0.0 <= row["mean_gate"] <= 1.0
  gate = r["gate"]
  assert 0.0 < gate["mean"] < 1.0
  assert sum(gate["histogram"]["counts"]) == gate["products_with_photo"]
  q = [gate["quantiles"][k] for k in ("0.05", "0.25", "0.5", "0.75", "0.95")]
  assert q == sorted(q)
  assert 0.0 < r["head_image_share"] < 1.0
  beats = r["photo_linear_beats_fused"]
  fused_first = next(row for row in r["per_class"] if row["label"] == labels[0])
  assert [b["label"] for b in beats] == (
      [labels[0]] if fused_first["f1_with_photos"] < 1.0 else [])
  saved = json.loads(open(f"{workdir}/photo_contribution_validation.json")
                     .read())
  assert saved["per_class"] == r["per_class"]
  text = open(f"{workdir}/photo_contribution_validation.md").read()
  assert "Visual gate (eq. 3)" in text and "photo-only linear" in text
  png = open(f"{workdir}/photo_contribution_validation.png", "rb").read()
  assert png.startswith(b"\x89PNG")


def test_gate_values_are_per_product_means_over_real_tokens(trained):
  workdir, _ = trained
  from mic_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mic_jax.evaluation import reporting  # pylint: disable=g-import-not-at-top
  from mic_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  run = trainer.build_run(reporting.read_config(workdir), workdir)
  ckpt = checkpointing.RunCheckpoints(workdir, keep=1, async_save=False)
  _, params = ckpt.restore_best(run.abstract_state.params)
  ckpt.close()
  gate, labels, present = contribution.gate_values(run, params,
                                                         "validation")
  assert len(gate) == len(labels) == run.info.split_size("validation")
  assert not np.any(gate[present == 0])  # No photo: the gate is shut.
  # The first batch, by hand from the sown gate [B, L, D].
  batch = next(pipeline.eval_batches(run.data_dir, "validation",
                                     batch_size=8,
                                     image_size=run.config.image.size))
  _, state = run.model.apply({"params": params}, batch, train=False,
                             mutable=["intermediates"])
  g = np.asarray(state["intermediates"]["fusion"]["gate"][0]).mean(-1)
  m = batch["attention_mask"] > 0
  want = (g * m).sum(1) / m.sum(1)
  np.testing.assert_allclose(gate[:8], want, atol=1e-5)
