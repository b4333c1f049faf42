"""The TF-IDF + logistic-regression title baseline and the Table-2 tool's rows."""

import json

import numpy as np
import pytest

from mic_jax import reproduce
from mic_jax.data import demo
from mic_jax.train import title_baseline

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  return str(demo.ensure_demo_dataset(root, max_length=16, image_size=32))


def test_titles_are_read_in_file_order_with_labels(demo_data):
  titles, labels = title_baseline.read_titles(demo_data, "validation")
  assert len(titles) == len(labels) > 0
  assert all(isinstance(t, str) and t for t in titles)
  assert labels.min() >= 0


def test_baseline_picks_c_on_validation_and_writes_results(demo_data,
                                                          tmp_path):
  workdir = tmp_path / "baseline"
  results = title_baseline.train_and_evaluate(demo_data, str(workdir),
                                              c_grid=(0.01, 10.0))
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["model"] == "tfidf_logreg"
  grid = dict((c, f) for c, f in saved["C_grid"])
  # The chosen C is the validation argmax of the grid (test never looked at).
  assert saved["C"] == max(grid, key=grid.get)
  assert grid[10.0] > grid[0.01]  # A tiny C under-fits the titles.
  # The demo's titles name the family but never the colour: at most about
  # half the classes can be told apart from the title alone.
  ceiling = results["test"].get("text_only_max_accuracy", 0.55)
  assert 0.2 < results["test"]["accuracy"] <= ceiling + 0.05
  assert (workdir / "per_class_test.csv").exists()


def test_reproduce_rows_configs():
  rows = {s.subdir: s for s in reproduce.SYSTEMS}
  assert {"title_baseline", "text_only", "image_only", "late_fusion",
          "early_fusion", "cross_modal", "cross_modal_no_photos"} <= set(rows)
  config = reproduce.system_config(rows["cross_modal_no_photos"], "small",
                                   "/data", "/root",
                                   ["model.text_repr=mean", "image.size=112"])
  assert config.model.image_dropout == 1.0
  assert config.model.kind == "cross_modal"
  assert (config.model.text_repr, config.image.size) == ("mean", 112)
  plain = reproduce.system_config(rows["cross_modal"], "small", "/data",
                                  "/root", [])
  assert plain.model.image_dropout == 0.0
  with pytest.raises(AttributeError):
    reproduce.system_config(rows["text_only"], "small", "", "/root",
                            ["model.text_rep=mean"])
  assert rows["cross_modal"].fused and rows["late_fusion"].fused
  assert not rows["text_only"].fused


def test_markdown_table_has_ablation_column():
  system = reproduce.SYSTEMS[-2]
  r = {"validation": {"macro_f1": 0.5}, "test": {"macro_f1": 0.6,
                                                  "accuracy": 0.9}}
  ablation = {"test": {"photos_withheld": {"macro_f1": 0.4}}}
  table = reproduce.markdown([(system, r, ablation),
                              (reproduce.SYSTEMS[0], r, None)])
  lines = table.splitlines()
  assert lines[2] == ("| Fusion cross-modal | 0.500 | 0.600 | 0.900 | "
                      "0.400 |")
  assert lines[3].endswith("| 0.900 |  |")
  np.testing.assert_equal(len(lines), 4)
