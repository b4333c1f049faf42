"""The linear anchors (title, photo, title + photo) and the Table-2 tool's rows."""

import json

import numpy as np
import pytest

import demo_configs
from mic_jax import reproduce
from mic_jax.baselines import linear_baseline
from mic_jax.data import demo

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  return str(demo.ensure_demo_dataset(root, max_length=16, image_size=32))


def test_titles_are_read_in_file_order_with_labels(demo_data):
  titles, labels = linear_baseline.read_titles(demo_data, "validation")
  assert len(titles) == len(labels) > 0
  assert all(isinstance(t, str) and t for t in titles)
  assert labels.min() >= 0


def test_baseline_picks_c_on_validation_and_writes_results(demo_data,
                                                          tmp_path):
  workdir = tmp_path / "baseline"
  results = linear_baseline.train_and_evaluate(demo_data, str(workdir),
                                               c_grid=(0.01, 10.0))
  saved = json.loads((workdir / "results.json").read_text())
  assert (saved["model"], saved["features"]) == ("logreg", "title")
  grid = {g["C"]: g["validation_macro_f1"] for g in saved["grid"]}
  # The chosen C is the validation argmax of the grid (test never looked at).
  assert saved["C"] == max(grid, key=grid.get)
  assert grid[10.0] > grid[0.01]  # A tiny C under-fits the titles.
  # The demo's titles name the family but never the colour: at most about
  # half the classes can be told apart from the title alone.
  ceiling = results["test"].get("text_only_max_accuracy", 0.55)
  assert 0.2 < results["test"]["accuracy"] <= ceiling + 0.05
  assert (workdir / "per_class_test.csv").exists()


def _photo_config(tmp_path, demo_data):
  """An image-only demo config with its (scratch) tower frozen and cached."""
  return demo_configs.short_demo(
      "image_only", total_steps=1, log_every=1, eval_every=1,
      **{"optim.freeze": "img", "data.demo": False, "data.dir": demo_data,
         "image.feature_cache_dir": str(tmp_path / "cache")})


def test_photo_rows_read_the_frozen_towers_class_token(demo_data, tmp_path):
  config = _photo_config(tmp_path, demo_data)
  vectors = linear_baseline.photo_vectors(config, str(tmp_path / "w"))
  titles = {s: linear_baseline.read_titles(demo_data, s)[1]
            for s in ("train", "validation", "test")}
  for split, (x, y) in vectors.items():
    np.testing.assert_array_equal(y, titles[split])  # Same order.
    # Last column: has a photo (the demo leaves 10% without one); a product
    # without one has an all-zero class-token block.
    flag = x[:, -1]
    assert set(np.unique(flag)) == {0.0, 1.0}
    assert not np.any(x[flag == 0, :-1])
    assert np.all(np.abs(x[flag == 1, :-1]).sum(1) > 0)


def test_title_and_photo_together_beat_each_alone(demo_data, tmp_path):
  """The demo's classes need the family (title) and the colour (photo), so
  one logistic regression on both must beat either block alone; the image
  weight is chosen on validation from the grid."""
  config = _photo_config(tmp_path, demo_data)
  scores = {}
  for features in linear_baseline.FEATURES:
    results = linear_baseline.train_and_evaluate(
        demo_data, str(tmp_path / features.replace("+", "_")),
        features=features, photo_config=config, c_grid=(1.0, 30.0),
        image_weights=(0.1, 1.0))
    scores[features] = results["validation"]["macro_f1"]
    if features == "title+photo":
      grid = {(g["image_weight"], g["C"]): g["validation_macro_f1"]
              for g in results["grid"]}
      assert len(grid) == 4
      assert grid[(results["image_weight"], results["C"])] == max(
          grid.values())
  assert scores["title+photo"] > max(scores["title"], scores["photo"]) + 0.1


def test_photo_rows_need_a_frozen_cached_tower(demo_data, tmp_path):
  config = _photo_config(tmp_path, demo_data)
  with config.unlocked():
    config.optim.freeze = ""
  with pytest.raises(ValueError, match="frozen photo tower"):
    linear_baseline.train_and_evaluate(demo_data, str(tmp_path / "x"),
                                       features="photo", photo_config=config)
  with pytest.raises(ValueError, match="needs photo_config"):
    linear_baseline.train_and_evaluate(demo_data, str(tmp_path / "y"),
                                       features="title+photo")


def test_reproduce_rows_configs():
  rows = {s.subdir: s for s in reproduce.SYSTEMS}
  assert {"title_baseline", "linear_photo", "linear_title_photo", "text_only",
          "image_only", "late_fusion", "early_fusion", "cross_modal",
          "cross_modal_no_photos"} <= set(rows)
  assert [rows[s].arg for s in ("title_baseline", "linear_photo",
                                "linear_title_photo")] == list(
                                    linear_baseline.FEATURES)
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


def test_photo_rows_need_a_pretrained_frozen_tower():
  row = next(s for s in reproduce.SYSTEMS if s.subdir == "image_only")
  config = lambda sets: reproduce.system_config(row, "small", "/d", "/r", sets)
  assert not reproduce.photo_rows_possible(config([]))  # Scratch tower.
  # The :small preset freezes a pretrained tower unless told otherwise.
  assert reproduce.photo_rows_possible(config(["image.checkpoint=ckpt"]))
  assert not reproduce.photo_rows_possible(config([
      "image.checkpoint=ckpt", "image.freeze_pretrained=0"]))
  assert reproduce.photo_rows_possible(config([
      "image.checkpoint=ckpt", "image.freeze_pretrained=0",
      "optim.freeze=img"]))
  assert not reproduce.photo_rows_possible(config([
      "image.checkpoint=ckpt", "optim.freeze=img",
      "image.cache_features=false"]))


def test_markdown_table_has_ablation_column():
  system = next(s for s in reproduce.SYSTEMS if s.subdir == "cross_modal")
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
