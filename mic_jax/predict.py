r"""Categorizes products with an exported model, from the command line.

  python -m mic_jax.predict --model=EXPORT --title="Nike running shoe" \
      [--image=shoe.jpg] [--top_k=5]
  python -m mic_jax.predict --model=EXPORT --input=products.csv \
      --output=predictions.jsonl [--title_column=title --image_column=image]
  python -m mic_jax.predict --model=EXPORT --data_dir=PREPARED \
      --split=validation --output=scores.jsonl [--max_products=N]

One product prints one JSON object. Batch mode reads a CSV or JSON Lines
file (image paths relative to the input's folder; an empty image means no
photo) and writes one JSON line per product in input order: the prediction,
or ``{"error": ...}`` for a product that cannot be scored (empty title,
unreadable photo), counted and reported at the end without stopping.
Split mode scores a prepared split's records as the evaluator reads them
(:mod:`mic_jax.scoring`). Every batch row names the export that scored it
(``export``, its identity) and the photo it scored (``photo``), which is
what the review page (``mic-jax-review``) reads. The output is written to
a temporary file and renamed when complete.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
import sys
import tempfile
from typing import Any, Iterator

from absl import app
from absl import flags

from mic_jax import console

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines this program's flags (when it runs, never on import)."""
  flags.DEFINE_string("model", None, "Export directory.")
  flags.DEFINE_string("title", None, "One product's title.")
  flags.DEFINE_string("image", None, "Its photo (path), if any.")
  flags.DEFINE_string("input", None, "Batch mode: .csv or .jsonl.")
  flags.DEFINE_string("output", None, "Batch or split mode: .jsonl output.")
  flags.DEFINE_string("data_dir", None, "Split mode: a prepared data set "
                      "(data_prep.prepare) to score, with --split.")
  flags.DEFINE_enum("split", "validation", ["train", "validation", "test"],
                    "Split mode: the split to score.")
  flags.DEFINE_integer("max_products", 0, "Split mode: score only the "
                       "first N products (0: all).")
  flags.DEFINE_string("title_column", "title", "Batch mode.")
  flags.DEFINE_string("image_column", "image", "Batch mode.")
  flags.DEFINE_string("id_column", "id", "Batch mode: copied to "
                      "the output when present.")
  flags.DEFINE_integer("top_k", 5, "Labels per product.")
  flags.DEFINE_integer("batch_size", 64, "Products per model call.")
  console.define_verbose_flag()


def read_rows(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, row) of a CSV or JSON Lines file."""
  if path.suffix == ".jsonl":
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            yield line_no, json.loads(line)
          except json.JSONDecodeError as e:
            yield line_no, {"__error__": f"malformed JSON: {e.msg}"}
  else:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      for row in reader:
        yield reader.line_num, row


def predict_file(predictor: Any, input_path: str, output_path: str, *,
                 title_column: str, image_column: str, id_column: str,
                 top_k: int, batch_size: int) -> dict[str, int]:
  """Scores every row; returns counts of ``ok`` and ``errors``."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from mic_jax.serving import PredictionError  # pylint: disable=g-import-not-at-top
  source = pathlib.Path(input_path)
  rows = list(read_rows(source))
  counts = {"ok": 0, "errors": 0}
  with atomic_lines(output_path) as f, tqdm(
      total=len(rows), unit=" products", disable=None) as bar:
    for start in range(0, len(rows), batch_size):
      chunk = rows[start:start + batch_size]
      results: list[dict[str, Any]] = [{} for _ in chunk]
      good = []
      for i, (_, row) in enumerate(chunk):
        if "__error__" in row:
          results[i] = {"error": row["__error__"]}
        else:
          good.append(i)
      try:
        scored = predictor.predict(
            [str(chunk[i][1].get(title_column) or "") for i in good],
            [_image_path(chunk[i][1].get(image_column), source.parent)
             for i in good], top_k=top_k)
        for i, result in zip(good, scored):
          results[i] = result
      except PredictionError:  # Score one by one to find the bad rows.
        for i in good:
          results[i] = _score_one(predictor, chunk[i][1], source.parent,
                                  title_column, image_column, top_k,
                                  PredictionError)
      for (line_no, row), result in zip(chunk, results):
        if id_column in row:
          result = {"id": row[id_column], **result}
        if "error" not in result:  # What scored it, on what (review page).
          photo = _image_path(row.get(image_column), source.parent)
          result.update(title=str(row.get(title_column)),
                        export=predictor.identity,
                        photo={"file": photo} if photo else None)
        if "error" in result:
          counts["errors"] += 1
          result["line"] = line_no or None
        else:
          counts["ok"] += 1
        f.write(json.dumps(result, ensure_ascii=False) + "\n")
      bar.update(len(chunk))
  return counts


def _image_path(value: Any, root: pathlib.Path) -> str | None:
  if not value:
    return None
  path = pathlib.Path(str(value))
  return str(path if path.is_absolute() else root / path)


def _score_one(predictor, row, root, title_column, image_column, top_k,
               error_type) -> dict[str, Any]:
  try:
    return predictor.predict([str(row.get(title_column) or "")],
                             [_image_path(row.get(image_column), root)],
                             top_k=top_k)[0]
  except error_type as e:
    return {"error": str(e).replace("product 0: ", "", 1)}


def main(argv):
  del argv
  # Stdout carries the predictions: the console lines go to stderr. The log
  # goes to the user's log folder (see console) in every mode: --output is
  # a file, and its folder (often /tmp or a shared one) is not ours.
  with console.session("predict", None, stream=sys.stderr,
                       verbose=console.verbose_requested()):
    _predict()


def _predict():
  # pylint: disable=g-import-not-at-top
  from mic_jax.serving import ExportDirError, Predictor, PredictionError
  # pylint: enable=g-import-not-at-top
  try:
    predictor = Predictor(FLAGS.model)
  except ExportDirError as e:  # Not whole: refuse to use it.
    raise SystemExit(f"error: {e}") from e
  if FLAGS.data_dir:
    if not FLAGS.output or FLAGS.input:
      raise app.UsageError("--data_dir needs --output (and no --input)")
    _score_split(predictor)
    return
  if FLAGS.input:
    if not FLAGS.output:
      raise app.UsageError("--input needs --output")
    console.say("predict  %s with %s (%s, %d labels) -> %s (log: %s)",
                FLAGS.input, FLAGS.model, predictor.manifest["model"],
                len(predictor.labels), FLAGS.output,
                console.active().log_path)
    counts = predict_file(
        predictor, FLAGS.input, FLAGS.output,
        title_column=FLAGS.title_column, image_column=FLAGS.image_column,
        id_column=FLAGS.id_column, top_k=FLAGS.top_k,
        batch_size=FLAGS.batch_size)
    print(json.dumps({"output": FLAGS.output, **counts}), file=sys.stderr)
    return
  if FLAGS.title is None:
    raise app.UsageError("give --title (and --image), or --input/--output")
  try:
    result = predictor.predict([FLAGS.title], [FLAGS.image],
                               top_k=FLAGS.top_k)[0]
  except PredictionError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, ensure_ascii=False, indent=1))


def _score_split(predictor) -> None:
  """Split mode: every product of a prepared split, one row each."""
  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm
  from mic_jax import scoring
  # pylint: enable=g-import-not-at-top
  total = scoring.count(FLAGS.data_dir, FLAGS.split)
  if FLAGS.max_products:
    total = min(total, FLAGS.max_products)
  console.say("score    %s %s (%s products) with %s -> %s (log: %s)",
              FLAGS.data_dir, FLAGS.split, f"{total:,}", FLAGS.model,
              FLAGS.output, console.active().log_path)
  counts = {"ok": 0, "abstained": 0}
  try:
    rows = scoring.score_split(predictor, FLAGS.data_dir, FLAGS.split,
                               top_k=FLAGS.top_k, batch_size=FLAGS.batch_size,
                               max_products=FLAGS.max_products)
    with atomic_lines(FLAGS.output) as f, tqdm(
        total=total, unit=" products", disable=None) as bar:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts["ok"] += 1
        counts["abstained"] += row["abstain"]
        bar.update(1)
  except scoring.ScoringError as e:
    raise SystemExit(f"error: {e}") from e
  print(json.dumps({"output": FLAGS.output, **counts}), file=sys.stderr)


@contextlib.contextmanager
def atomic_lines(path: str) -> Iterator[Any]:
  """A text file that appears at ``path`` only when whole."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      yield f
    os.replace(tmp, out)
  except BaseException:
    os.unlink(tmp)
    raise


def run():
  """Console-script entry point (``mic-jax-predict``)."""
  _define_flags()
  flags.mark_flag_as_required("model")
  app.run(main)


if __name__ == "__main__":
  run()
