"""The products to review: a score file (``mic-jax-predict``) and its export.

Products the model abstained on come first, then the rest, each group from
the least to the most confident. Every row must name the export it was
scored with, and that export must be the one given (:func:`load`): a
decision records the export, and labels are checked against its list.

Photos are the bytes the model scored: a prepared split's record (its
stored JPEG, read once per shard) or the catalogue's photo file.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import threading
from typing import Any

from mic_jax.serving import bundle


class QueueError(ValueError):
  """The score file or the export cannot be reviewed; names the line."""


@dataclasses.dataclass(frozen=True)
class Queue:
  """Products in review order, the export's labels and taxonomy paths."""
  products: list[dict[str, Any]]
  by_id: dict[str, dict[str, Any]]
  labels: list[str]
  paths: dict[str, str]   # label -> its most frequent taxonomy path
  export: str             # The export's identity.
  model: str
  skipped_errors: int = 0  # Rows predict could not score ('error').

  def label_entries(self) -> list[dict[str, str]]:
    return [{"label": l, "path": self.paths.get(l, "")} for l in self.labels]


def _taxonomy_paths(taxonomy: dict[str, Any] | None, labels: list[str]
                    ) -> dict[str, str]:
  if not taxonomy:
    return {}
  out = {}
  for label in labels:
    parents = taxonomy.get("parents", {}).get(label) or {}
    if parents:
      out[label] = max(parents, key=parents.get) + " > " + label
  return out


def load(scores: str | pathlib.Path, export_dir: str | pathlib.Path
         ) -> Queue:
  """Reads the score file and the export's labels; checks they belong."""
  export_dir = pathlib.Path(export_dir)
  try:
    manifest = bundle.read_manifest(export_dir)
  except bundle.ExportDirError as e:
    raise QueueError(str(e)) from e
  identity = bundle.identity(export_dir)
  labels = bundle.read_labels(export_dir, manifest)
  known = set(labels)
  paths = _taxonomy_paths(bundle.read_taxonomy(export_dir, manifest), labels)
  products, by_id = [], {}
  skipped = 0
  path = pathlib.Path(scores)
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}:{line_no}"
      row = _parse_line(where, raw)
      if row is None:
        continue
      if "error" in row:
        skipped += 1  # predict could not score it: nothing to review.
        continue
      _check_row(where, row, identity, export_dir, known)
      if row["id"] in by_id:
        raise QueueError(f"{where}: product {row['id']!r} appears twice")
      row = {**row, "top_k": [{**e, "path": paths.get(e["label"], "")}
                              for e in row["top_k"]]}
      products.append(row)
      by_id[row["id"]] = row
  products.sort(key=lambda r: (not r.get("abstain"), r["top_k"][0]["prob"]))
  return Queue(products, by_id, labels, paths, identity,
               str(manifest.get("model", "")), skipped)


def _parse_line(where: str, raw: bytes) -> dict[str, Any] | None:
  """One score line as a dict (None when blank); a bad line raises
  :class:`QueueError` naming it, never a traceback at start-up."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise QueueError(f"{where}: not UTF-8 (byte {e.start})") from e
  if not line.strip():
    return None
  try:
    row = json.loads(line)
  except ValueError as e:  # JSONDecodeError, or an over-long number.
    raise QueueError(f"{where}: malformed JSON "
                     f"({getattr(e, 'msg', e)})") from e
  if not isinstance(row, dict):
    raise QueueError(f"{where}: a score line is a JSON object, got a "
                     f"{_json_type(row)}")
  return row


def _json_type(value: Any) -> str:
  return {list: "list", str: "string", bool: "boolean", type(None): "null",
          int: "number", float: "number"}.get(type(value), "value")


def _check_row(where: str, row: dict[str, Any], identity: str,
               export_dir: pathlib.Path, known: set[str]) -> None:
  """Raises :class:`QueueError` naming what of ``row`` cannot be reviewed."""
  if not isinstance(row.get("id"), str) or not row["id"]:
    raise QueueError(f"{where}: no product 'id' (score a file with an "
                     "id column, or a prepared split)")
  if row.get("export") != identity:
    raise QueueError(f"{where}: scored with export "
                     f"{str(row.get('export'))[:12]}..., not "
                     f"{export_dir} ({identity[:12]}...): review with "
                     "the export that made the scores")
  top_k = row.get("top_k")
  if not isinstance(top_k, list) or not top_k:
    raise QueueError(f"{where}: 'top_k' must be a list of "
                     '{"label", "prob"} entries, got ' + _json_type(top_k))
  for i, entry in enumerate(top_k, 1):
    if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
      raise QueueError(f"{where}: top_k entry {i} has no label")
    prob = entry.get("prob")
    if (not isinstance(prob, (int, float)) or isinstance(prob, bool)
        or not 0 <= prob <= 1):
      raise QueueError(f"{where}: top_k entry {i} ({entry['label']!r}) has "
                       f"probability {prob!r}, not a number in [0, 1]")
  bad = [e["label"] for e in top_k if e["label"] not in known]
  if bad:
    raise QueueError(f"{where}: labels {bad} are not the export's")
  photo = row.get("photo")
  if not (photo is None or (isinstance(photo, dict) and (
      isinstance(photo.get("file"), str) or (
          isinstance(photo.get("tfrecord"), str)
          and isinstance(photo.get("index"), int))))):
    raise QueueError(f"{where}: 'photo' must be null, {{\"file\": PATH}} or "
                     f'{{"tfrecord": PATH, "index": N}}, got {photo!r:.80}')


class Photos:
  """The photo bytes of each product, read on first use and kept."""

  def __init__(self, queue: Queue):
    self._queue = queue
    self._shards: dict[str, list[bytes]] = {}
    self._lock = threading.Lock()

  def get(self, product_id: str) -> bytes | None:
    """The JPEG (or the catalogue file) the model scored, or None."""
    photo = self._queue.by_id[product_id].get("photo")
    if not photo:
      return None
    if "file" in photo:
      return pathlib.Path(photo["file"]).read_bytes()
    from mic_jax import scoring  # pylint: disable=g-import-not-at-top
    with self._lock:
      if photo["tfrecord"] not in self._shards:
        self._shards[photo["tfrecord"]] = scoring.shard_photos(
            photo["tfrecord"])
      return self._shards[photo["tfrecord"]][photo["index"]] or None
