"""The classical title baseline: TF-IDF of word 1-2 grams + logistic regression.

What a practitioner tries first, before any neural network: it reads the
same prepared TFRecords (the ``title`` feature) and the same splits as the
neural systems, chooses the inverse regularization ``C`` on the validation
split by macro-F1, and scores the test split once. Results go to
``WORKDIR/results.json`` in the trainer's format, so the Table-2 tool can
list it as a row. Needs scikit-learn.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from mic_jax.data import pipeline
from mic_jax.data import records
from mic_jax.train import evaluation, metrics, reporting

C_GRID = (3.0, 10.0, 30.0, 100.0)


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


def train_and_evaluate(data_dir: str, workdir: str,
                       c_grid: Sequence[float] = C_GRID) -> dict[str, Any]:
  """Fits the baseline, picks C on validation, writes ``results.json``."""
  try:
    # pylint: disable=g-import-not-at-top
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    # pylint: enable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the title baseline needs scikit-learn: pip install "
                      "scikit-learn") from e
  reporting.ensure_dir(workdir)
  info = pipeline.DatasetInfo.load(data_dir)
  start = time.monotonic()
  splits = {s: read_titles(data_dir, s) for s in ("train", "validation",
                                                  "test") if info.has_split(s)}
  vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                               lowercase=True)
  x_train = vectorizer.fit_transform(splits["train"][0])
  y_train = splits["train"][1]
  features = {s: vectorizer.transform(t) for s, (t, _) in splits.items()}

  def fit(c: float):
    model = LogisticRegression(C=c, max_iter=2000)
    return model.fit(x_train, y_train)

  def predict(model, split):
    # Map the model's classes (those seen in training) back to label ids.
    scores = model.predict_proba(features[split])
    return model.classes_[scores.argmax(-1)]

  grid = []
  for c in c_grid:
    model = fit(c)
    report = metrics.classification_report(
        splits["validation"][1], predict(model, "validation"),
        info.num_classes)
    grid.append((c, report["macro_f1"], model))
    logging.info("title baseline: C=%g validation macro-F1 %.4f", c,
                 report["macro_f1"])
  best_c, _, best = max(grid, key=lambda g: g[1])
  results: dict[str, Any] = {
      "model": "tfidf_logreg", "C": best_c,
      "C_grid": [[c, f] for c, f, _ in grid],
      "features": int(x_train.shape[1]),
  }
  for split in ("validation", "test"):
    if split not in splits:
      continue
    report = metrics.classification_report(
        splits[split][1], predict(best, split), info.num_classes)
    results[split] = evaluation.summarize(report)
    evaluation.write_split_report(workdir, split, report, list(info.labels))
  results["seconds"] = round(time.monotonic() - start, 1)
  reporting.write_json(os.path.join(workdir, "results.json"), results)
  return results
