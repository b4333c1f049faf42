"""The built-in demo: a catalogue that needs both modalities, and the demo job.

The demo is the README's main-job command, so its promise is tested as
stated: the full demo run (default config, 300 steps) must beat the best
accuracy any single-modality model could reach on the same split.
"""

import csv
import json

import pytest

from configs import common
from mic_jax import trainer
from mic_jax.analysis import ablation as photo_ablation
from mic_jax.data import demo


def test_catalogue_hides_colour_from_titles_and_family_from_photos(tmp_path):
  csv_path = demo.write_catalogue(tmp_path, image_size=32, seed=3,
                                  num_products=800)
  rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
  assert len(rows) == 800 and {r["label"] for r in rows} == set(demo.labels())
  for r in rows:
    assert not any(c in r["title"] for c in demo.COLOURS), r
  no_photo = sum(not r["image"] for r in rows) / len(rows)
  assert 0.05 < no_photo < 0.15
  vocab = (tmp_path / "tokenizer" / "vocab.txt").read_text().split()
  assert vocab[:5] == demo.SPECIAL


def test_single_modality_ceilings_match_the_design(tmp_path):
  demo.write_catalogue(tmp_path / "raw", image_size=32, seed=0)
  for split in ("validation", "test"):
    c = demo.single_modality_ceilings(tmp_path, split)
    # Family known for ~90% of titles -> ~0.9 * 1/2 + 0.1 * 1/8 = 0.46.
    assert 0.38 < c["text_only_max_accuracy"] < 0.56, c
    # Colour known for ~90% of photos -> ~0.9 * 1/4 + 0.1 * 1/8 = 0.24.
    assert 0.18 < c["image_only_max_accuracy"] < 0.34, c
  with pytest.raises(ValueError, match="no train2 rows"):
    demo.single_modality_ceilings(tmp_path, "train2")


def test_demo_job_beats_both_single_modality_ceilings(tmp_path):
  """The README's main job, unchanged: cross-modal fusion on the demo."""
  results = trainer.train_and_evaluate(
      common.make_config("cross_modal", "demo"), str(tmp_path / "run"))
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  for split in ("validation", "test"):
    r = saved[split]
    assert r["accuracy"] > r["text_only_max_accuracy"] + 0.2, r
    assert r["accuracy"] > r["image_only_max_accuracy"] + 0.2, r
  # Without photos the same model is a text model: it falls to (at most a
  # hair above, by luck) the best any title-only model can do.
  ablation = photo_ablation.photo_ablation(str(tmp_path / "run"), ["test"])
  test = ablation["test"]
  for key in ("macro_f1", "accuracy", "num_examples"):
    assert test["with_photos"][key] == pytest.approx(saved["test"][key])
  assert (test["photos_withheld"]["accuracy"]
          < saved["test"]["text_only_max_accuracy"] + 0.05), ablation
  # The program: a quiet console (its table), the rest in its log file.
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  done = subprocess.run(
      [sys.executable, "-m", "mic_jax.tools.photo_ablation",
       f"--workdir={tmp_path / 'run'}", "--splits=test"],
      capture_output=True, text=True, timeout=600, check=True)
  console_text = done.stdout + done.stderr
  assert "| split | macro-F1 with photos | photos withheld |" in done.stdout
  assert "| test | " in done.stdout, done.stdout
  for noise in ("INFO", "orbax", "absl", "oneDNN"):
    assert noise not in console_text, console_text[-3000:]
  log = (tmp_path / "run" / "photo_ablation.log").read_text()
  assert "photo_ablation started" in log and " absl " in log, log[-3000:]
  with pytest.raises(ValueError, match="reads photos"):
    text_run = tmp_path / "text"
    text_run.mkdir()
    config = common.make_config("text_only", "demo")
    (text_run / "config.json").write_text(config.to_json())
    photo_ablation.photo_ablation(str(text_run))
