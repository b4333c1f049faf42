"""The products to review: a score file (``mic-jax-predict``) and its export.

Products the model abstained on come first, then the rest, each group from
the least to the most confident (ties in file order, so the order is
stable). The ``suspected_label_errors`` queue (:mod:`.suspects`) keeps
instead only the products whose catalogue label the model confidently
disagrees with, most suspicious first, and says how many it read and kept.
Every row must name the export it was scored with, and that export must be
the one given (:func:`load`): a decision records the export, and
labels are checked against its list.

At marketplace scale (a million products) the rows are not held as Python
objects: :func:`load` streams the score file once into an SQLite index (a
file of its own, never the shared review database), ranked in review order,
and the server reads it a page at a time (:meth:`Queue.page`). Progress
counts are kept in that index too, updated from the review database's
``history`` (append-only, so a decision made by another server process on
the same database is counted at the next request): a count never scans the
queue.

Photos are the bytes the model scored, read on demand: a prepared split's
record (found through the record offsets of its shard, indexed on first
use: eight bytes a record, never the photos themselves) or the catalogue's
photo file.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import sqlite3
import struct
import tempfile
import threading
from typing import Any, Iterator

from mic_jax.reviewing import suspects as suspects_lib
from mic_jax.serving import bundle

_BATCH = 5000  # Rows per insert while loading.

_SCHEMA = """
CREATE TABLE staging (line INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
  abstain INTEGER NOT NULL, grp INTEGER NOT NULL, key REAL NOT NULL,
  row TEXT NOT NULL, photo TEXT);
CREATE TABLE products (rank INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
  abstain INTEGER NOT NULL, row TEXT NOT NULL, photo TEXT, status TEXT);
CREATE TABLE counts (abstain INTEGER NOT NULL, status TEXT NOT NULL,
  n INTEGER NOT NULL, PRIMARY KEY (abstain, status));
CREATE TABLE synced (history_id INTEGER NOT NULL);
"""
UNDECIDED = ""  # The status of an undecided product in ``counts``.


class QueueError(ValueError):
  """The score file or the export cannot be reviewed; names the line."""


class Queue:
  """Products in review order (an SQLite index), the export's labels and
  taxonomy paths. Ranks are 1-based positions in review order; a page
  starts after a rank (the cursor)."""

  def __init__(self, index: pathlib.Path, labels: list[str],
               paths: dict[str, str], export: str, model: str,
               skipped_errors: int,
               selection: dict[str, Any] | None = None):
    self.index = index
    self.labels = labels
    self.paths = paths      # label -> its most frequent taxonomy path
    self.export = export    # The export's identity.
    self.model = model
    self.skipped_errors = skipped_errors  # Rows predict could not score.
    # Which products the queue holds: every scored one ("uncertain"), or a
    # selection with how many rows it read ("considered") and "kept".
    self.selection = selection or {"queue": "uncertain"}
    self._sync_lock = threading.Lock()
    with self._connect() as db:
      self.total = db.execute("SELECT count(*) FROM products").fetchone()[0]
      self.abstained = db.execute(
          "SELECT count(*) FROM products WHERE abstain").fetchone()[0]

  def __len__(self) -> int:
    return self.total

  @contextlib.contextmanager
  def _connect(self) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(self.index, isolation_level=None, timeout=30,
                         uri=True)  # For ATTACH of a read-only URI.
    try:
      yield db
    finally:
      db.close()

  def label_entries(self) -> list[dict[str, str]]:
    return [{"label": l, "path": self.paths.get(l, "")} for l in self.labels]

  def _product(self, rank: int, row: str, photo: str | None
               ) -> dict[str, Any]:
    """A row as the page gets it: taxonomy paths added, whether there is a
    photo (never the server's file paths)."""
    product = json.loads(row)
    product["top_k"] = [{**e, "path": self.paths.get(e["label"], "")}
                        for e in product["top_k"]]
    product["photo"] = photo is not None
    product["rank"] = rank
    return product

  def __contains__(self, product_id: object) -> bool:
    with self._connect() as db:
      return db.execute("SELECT 1 FROM products WHERE id = ?",
                        (product_id,)).fetchone() is not None

  def get(self, product_id: str) -> dict[str, Any] | None:
    """One product by id (as :meth:`page` gives it), or None."""
    with self._connect() as db:
      row = db.execute("SELECT rank, row, photo FROM products WHERE id = ?",
                       (product_id,)).fetchone()
    return self._product(*row) if row else None

  def photo_source(self, product_id: str) -> dict[str, Any] | None:
    with self._connect() as db:
      row = db.execute("SELECT photo FROM products WHERE id = ?",
                       (product_id,)).fetchone()
    return json.loads(row[0]) if row and row[0] else None

  def page(self, after: int = 0, limit: int = 100, *,
           undecided: bool = False) -> list[dict[str, Any]]:
    """Up to ``limit`` products ranked after ``after``, in review order
    (only the undecided ones when asked: call :meth:`sync` first)."""
    query = ("SELECT rank, row, photo FROM products WHERE rank > ? " +
             ("AND status IS NULL " if undecided else "") +
             "ORDER BY rank LIMIT ?")
    with self._connect() as db:
      rows = db.execute(query, (after, limit)).fetchall()
    return [self._product(*r) for r in rows]

  def first_undecided(self) -> int | None:
    """The rank where the reviewer stopped (call :meth:`sync` first)."""
    with self._connect() as db:
      row = db.execute("SELECT min(rank) FROM products WHERE status IS NULL"
                       ).fetchone()
    return row[0]

  def sync(self, store: Any) -> None:
    """Applies the review database's decisions recorded since the last
    call (its ``history``) to the statuses and counts of this queue; the
    first call reads the current decisions whole, in SQL."""
    with self._sync_lock, self._connect() as db:
      last = db.execute("SELECT history_id FROM synced").fetchone()[0]
      if last < 0:
        self._sync_all(db, store)
        return
      while rows := store.history_since(last):
        db.execute("BEGIN")
        try:
          for history_id, product_id, status in rows:
            last = history_id
            found = db.execute("SELECT abstain, status FROM products WHERE "
                               "id = ?", (product_id,)).fetchone()
            if found is None:  # A product of another queue.
              continue
            abstain, old = found
            db.execute("UPDATE products SET status = ? WHERE id = ?",
                       (status, product_id))
            db.execute("UPDATE counts SET n = n - 1 WHERE abstain = ? AND "
                       "status = ?", (abstain, old or UNDECIDED))
            db.execute("INSERT INTO counts VALUES (?, ?, 1) ON CONFLICT DO "
                       "UPDATE SET n = n + 1", (abstain, status))
          db.execute("UPDATE synced SET history_id = ?", (last,))
          db.execute("COMMIT")
        except BaseException:
          db.execute("ROLLBACK")
          raise

  @staticmethod
  def _sync_all(db: sqlite3.Connection, store: Any) -> None:
    """The statuses and counts from the current decisions, in one read of
    the review database (its decisions and last history row are of one
    snapshot, so the next :meth:`sync` misses nothing)."""
    uri = pathlib.Path(store.path).absolute().as_uri() + "?mode=ro"
    db.execute("ATTACH DATABASE ? AS review", (uri,))
    try:
      db.execute("BEGIN")
      try:
        last = db.execute("SELECT coalesce(max(id), 0) FROM review.history"
                          ).fetchone()[0]
        db.execute("UPDATE products SET status = d.status FROM "
                   "review.decisions d WHERE d.product_id = products.id")
        db.execute("DELETE FROM counts")
        db.execute("INSERT INTO counts SELECT abstain, coalesce(status, ?),"
                   " count(*) FROM products GROUP BY 1, 2", (UNDECIDED,))
        db.execute("UPDATE synced SET history_id = ?", (last,))
        db.execute("COMMIT")
      except BaseException:
        db.execute("ROLLBACK")
        raise
    finally:
      db.execute("DETACH DATABASE review")

  def progress(self, store: Any) -> dict[str, Any]:
    """Decided and remaining products, overall, of the abstained ones and
    per decision status: a few rows of counts, never a scan."""
    self.sync(store)
    with self._connect() as db:
      counts = db.execute("SELECT abstain, status, n FROM counts").fetchall()
    states: dict[str, int] = {}
    undecided = abstained_undecided = 0
    for abstain, status, n in counts:
      if status == UNDECIDED:
        undecided += n
        abstained_undecided += n if abstain else 0
      else:
        states[status] = states.get(status, 0) + n
    return {"total": self.total, "decided": self.total - undecided,
            "remaining": undecided, "abstained": self.abstained,
            "abstained_decided": self.abstained - abstained_undecided,
            "states": states}


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


def _temporary_dir() -> pathlib.Path:
  """A folder for an index, removed when the program ends."""
  path = pathlib.Path(tempfile.mkdtemp(prefix="mic-review-queue-"))
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def load(scores: str | pathlib.Path, export_dir: str | pathlib.Path, *,
         index: str | pathlib.Path | None = None,
         suspects: suspects_lib.Suspects | None = None) -> Queue:
  """Reads the score file into an SQLite index (``index``, or a temporary
  file) in review order, and the export's labels; checks they belong.
  With ``suspects``, only the suspected label errors, most suspicious
  first (:mod:`.suspects`)."""
  export_dir = pathlib.Path(export_dir)
  try:
    manifest = bundle.read_manifest(export_dir)
  except bundle.ExportDirError as e:
    raise QueueError(str(e)) from e
  identity = bundle.identity(export_dir)
  labels = bundle.read_labels(export_dir, manifest)
  known = set(labels)
  paths = _taxonomy_paths(bundle.read_taxonomy(export_dir, manifest), labels)
  index = pathlib.Path(index) if index else _temporary_dir() / "queue.sqlite"
  if index.exists():
    index.unlink()
  skipped = considered = kept = 0
  path = pathlib.Path(scores)
  db = sqlite3.connect(index, isolation_level=None)
  try:
    db.execute("PRAGMA journal_mode=OFF")  # Rebuilt at each start anyway.
    db.execute("PRAGMA synchronous=OFF")
    db.executescript(_SCHEMA)
    db.execute("BEGIN")
    batch: list[tuple[Any, ...]] = []
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
        considered += 1
        abstain = bool(row.get("abstain"))
        if suspects is None:  # Abstained first, least confident first.
          grp, key = (0 if abstain else 1), row["top_k"][0]["prob"]
        else:
          try:
            margin = suspects.margin(row, known)
          except suspects_lib.SuspectsError as e:
            raise QueueError(f"{where}: {e}") from e
          if margin is None:
            continue
          grp, key = 0, -margin  # Largest margin first.
          row["label_prob"] = suspects_lib.catalogue_prob(row)
          row["margin"] = margin
        kept += 1
        photo = row.pop("photo", None)
        row.pop("export", None)
        batch.append((line_no, row["id"], abstain, grp, key, json.dumps(row),
                      json.dumps(photo) if photo else None))
        if len(batch) >= _BATCH:
          _insert(db, batch, path)
    _insert(db, batch, path)
    db.execute("INSERT INTO products (id, abstain, row, photo) SELECT id, "
               "abstain, row, photo FROM staging ORDER BY grp, key, line")
    db.execute("DROP TABLE staging")
    db.execute("CREATE INDEX undecided ON products (rank) WHERE status IS "
               "NULL")
    db.execute("INSERT INTO counts SELECT abstain, ?, count(*) FROM products"
               " GROUP BY abstain", (UNDECIDED,))
    db.execute("INSERT INTO synced VALUES (-1)")  # Never synced.
    db.execute("COMMIT")
    db.execute("VACUUM")
  finally:
    db.close()
  selection = None
  if suspects is not None:
    selection = {"queue": suspects_lib.NAME, "considered": considered,
                 "kept": kept, **dataclasses.asdict(suspects),
                 "description": suspects.describe()}
  return Queue(index, labels, paths, identity,
               str(manifest.get("model", "")), skipped, selection)


def _insert(db: sqlite3.Connection, batch: list[tuple[Any, ...]],
            path: pathlib.Path) -> None:
  """Adds a batch of rows; a product id seen before is named by line."""
  try:
    db.executemany("INSERT INTO staging VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
  except sqlite3.IntegrityError:
    # The rows before the failing one went in: it is the first whose id
    # is there already from an earlier line.
    for entry in batch:
      seen = db.execute("SELECT line FROM staging WHERE id = ?",
                        (entry[1],)).fetchone()
      if seen is not None and seen[0] < entry[0]:
        db.execute("ROLLBACK")
        raise QueueError(f"{path}:{entry[0]}: product {entry[1]!r} appears "
                         "twice") from None
    raise
  batch.clear()


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
  """The photo bytes of a product, read when asked: a catalogue file, or
  one record of a prepared shard (its offset found in the shard's record
  offsets, indexed on first use; no photo is kept)."""

  def __init__(self, queue: Queue):
    self._queue = queue
    self._offsets: dict[str, list[int]] = {}
    self._lock = threading.Lock()

  def get(self, product_id: str) -> bytes | None:
    """The JPEG (or the catalogue file) the model scored, or None."""
    photo = self._queue.photo_source(product_id)
    if not photo:
      return None
    if "file" in photo:
      return pathlib.Path(photo["file"]).read_bytes()
    shard = photo["tfrecord"]
    with self._lock:
      if shard not in self._offsets:
        self._offsets[shard] = _record_offsets(shard)
      offsets = self._offsets[shard]
    if not 0 <= photo["index"] < len(offsets):
      return None
    with open(shard, "rb") as f:
      f.seek(offsets[photo["index"]])
      (length,) = struct.unpack("<Q", f.read(8))
      f.seek(4, os.SEEK_CUR)  # The length's CRC.
      record = f.read(length)
    from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
    example = example_pb2.Example.FromString(record)
    values = example.features.feature["image/encoded"].bytes_list.value
    return values[0] if values and values[0] else None


def _record_offsets(shard: str) -> list[int]:
  """Where each record of a TFRecord file starts (each is a little-endian
  uint64 length, its CRC, the data and the data's CRC): headers only."""
  offsets = []
  size = os.path.getsize(shard)
  with open(shard, "rb") as f:
    position = 0
    while position + 12 <= size:
      offsets.append(position)
      f.seek(position)
      (length,) = struct.unpack("<Q", f.read(8))
      position += 8 + 4 + length + 4
  return offsets
