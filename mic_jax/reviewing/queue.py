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
  path = pathlib.Path(scores)
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise QueueError(f"{where}: malformed JSON ({e.msg})") from e
      if "error" in row:
        continue  # A product predict could not score: nothing to review.
      if not isinstance(row.get("id"), str) or not row["id"]:
        raise QueueError(f"{where}: no product 'id' (score a file with an "
                         "id column, or a prepared split)")
      if row.get("export") != identity:
        raise QueueError(f"{where}: scored with export "
                         f"{str(row.get('export'))[:12]}..., not "
                         f"{export_dir} ({identity[:12]}...): review with "
                         "the export that made the scores")
      if row["id"] in by_id:
        raise QueueError(f"{where}: product {row['id']!r} appears twice")
      bad = [e["label"] for e in row.get("top_k", [])
             if e["label"] not in known]
      if bad or not row.get("top_k"):
        raise QueueError(f"{where}: labels {bad} are not the export's")
      row = {**row, "top_k": [{**e, "path": paths.get(e["label"], "")}
                              for e in row["top_k"]]}
      products.append(row)
      by_id[row["id"]] = row
  products.sort(key=lambda r: (not r.get("abstain"), r["top_k"][0]["prob"]))
  return Queue(products, by_id, labels, paths, identity,
               str(manifest.get("model", "")))


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
