"""Linear anchors: logistic regression on title TF-IDF and photo features.

What a practitioner with scikit-learn tries before any neural network, and
what every deep row of the table must beat:

* ``title``: TF-IDF of word 1-2 grams of the title;
* ``photo``: the frozen photo tower's class token (the same pretrained
  tower, image size and feature cache the deep systems use,
  :mod:`mic_jax.features.image_features`), standardized on the training split,
  plus a "has a photo" flag;
* ``title+photo``: both, side by side in one logistic regression; the
  photo block is multiplied by an image weight so that neither block's scale
  decides how much it counts.

Every choice (``C``, and for ``title+photo`` the image weight) is made on
the validation split by macro-F1; the test split is scored once with the
chosen model. The rows read the same prepared TFRecords and splits as the
neural systems and write ``WORKDIR/results.json`` in the trainer's format,
so the Table-2 tool lists them next to the deep rows. Needs scikit-learn.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from mic_jax.data import pipeline
from mic_jax.data import records
from mic_jax.evaluation import evaluation, metrics, reporting
from mic_jax.features import image_features
from mic_jax.train import rundir

FEATURES = ("title", "photo", "title+photo")
# The grids reach past where the real catalogues chose (fashion's title row
# and H&M's title+photo row chose C = 100 and the smallest image weight of
# narrower grids).
C_GRID = (3.0, 10.0, 30.0, 100.0, 300.0)
# Photo-only: a dense 384-768 d input wants a much smaller C than TF-IDF.
PHOTO_C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# title+photo: the standardized photo block (norm ~ sqrt(D)) against L2-
# normalized TF-IDF rows (norm 1).
IMAGE_WEIGHTS = (0.01, 0.025, 0.05, 0.1)
SPLITS = ("train", "validation", "test")


def read_titles(data_dir: str, split: str) -> tuple[list[str], np.ndarray]:
  """Titles and label ids of every example of ``split``, in file order."""
  info = pipeline.DatasetInfo.load(data_dir)
  spec = {"title": records.feature_spec(info.max_length)["title"],
          "label": records.feature_spec(info.max_length)["label"]}
  titles, labels = [], []
  ds = tf.data.TFRecordDataset(info.files(split)).map(
      lambda s: tf.io.parse_single_example(s, spec))
  for ex in ds.as_numpy_iterator():
    titles.append(ex["title"].decode("utf-8"))
    labels.append(int(ex["label"]))
  return titles, np.asarray(labels, np.int64)


def photo_vectors(config: ml_collections.ConfigDict, workdir: str,
                  splits: Sequence[str] = SPLITS
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{split: (features [N, D + 1], labels [N])}`` in file order.

  The features are the frozen photo tower's class token (the global token
  the fused models read) and a last column that is 1 for a product with a
  photo. ``config`` is a run config whose image tower is pretrained and
  frozen, so its outputs come from (or go into) the shared feature cache.
  """
  # pylint: disable=g-import-not-at-top
  from mic_jax import trainer
  from mic_jax.train import towers
  # pylint: enable=g-import-not-at-top
  run = trainer.build_run(config, workdir)
  if "img" not in run.abstract_state.params:
    raise ValueError(f"config.model.kind={config.model.kind!r} has no photo "
                     "tower; the photo rows need one (image_only)")
  params = run.spec.init_params(config.seed)
  params, loaded = towers.load_pretrained(run.config, params,
                                          run.state_shardings.params)
  trainer.attach_image_features(run, params)
  if run.features is not None and run.features.batch_key != \
      image_features.TOKENS:
    raise ValueError("the photo linear rows read the frozen photo tower's "
                     "class token; image.train_top_blocks caches hidden "
                     "tokens below it: set image.train_top_blocks=0 for them")
  if run.features is None:
    raise ValueError(
        "the photo linear rows read a frozen photo tower's class token from "
        "the feature cache: set config.image.checkpoint with "
        "config.image.freeze_pretrained=True (or optim.freeze=img) and "
        "config.image.cache_features=True")
  if not any(name.startswith("img") for name in loaded):
    logging.warning("photo linear rows: the photo tower has no checkpoint, "
                    "so its class token is a random projection")
  out = {}
  for split in splits:
    if not run.info.has_split(split):
      continue
    feats, labels = [], []
    for batch in pipeline.eval_batches(
        run.data_dir, split, batch_size=256, image_size=config.image.size,
        process_index=0, process_count=1, image_keys=True, info=run.info):
      keep = batch["mask"] > 0
      cls = run.features.lookup(batch["image_key"][keep])[:, 0]
      present = batch["image_present"][keep].astype(np.float32)[:, None]
      feats.append(np.concatenate([cls * present, present], axis=1))
      labels.append(batch["label"][keep].astype(np.int64))
    out[split] = (np.concatenate(feats), np.concatenate(labels))
  return out


def _title_blocks(data_dir: str, splits: Sequence[str]):
  # pylint: disable=g-import-not-at-top
  from sklearn.feature_extraction.text import TfidfVectorizer
  # pylint: enable=g-import-not-at-top
  titles = {s: read_titles(data_dir, s) for s in splits}
  vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                               lowercase=True)
  vectorizer.fit(titles["train"][0])
  return ({s: vectorizer.transform(t) for s, (t, _) in titles.items()},
          {s: y for s, (_, y) in titles.items()})


def _photo_blocks(photos: dict[str, tuple[np.ndarray, np.ndarray]]):
  """Standardized on the training split (the flag column is kept as is)."""
  train = photos["train"][0]
  mean, std = train.mean(0), train.std(0)
  mean[-1], std[-1] = 0.0, 1.0
  std = np.where(std > 1e-6, std, 1.0)
  return ({s: ((x - mean) / std).astype(np.float32)
           for s, (x, _) in photos.items()},
          {s: y for s, (_, y) in photos.items()})


def train_and_evaluate(data_dir: str, workdir: str, *,
                       features: str = "title",
                       photo_config: ml_collections.ConfigDict | None = None,
                       c_grid: Sequence[float] | None = None,
                       image_weights: Sequence[float] = IMAGE_WEIGHTS
                       ) -> dict[str, Any]:
  """Fits one linear anchor, chooses on validation, writes ``results.json``.

  Args:
    data_dir: the prepared data set.
    workdir: where ``results.json`` and the per-class reports go.
    features: ``"title"``, ``"photo"`` or ``"title+photo"``.
    photo_config: a run config with a pretrained, frozen photo tower (see
      :func:`photo_vectors`); needed unless ``features == "title"``.
    c_grid: the inverse regularization strengths tried (default: per
      feature set).
    image_weights: the weights of the photo block tried for
      ``title+photo``.
  """
  try:
    # pylint: disable=g-import-not-at-top
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    # pylint: enable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the linear baselines need scikit-learn: pip install "
                      "scikit-learn") from e
  if features not in FEATURES:
    raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
  uses_title, uses_photo = "title" in features, "photo" in features
  if uses_photo and photo_config is None:
    raise ValueError(f"features={features!r} needs photo_config: a run "
                     "config with a pretrained, frozen photo tower")
  reporting.ensure_dir(workdir)
  info = pipeline.DatasetInfo.load(data_dir)
  start = time.monotonic()
  splits = [s for s in SPLITS if info.has_split(s)]
  blocks, labels = [], None
  if uses_title:
    text, labels = _title_blocks(data_dir, splits)
    blocks.append(text)
  if uses_photo:
    photo, photo_labels = _photo_blocks(photo_vectors(photo_config, workdir,
                                                      splits))
    if labels is not None:
      for s in splits:  # Both readers walk the records in file order.
        if not np.array_equal(labels[s], photo_labels[s]):
          raise RuntimeError(f"{data_dir} {s}: the title and photo readers "
                             "disagree on the example order")
    labels = photo_labels
    blocks.append(photo)
  c_grid = tuple(c_grid or (PHOTO_C_GRID if features == "photo" else C_GRID))
  weights = tuple(image_weights) if features == "title+photo" else (1.0,)

  def design(split: str, weight: float):
    if len(blocks) == 1:
      return blocks[0][split]
    return sparse.hstack([blocks[0][split],
                          sparse.csr_matrix(weight * blocks[1][split])],
                         format="csr")

  def predict(model, x):
    # The model's classes are those seen in training: map back to label ids.
    return model.classes_[model.predict_proba(x).argmax(-1)]

  grid = []
  for weight, c in itertools.product(weights, c_grid):
    model = LogisticRegression(C=c, max_iter=2000).fit(
        design("train", weight), labels["train"])
    report = metrics.classification_report(
        labels["validation"], predict(model, design("validation", weight)),
        info.num_classes)
    grid.append((weight, c, report["macro_f1"], model))
    logging.info("linear %s: image weight %g, C=%g validation macro-F1 %.4f",
                 features, weight, c, report["macro_f1"])
  best_weight, best_c, _, best = max(grid, key=lambda g: g[2])
  results: dict[str, Any] = {
      "model": "logreg", "features": features, "C": best_c,
      "grid": [{"image_weight": w, "C": c, "validation_macro_f1": f}
               for w, c, f, _ in grid],
      "num_features": int(design("train", best_weight).shape[1]),
  }
  if features == "title+photo":
    results["image_weight"] = best_weight
  for split in ("validation", "test"):
    if split not in splits:
      continue
    report = metrics.classification_report(
        labels[split], predict(best, design(split, best_weight)),
        info.num_classes)
    results[split] = evaluation.summarize(report)
    evaluation.write_split_report(workdir, split, report, list(info.labels))
  results["seconds"] = round(time.monotonic() - start, 1)
  reporting.write_json(rundir.path(workdir, rundir.RESULTS), results)
  return results
