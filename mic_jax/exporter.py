"""Exports a trained run as a self-contained serving directory (library).

The program is ``python -m mic_jax.export`` (:mod:`mic_jax.export`: flags,
then :func:`export_run`). The bundle's format is owned by
:mod:`mic_jax.serving.bundle`, which writes and reads it; the run directory
is read through :mod:`mic_jax.train.rundir`, the prepared data's
``dataset_info.json`` through :mod:`mic_jax.data.records`, and the model is
built by :func:`mic_jax.models.classifier.build`.

The directory holds everything inference needs and nothing of training:

  manifest.json     versions, input shapes, preprocessing (the photo
                    settings the data was prepared with, as data), the
                    calibration temperature, metrics, the abstain
                    threshold, the training config (for the record), and
                    the size and SHA-256 of every other file
  model.stablehlo   the inference function serialized with ``jax.export``
                    (StableHLO), symbolic batch dimension (and title
                    length ``l <= max_length`` for a run trained in length
                    buckets, served in the same buckets); parameters are
                    its first argument, so the file stays small and
                    ``--dtype`` changes only the parameter file
  params.bin/.json  the parameters: raw little-endian arrays + an index
  tokenizer/        the tokenizer files the data was prepared with
  labels.txt        class names, line = class id; taxonomy.json if any
  saved_model/      with --saved_model: a TF SavedModel for TF Serving

:class:`mic_jax.serving.Predictor` loads it with jax, numpy and the
tokenizer only: no model code, no flax. Late-fusion runs export both towers
and the function returns ``alpha * p_text + (1 - alpha) * p_image``.

The function returns *calibrated* probabilities: ``softmax(logits / T)``
with the temperature of the run's ``calibration.json`` (fitted on the
validation split; absent means T = 1). A late-fusion run calibrates each
member before mixing and re-tempers the mix, ``p ∝ p_mix ** (1 / T_mix)``.
The abstain threshold is chosen on these calibrated probabilities.

The output is written to a temporary directory and renamed when complete
(an existing export bundle, with ``--overwrite``, is renamed away first and deleted
after; anything else, such as a run directory, is refused), so a directory
named ``--output`` is always whole; the Predictor
also checks every file against the manifest's sizes and hashes before
loading. Exporting the same checkpoint again gives byte-identical files.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Callable

from absl import logging
import flax
import jax
from jax import export as jax_export
import jax.numpy as jnp
import ml_collections
import numpy as np

from mic_jax.checkpoints import architecture
from mic_jax.checkpoints import common
from mic_jax.data import photos
from mic_jax.data import records
from mic_jax.evaluation import calibration as calibration_lib
from mic_jax.evaluation import metrics
from mic_jax.models import classifier
from mic_jax.serving import bundle
from mic_jax.train import rundir

FORMAT_VERSION = bundle.FORMAT_VERSION
CALIBRATION_FILE = rundir.CALIBRATION
MANIFEST = bundle.MANIFEST  # Written last; lists every other file.
PLATFORMS = ("cpu", "cuda", "tpu")
# The bundle's writers and checks, under the names this module had.
write_params = bundle.write_params
file_digests = bundle.file_digests


class ExportError(RuntimeError):
  """The run cannot be exported; the message says why."""


def _read(read: Callable[[Any], Any], where: Any) -> Any:
  """``read(where)`` with a missing file reported as an ExportError."""
  try:
    return read(where)
  except FileNotFoundError as e:
    raise ExportError(f"{e} (is this a finished mic_jax run?)") from e


def data_dir_of(config: ml_collections.ConfigDict, workdir: pathlib.Path
                ) -> pathlib.Path:
  """The prepared data a run trained on."""
  return pathlib.Path(rundir.data_dir(config, workdir))


def restore(workdir: pathlib.Path, step: int | None = None
            ) -> tuple[Any, Any, int, ml_collections.ConfigDict]:
  """(model, numpy params, step, config) of a run's best or given checkpoint.

  The model is built from the run's ``config.json``; a checkpoint whose
  parameters do not fit it is refused with both paths named.
  """
  from mic_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  config = _read(rundir.read_config, workdir)
  spec = classifier.build(architecture.resolve(config))
  model = spec.model
  device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      spec.abstract_params)
  if step is None:
    results = _read(rundir.read_results, workdir)
    step = int(results["best_step"])
    path = pathlib.Path(rundir.checkpoint_dir(workdir, step, best=True))
  else:
    path = pathlib.Path(rundir.checkpoint_dir(workdir, step))
  if not path.exists():
    raise ExportError(f"no checkpoint at {path}")
  expected = {k: tuple(v.shape) for k, v in common.flatten(abstract).items()}
  try:
    params = checkpointing.restore_params_from(str(path), abstract)
  except Exception as e:  # Orbax reports mismatches with many types.
    raise ExportError(
        f"checkpoint {path} does not fit the model "
        f"{rundir.path(workdir, rundir.CONFIG)} "
        f"builds ({type(e).__name__}: {str(e)[:500]})") from e
  got = {k: tuple(v.shape) for k, v in common.flatten(params).items()}
  if got != expected:
    bad = sorted(k for k in set(got) | set(expected)
                 if got.get(k) != expected.get(k))
    raise ExportError(f"checkpoint {path} and "
                      f"{rundir.path(workdir, rundir.CONFIG)} "
                      f"disagree on {', '.join(bad[:5])}")
  logging.info("restored %s", path)
  if model.aux_heads:  # Training aids only: the served model has no use.
    model = model.clone(aux_heads=False)
    params = {k: v for k, v in params.items()
              if k not in classifier.AUX_HEADS}
  return model, jax.tree.map(np.asarray, params), step, config


def _copy_tokenizer(info: dict[str, Any], output: pathlib.Path) -> str:
  """Copies the tokenizer ``dataset_info.json`` names (a local path or, as
  ``data_prep --tokenizer`` accepts, a hub id) into ``output/tokenizer``."""
  from mic_jax.checkpoints import hub  # pylint: disable=g-import-not-at-top
  recorded = str(info.get("tokenizer") or "")
  if not recorded:
    raise ExportError("dataset_info.json names no tokenizer: prepare the "
                      "data again with data_prep")
  source = pathlib.Path(recorded).expanduser()
  if source.is_file():  # A SentencePiece .model or a tokenizer.json.
    return bundle.copy_tokenizer(source, output)
  try:
    # Resolves a hub id through the local Hugging Face cache (or a
    # download), exactly as data_prep and training loaded it.
    source = hub.resolve_dir(recorded, what="tokenizer")
  except common.CheckpointError as e:
    raise ExportError(f"the tokenizer the data was prepared with "
                      f"({recorded!r}, from dataset_info.json) is not "
                      f"available: {e}") from e
  return bundle.copy_tokenizer(source, output)


def abstain_threshold(probs: np.ndarray, labels: np.ndarray, target: float
                      ) -> dict[str, Any]:
  """The lowest top-probability cut whose kept predictions reach ``target``.

  Products below the cut are left to a person; coverage is the share kept.
  """
  top = probs.max(-1)
  correct = probs.argmax(-1) == labels
  order = np.argsort(-top, kind="stable")
  precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
  ok = np.nonzero(precision >= target)[0]
  if not len(ok):
    return {"threshold": 1.0, "target_precision": target,
            "validation_precision": None, "validation_coverage": 0.0}
  k = int(ok[-1])
  return {"threshold": float(top[order[k]]), "target_precision": target,
          "validation_precision": float(precision[k]),
          "validation_coverage": float((k + 1) / len(order))}


def read_calibration(workdir: pathlib.Path, late: bool) -> dict[str, Any]:
  """The run's temperatures (:func:`mic_jax.evaluation.calibration.parse_record`
  owns the file's format). No ``calibration.json`` (a run from before
  calibration) means every temperature is 1."""
  path = workdir / CALIBRATION_FILE
  record = None
  if path.exists():
    try:
      record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ExportError(f"{path}: not valid JSON ({e})") from e
  else:
    logging.warning("%s not found: exporting uncalibrated probabilities "
                    "(temperature 1)", path)
  try:
    return calibration_lib.parse_record(record, str(path), late)
  except ValueError as e:
    raise ExportError(str(e)) from e


def length_buckets_of(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The length buckets a run trained in, as its config.json records them
  (resolved: explicit lengths; runs from before buckets: none)."""
  spec = str(config.data.get("length_buckets", "") or "")
  return tuple(int(x) for x in spec.split(",") if x.strip())


def tempered(probs: jax.Array, temperature: float) -> jax.Array:
  """``p ** (1 / T)`` renormalized (the identity at T = 1)."""
  if temperature == 1:
    return probs
  return jax.nn.softmax(jnp.log(probs) / temperature, axis=-1)


def inference_fn(models: dict[str, Any], alpha: float | None,
                 calibration: dict[str, Any] | None = None) -> Callable:
  """``f(params, ids, mask, types, image, present) -> probs [B, C]``.

  Probabilities are calibrated with ``calibration`` (see
  :func:`read_calibration`; ``None`` means temperature 1).
  """
  calibration = calibration or {"temperature": 1.0}
  members = calibration.get("members") or {"text": 1.0, "image": 1.0}

  def probs(model, params, batch, temperature=1.0):
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    logits, _ = model.apply({"params": params}, batch, train=False)
    logits = logits.astype(jnp.float32)
    if temperature != 1:
      logits = logits / temperature
    return jax.nn.softmax(logits, axis=-1)

  def infer(params, input_ids, attention_mask, token_type_ids, image,
            image_present):
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "token_type_ids": token_type_ids, "image": image,
             "image_present": image_present}
    if alpha is None:
      return probs(models["model"], params["model"], batch,
                   calibration["temperature"])
    mix = metrics.late_mix(
        probs(models["text"], params["text"], batch, members["text"]),
        probs(models["image"], params["image"], batch, members["image"]),
        alpha)
    return tempered(mix, calibration["temperature"])

  return infer


def _serialize(infer: Callable, params: Any, max_length: int,
               image_size: int, symbolic_length: bool = False
               ) -> tuple[bytes, list[str]]:
  """The exported function; ``symbolic_length`` makes the title length a
  dimension ``l <= max_length`` (one export serves every length bucket:
  traced once, compiled per bucket where it runs)."""
  if symbolic_length:
    b, length = jax_export.symbolic_shape(
        "b, l", constraints=(f"l <= {max_length}",))
  else:
    (b,), length = jax_export.symbolic_shape("b"), max_length
  specs = (
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
      jax.ShapeDtypeStruct((b, length), jnp.int32),
      jax.ShapeDtypeStruct((b, length), jnp.int32),
      jax.ShapeDtypeStruct((b, length), jnp.int32),
      jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32),
      jax.ShapeDtypeStruct((b,), jnp.int32))
  # Source locations carry the caller's stack: drop them, so the bytes
  # depend only on the model and its parameters' shapes.
  limit = jax.config.jax_traceback_in_locations_limit
  jax.config.update("jax_traceback_in_locations_limit", 0)
  try:
    exported = jax_export.export(jax.jit(infer), platforms=PLATFORMS)(*specs)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("multi-platform export failed (%s); exporting for cpu", e)
    exported = jax_export.export(jax.jit(infer), platforms=("cpu",))(*specs)
  finally:
    jax.config.update("jax_traceback_in_locations_limit", limit)
  return bytes(exported.serialize()), list(exported.platforms)


def write_saved_model(directory: pathlib.Path, infer: Callable, params: Any,
                      max_length: int, image_size: int) -> None:
  """A TF SavedModel for TF Serving (jax2tf, native serialization).

  Signature ``serving_default``: int32 ``input_ids``, ``attention_mask``,
  ``token_type_ids`` ``[b, max_length]``, float32 ``image`` ``[b, S, S, 3]``
  in [-1, 1], int32 ``image_present`` ``[b]`` -> float32
  ``probabilities`` ``[b, C]``. Parameters are float32 variables.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  text = f"(b, {max_length})"
  converted = jax2tf.convert(
      infer, with_gradient=False,
      polymorphic_shapes=[None, text, text, text,
                          f"(b, {image_size}, {image_size}, 3)", "(b,)"])
  module = tf.Module()
  module.params = tf.nest.map_structure(
      lambda x: tf.Variable(np.asarray(x, np.float32), trainable=False),
      params)

  @tf.function(input_signature=[
      tf.TensorSpec([None, max_length], tf.int32, name="input_ids"),
      tf.TensorSpec([None, max_length], tf.int32, name="attention_mask"),
      tf.TensorSpec([None, max_length], tf.int32, name="token_type_ids"),
      tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                    name="image"),
      tf.TensorSpec([None], tf.int32, name="image_present")])
  def serve(input_ids, attention_mask, token_type_ids, image, image_present):
    return {"probabilities": converted(module.params, input_ids,
                                       attention_mask, token_type_ids, image,
                                       image_present)}

  module.serve = serve
  tf.saved_model.save(module, str(directory / "saved_model"),
                      signatures={"serving_default": serve})


def _validation_probs(serialized: bytes, params: Any, data_dir: pathlib.Path,
                      image_size: int, length_buckets: tuple[int, ...] = ()
                      ) -> tuple[np.ndarray, np.ndarray]:
  """The exported function over the validation split (every example once,
  in the run's length buckets)."""
  from mic_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  call = jax.jit(jax_export.deserialize(bytearray(serialized)).call)
  probs, labels = [], []
  for batch in pipeline.eval_batches(str(data_dir), "validation",
                                     batch_size=64, image_size=image_size,
                                     process_index=0, process_count=1,
                                     length_buckets=length_buckets):
    p = np.asarray(call(params, batch["input_ids"], batch["attention_mask"],
                        batch["token_type_ids"], batch["image"],
                        batch["image_present"]))
    keep = batch["mask"] > 0
    probs.append(p[keep])
    labels.append(batch["label"][keep])
  return np.concatenate(probs), np.concatenate(labels)


def _replaceable(out: pathlib.Path) -> bool:
  """Whether ``--overwrite`` may replace ``out``: an export bundle (it
  holds a manifest) or an empty directory; never a file or a run."""
  if not out.is_dir():
    return False
  return (out / bundle.MANIFEST).is_file() or not any(out.iterdir())


def export_run(workdir: str, output: str, *, step: int | None = None,
               dtype: str = "float32", target_precision: float = 0.95,
               overwrite: bool = False, saved_model: bool = False
               ) -> dict[str, Any]:
  """Exports ``workdir`` to ``output``; returns the manifest."""
  if "://" in output:
    # pathlib would write a local "gs:" folder; the bundle is published by
    # local renames (serving/bundle.py), which object stores do not have.
    raise ExportError(
        f"--output={output}: exports are written to a local directory; "
        "export locally, then copy the whole directory (e.g. gsutil -m cp "
        "-r), manifest.json included")
  work = pathlib.Path(workdir)
  out = pathlib.Path(output)
  if out.exists() and not overwrite:
    raise ExportError(f"{out} exists; choose another --output or --overwrite")
  if out.exists() and not _replaceable(out):
    raise ExportError(
        f"{out} is not an export bundle (no {bundle.MANIFEST}), so "
        "--overwrite will not delete it; it could be a run directory or "
        "anything else. Choose another --output, or remove it yourself")
  if dtype not in ("float32", "bfloat16"):
    raise ExportError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
  if not 0 < target_precision <= 1:
    raise ExportError(f"--target_precision must be in (0, 1], got "
                      f"{target_precision}")
  results = _read(rundir.read_results, work)
  config_dict = _read(lambda w: rundir.read_json(w, rundir.CONFIG), work)
  alpha = None
  if config_dict["model"]["kind"] == "late":
    if step is not None:
      raise ExportError("--step does not apply to late fusion: the best "
                        "checkpoints of its two runs are exported")
    alpha = float(results["alpha"])
    runs = {"text": pathlib.Path(results["text_run"]["workdir"]),
            "image": pathlib.Path(results["image_run"]["workdir"])}
  else:
    runs = {"model": work}
  models, params, steps_ = {}, {}, {}
  for name, run_dir in runs.items():
    models[name], params[name], steps_[name], config = restore(run_dir, step)
  data_dir = data_dir_of(config, runs[name])
  info = _read(records.read_info, data_dir)
  try:
    photo = photos.PhotoPreprocessing.from_dict(
        info.get(photos.INFO_KEY), where=str(data_dir / records.INFO_FILE))
  except ValueError as e:
    raise ExportError(str(e)) from e
  calibration = read_calibration(work, late=alpha is not None)
  max_length, image_size = int(config.text.max_length), int(config.image.size)
  # The run's length buckets (resolved in its config.json); () = padded.
  length_buckets = length_buckets_of(config)
  if dtype == "bfloat16":
    params = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), params)
  infer = inference_fn(models, alpha, calibration)
  serialized, platforms = _serialize(infer, params, max_length, image_size,
                                     symbolic_length=bool(length_buckets))
  if info.get("shards", {}).get("validation"):
    abstain = abstain_threshold(
        *_validation_probs(serialized, params, data_dir, image_size,
                           length_buckets),
        target_precision)
  else:
    logging.warning("no validation split: the predictor will never abstain")
    abstain = {"threshold": 0.0, "target_precision": target_precision,
               "validation_precision": None, "validation_coverage": 1.0}

  tokens = ["b", "l" if length_buckets else max_length, "int32"]
  with bundle.writing(out) as tmp:
    bundle.write_model(tmp, serialized)
    bundle.write_params(tmp, params)
    if saved_model:
      write_saved_model(tmp, infer, params, max_length, image_size)
    tokenizer = _copy_tokenizer(info, tmp)
    # A labels.txt that would read back wrong stops here, naming the file.
    records.read_labels(data_dir, info.get("num_classes"))
    taxonomy = bundle.copy_labels(
        tmp, data_dir / records.LABELS_FILE,
        data_dir / info["taxonomy_file"] if info.get("taxonomy_file")
        else None)
    manifest = bundle.write_manifest(tmp, {
        "model": config_dict["model"]["kind"],
        "source": {"workdir": str(work.resolve()), "steps": steps_,
                   "checkpoint": "best" if step is None
                   else f"checkpoints/{step}"},
        "versions": {"python": sys.version.split()[0],
                     "jax": jax.__version__, "flax": flax.__version__,
                     "numpy": np.__version__},
        "platforms": platforms,
        "params_dtype": dtype,
        "saved_model": bundle.SAVED_MODEL if saved_model else None,
        "num_classes": int(info["num_classes"]),
        "inputs": {
            "input_ids": tokens, "attention_mask": tokens,
            "token_type_ids": tokens,
            "image": ["b", image_size, image_size, 3, "float32"],
            "image_present": ["b", "int32"]},
        "output": ["b", int(info["num_classes"]),
                   "float32 calibrated probabilities"],
        "calibration": calibration,
        "text": {"tokenizer": tokenizer, "max_length": max_length,
                 # The Predictor cuts a request's tokens to the smallest
                 # of these holding its longest title ([] = max_length).
                 "length_buckets": list(length_buckets),
                 "normalization": "Unicode NFKC, whitespace collapsed"},
        "image": {"size": image_size,
                  photos.INFO_KEY: photo.to_dict(),
                  "preprocessing": "decode, RGB, EXIF rotation, long side "
                                   f"<= {photo.max_side}, JPEG "
                                   f"q{photo.jpeg_quality} (data_prep, "
                                   f"{photos.INFO_KEY}); bilinear "
                                   "antialiased resize of the short side to "
                                   "size, centre crop, x / 127.5 - 1",
                  "absent": "zeros with image_present = 0"},
        "labels": bundle.LABELS, "taxonomy": taxonomy,
        "late_fusion_alpha": alpha,
        "abstain": abstain,
        "metrics": {k: results[k] for k in ("validation", "test")
                    if k in results},
        "training_config": config_dict,
    })
  return manifest
