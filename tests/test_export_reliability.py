"""Export and Predictor against the data they came from (issues 13 and 15).

One tiny cross-modal run is trained on a raw catalogue (titles + photo
files) prepared with non-default photo flags (``--max_image_side=48
--jpeg_quality=80``), given a ``calibration.json`` with T = 2, and exported.
The tests then hold the Predictor to the tf.data eval pipeline on the same
raw products, to the in-process model with the temperature applied, and
check that a damaged export directory is refused and that data prepared
with a hub-id tokenizer exports.
"""

import csv
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf

import demo_configs
from data_prep import prepare
from mic_jax import export
from mic_jax import trainer
from mic_jax.data import demo
from mic_jax.data import photos
from mic_jax.data import pipeline
from mic_jax.serving import ExportDirError, Predictor

PHOTO_FLAGS = {"max_image_side": 48, "jpeg_quality": 80}  # Not the defaults.
TEMPERATURE = 2.0
IMAGE_SIZE = 32  # The demo config's.


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """A raw catalogue: catalogue.csv, images/ (96 px photos), tokenizer/."""
  root = tmp_path_factory.mktemp("raw")
  demo.write_catalogue(root, image_size=96, num_products=400, seed=3)
  return root


@pytest.fixture(scope="module")
def prepared(raw):
  out = raw.parent / "prepared"
  prepare.main([
      f"--input={raw / 'catalogue.csv'}", f"--output_dir={out}",
      f"--tokenizer={raw / 'tokenizer'}", "--max_length=16",
      "--image_column=image", "--split_column=split", "--num_workers=1",
      f"--max_image_side={PHOTO_FLAGS['max_image_side']}",
      f"--jpeg_quality={PHOTO_FLAGS['jpeg_quality']}"])
  return out


@pytest.fixture(scope="module")
def run_dir(prepared):
  workdir = prepared.parent / "run"
  config = demo_configs.short_demo(
      "cross_modal", total_steps=6, log_every=3, eval_every=3,
      **{"data.demo": False, "data.dir": str(prepared)})
  trainer.train_and_evaluate(config, str(workdir))
  # What the calibration step of a finished run leaves (the contract).
  (workdir / "calibration.json").write_text(json.dumps(
      {"temperature": TEMPERATURE, "fitted_on": "validation"}))
  return workdir


@pytest.fixture(scope="module")
def export_dir(run_dir):
  out = run_dir.parent / "export"
  export.export_run(str(run_dir), str(out))
  return out


def _eval_split(prepared, split="validation"):
  """The eval pipeline's arrays of ``split`` (padding dropped) and the
  product ids in the same order (the records' order)."""
  batches = list(pipeline.eval_batches(
      str(prepared), split, batch_size=32, image_size=IMAGE_SIZE,
      process_index=0, process_count=1))
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  arrays = {k: np.concatenate([b[k] for b in batches])[keep]
            for k in ("input_ids", "attention_mask", "token_type_ids",
                      "image", "image_present", "label")}
  info = json.loads((prepared / "dataset_info.json").read_text())
  files = [str(prepared / s["file"]) for s in info["shards"][split]]
  spec = {"product_id": tf.io.FixedLenFeature([], tf.string)}
  ids = [tf.io.parse_single_example(r, spec)["product_id"].numpy().decode()
         for r in tf.data.TFRecordDataset(files)]
  assert len(ids) == len(arrays["label"])
  return arrays, ids


def _raw_products(raw, ids):
  rows = {r["id"]: r for r in csv.DictReader(
      open(raw / "catalogue.csv", encoding="utf-8"))}
  titles = [rows[i]["title"] for i in ids]
  images = [str(raw / rows[i]["image"]) if rows[i]["image"] else None
            for i in ids]
  return titles, images


def _model_probs(run_dir, arrays, temperature):
  model, params, _, _ = export.restore(run_dir)
  batch = {k: arrays[k] for k in ("input_ids", "attention_mask",
                                  "token_type_ids", "image", "image_present")}
  logits, _ = model.apply({"params": params}, batch)
  return np.asarray(jax.nn.softmax(np.asarray(logits) / temperature, axis=-1))


def test_predictor_on_raw_products_equals_the_eval_pipeline(
    raw, prepared, run_dir, export_dir):
  """Issue 13 defect 6: same photo settings, same pixels, same answers."""
  info = json.loads((prepared / "dataset_info.json").read_text())
  assert info[photos.INFO_KEY] == PHOTO_FLAGS
  manifest = json.loads((export_dir / "manifest.json").read_text())
  assert manifest["image"][photos.INFO_KEY] == PHOTO_FLAGS
  arrays, ids = _eval_split(prepared)
  titles, images = _raw_products(raw, ids)
  assert 20 <= len(ids) and 0 < arrays["image_present"].sum() < len(ids)
  predictor = Predictor(export_dir)
  assert predictor.photo == photos.PhotoPreprocessing(48, 80)
  got = predictor.encode(titles, images)
  for key in ("input_ids", "attention_mask", "token_type_ids",
              "image_present"):
    np.testing.assert_array_equal(got[key], arrays[key], err_msg=key)
  # Bitwise: the same JPEG bytes through the same decode and transform.
  np.testing.assert_array_equal(got["image"], arrays["image"])
  probs = predictor.probabilities(titles, images)
  np.testing.assert_array_equal(probs,
                                predictor.probabilities_of_arrays(arrays))
  want = _model_probs(run_dir, arrays, TEMPERATURE)
  assert np.abs(probs - want).max() <= 1e-5


def test_predictor_probabilities_are_calibrated(prepared, run_dir,
                                                export_dir):
  """Issue 15: softmax(logits / T) out, argmax unchanged, abstain on it."""
  manifest = json.loads((export_dir / "manifest.json").read_text())
  assert manifest["calibration"] == {"temperature": TEMPERATURE,
                                     "fitted_on": "validation"}
  predictor = Predictor(export_dir)
  assert predictor.temperature == TEMPERATURE
  arrays, _ = _eval_split(prepared)
  got = predictor.probabilities_of_arrays(arrays)
  calibrated = _model_probs(run_dir, arrays, TEMPERATURE)
  raw_probs = _model_probs(run_dir, arrays, 1.0)
  assert np.abs(got - calibrated).max() <= 1e-5
  assert np.abs(got - raw_probs).max() > 1e-3  # T really was applied.
  np.testing.assert_array_equal(got.argmax(-1), raw_probs.argmax(-1))
  # The abstain threshold was chosen on the calibrated probabilities.
  want = export.abstain_threshold(calibrated, arrays["label"], 0.95)
  uncalibrated = export.abstain_threshold(raw_probs, arrays["label"], 0.95)
  assert manifest["abstain"]["threshold"] == pytest.approx(
      want["threshold"], abs=1e-5)
  assert manifest["abstain"]["validation_coverage"] == pytest.approx(
      want["validation_coverage"])
  if want["threshold"] < 1.0:
    assert uncalibrated["threshold"] != pytest.approx(want["threshold"],
                                                      abs=1e-4)
  for p, result in zip(got, predictor.results(got, top_k=2)):
    assert result["abstain"] == (p.max() < predictor.threshold)


def test_export_before_calibration_and_photo_records_loads(
    prepared, run_dir, tmp_path):
  """No calibration.json means T = 1; an old manifest (no temperature, no
  photo settings, no file list) loads with T = 1 and the old defaults."""
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy,
                  ignore=shutil.ignore_patterns("calibration.json"))
  out = tmp_path / "export"
  manifest = export.export_run(str(copy), str(out))
  assert manifest["calibration"]["temperature"] == 1.0
  arrays, _ = _eval_split(prepared)
  want = _model_probs(run_dir, arrays, 1.0)
  old = json.loads((out / "manifest.json").read_text())
  for key in ("calibration", "files"):
    del old[key]
  del old["image"][photos.INFO_KEY]
  (out / "manifest.json").write_text(json.dumps(old))
  predictor = Predictor(out)
  assert predictor.temperature == 1.0
  assert predictor.photo == photos.PhotoPreprocessing(512, 90)
  assert np.abs(predictor.probabilities_of_arrays(arrays) - want).max() <= 1e-5


def test_late_fusion_calibrates_members_then_the_mix():
  """The contract: p_m' = softmax(z_m / T_m), mix, p' ∝ mix ** (1 / T_mix)."""
  rng = np.random.default_rng(0)
  logits = {"text": rng.normal(0, 3, (5, 4)).astype(np.float32),
            "image": rng.normal(0, 3, (5, 4)).astype(np.float32)}

  class Fixed:  # A tower whose logits are given; the maths is under test.

    def __init__(self, z):
      self.z = z

    def apply(self, variables, batch, train=False):
      del variables, batch, train
      return self.z, {}

  calibration = {"temperature": 1.5, "members": {"text": 2.0, "image": 0.5}}
  infer = export.inference_fn({k: Fixed(v) for k, v in logits.items()},
                              0.3, calibration)
  params = {"text": {}, "image": {}}
  z = np.zeros((5, 4), np.int32)
  got = np.asarray(infer(params, z, z, z, np.zeros((5, 1, 1, 3)), z[:, 0]))

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  mix = (0.3 * softmax(logits["text"] / 2.0) +
         0.7 * softmax(logits["image"] / 0.5))
  want = mix ** (1 / 1.5)
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_array_equal(got.argmax(-1), mix.argmax(-1))


def test_bad_calibration_file_is_refused(run_dir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  (copy / "calibration.json").write_text('{"temperature": -1}')
  with pytest.raises(export.ExportError, match="calibration.json.*positive"):
    export.export_run(str(copy), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,message", [
    ("truncate params.bin", r"params.bin has \d+ bytes.*truncated"),
    ("flip a byte of params.bin", "params.bin does not match its SHA-256"),
    ("delete tokenizer/vocab.txt", "vocab.txt is missing.*incomplete"),
    ("truncate manifest.json", "manifest.json is not valid JSON"),
    ("an unfinished temporary directory", "did not finish"),
])
def test_damaged_export_is_refused_with_the_file_named(export_dir, tmp_path,
                                                      damage, message):
  """Issue 13: a half-written export is never loaded as if whole."""
  copy = tmp_path / "export"
  shutil.copytree(export_dir, copy)
  if damage == "truncate params.bin":
    data = (copy / "params.bin").read_bytes()
    (copy / "params.bin").write_bytes(data[:len(data) // 2])
  elif damage == "flip a byte of params.bin":  # Same size: silent before.
    data = bytearray((copy / "params.bin").read_bytes())
    data[len(data) // 3] ^= 0x40
    (copy / "params.bin").write_bytes(bytes(data))
  elif damage == "delete tokenizer/vocab.txt":
    (copy / "tokenizer" / "vocab.txt").unlink()
  elif damage == "truncate manifest.json":
    text = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(text[:len(text) // 2])
  else:  # Killed before the manifest, the last file, was written.
    (copy / "manifest.json").unlink()
    copy = copy.rename(tmp_path / ".export.tmp-k3x9q")
  with pytest.raises(ExportDirError, match=message):
    Predictor(copy)


def test_overwrite_swaps_whole_directories(run_dir, export_dir, tmp_path):
  out = tmp_path / "export"
  shutil.copytree(export_dir, out)
  (out / "stale.txt").write_text("from the old export")
  export.export_run(str(run_dir), str(out), overwrite=True)
  assert not (out / "stale.txt").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
  Predictor(out)  # Whole: every listed file checks out.


@pytest.mark.parametrize("kind", ["run_dir", "file", "other_dir"])
def test_overwrite_refuses_what_is_not_an_export(tmp_path, kind):
  """--overwrite replaces an export bundle, never a run directory (or any
  directory without a manifest, or a file): checked before anything else."""
  out = tmp_path / "out"
  if kind == "file":
    out.write_text("keep me")
  else:
    out.mkdir()
    name = "results.json" if kind == "run_dir" else "notes.txt"
    (out / name).write_text("keep me")
  with pytest.raises(export.ExportError, match="not an export bundle"):
    export.export_run(str(tmp_path / "no_run"), str(out), overwrite=True)
  assert out.exists()
  assert "keep me" in (out.read_text() if kind == "file" else
                       next(out.iterdir()).read_text())


def test_object_store_output_is_refused_not_written_locally(tmp_path,
                                                           monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(export.ExportError, match="written to a local directory"):
    export.export_run(str(tmp_path / "no_run"), "gs://bucket/export")
  assert list(tmp_path.iterdir()) == []  # No local "gs:" folder.


def test_export_resolves_a_hub_id_tokenizer(raw, prepared, run_dir, tmp_path,
                                            monkeypatch):
  """Issue 13 defect 8: data prepared with ``--tokenizer=org/name``.

  The hub id's files sit in a local Hugging Face cache (the layout
  ``huggingface_hub`` downloads into; the tests run offline), as they do on
  the machine that prepared the data.
  """
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  cache = tmp_path / "hf_cache"
  repo = cache / "models--fake-org--demo-tok"
  snapshot = repo / "snapshots" / ("0" * 40)
  shutil.copytree(raw / "tokenizer", snapshot)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0" * 40)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  data = tmp_path / "prepared"
  shutil.copytree(prepared, data)
  info = json.loads((data / "dataset_info.json").read_text())
  info["tokenizer"] = "fake-org/demo-tok"
  (data / "dataset_info.json").write_text(json.dumps(info))
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  config = json.loads((run / "config.json").read_text())
  config["data"]["dir"] = str(data)
  (run / "config.json").write_text(json.dumps(config))
  export.export_run(str(run), str(tmp_path / "export"))
  assert (tmp_path / "export" / "tokenizer" / "vocab.txt").read_bytes() == (
      raw / "tokenizer" / "vocab.txt").read_bytes()
  assert len(Predictor(tmp_path / "export").predict(["acme slim tote"])) == 1
  # An id that is neither local nor cached: a clear error naming it.
  info["tokenizer"] = "fake-org/not-cached"
  (data / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(export.ExportError,
                     match="'fake-org/not-cached'.*not available"):
    export.export_run(str(run), str(tmp_path / "again"))
