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

The index is built in bulk (large ``executemany`` batches into a file with
no journal, the rows in file order; ranked in a narrow table and indexed
after the load) and,
given an ``index_dir`` (the program's: beside the review database), kept:
its file is named after what shapes it (the score file's SHA-256 and size,
the export, the queue kind and its thresholds, :data:`INDEX_VERSION`), so
a start on an unchanged score file reuses it and a changed byte builds
another. A build writes a temporary file and links it under its name only
once complete (its ``meta`` says so too): an interrupted build, even a
killed one, is never served, and its leftover is removed at a later start.
A server holds a shared ``flock`` on the index it serves, so only indexes
no server uses are removed (all but the :data:`KEEP_INDEXES` most recently
used).

Photos are the bytes the model scored, read on demand: a prepared split's
record (found through the record offsets of its shard, indexed on first
use: eight bytes a record, never the photos themselves) or the catalogue's
photo file.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import sqlite3
import struct
import tempfile
import threading
import time
from typing import Any, Iterator

from mic_jax.reviewing import suspects as suspects_lib
from mic_jax.serving import bundle

_BATCH = 20_000  # Rows per executemany while loading.
INDEX_VERSION = 2  # Of the index's layout: another version builds anew.
KEEP_INDEXES = 3   # Unused indexes kept in an index_dir (most recent).
_HASH_BLOCK = 1 << 20

# ``rows``: the score file's rows in file order, as read; ``products``:
# the queue in review order (rank), narrow (what a count, a status update
# or a look-up by id reads), each naming its row by line.
_SCHEMA = """
CREATE TABLE rows (line INTEGER PRIMARY KEY, id TEXT NOT NULL,
  abstain INTEGER NOT NULL, grp INTEGER NOT NULL, key REAL NOT NULL,
  row TEXT NOT NULL, photo_file TEXT, photo_shard TEXT, photo_index INTEGER);
CREATE TABLE products (rank INTEGER PRIMARY KEY, line INTEGER NOT NULL,
  id TEXT NOT NULL, abstain INTEGER NOT NULL, status TEXT);
CREATE TABLE counts (abstain INTEGER NOT NULL, status TEXT NOT NULL,
  n INTEGER NOT NULL, PRIMARY KEY (abstain, status));
CREATE TABLE synced (history_id INTEGER NOT NULL, product_id TEXT);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
UNDECIDED = ""  # The status of an undecided product in ``counts``.


class QueueError(ValueError):
  """The score file or the export cannot be reviewed; names the line."""


class Queue:
  """Products in review order (an SQLite index), the export's labels and
  taxonomy paths. Ranks are 1-based positions in review order; a page
  starts after a rank (the cursor).

  One connection to the index serves every thread (under a lock): it is
  opened once, and keeps the file it opened (an index another start
  removes stays readable to this one)."""

  def __init__(self, index: pathlib.Path, labels: list[str],
               paths: dict[str, str], export: str, model: str,
               reused: bool = False):
    self.index = index
    self.labels = labels
    self.paths = paths      # label -> its most frequent taxonomy path
    self.export = export    # The export's identity.
    self.model = model
    self.reused = reused    # Whether a previous start's index was reused.
    self._lock = threading.RLock()
    self._checked = False  # Whether sync checked the database's history.
    self._db = sqlite3.connect(index, isolation_level=None, timeout=30,
                               check_same_thread=False, uri=True)
    self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: consistent.
    # Held while this queue lives: indexes in use are never pruned.
    self._flock = os.open(index, os.O_RDONLY)
    fcntl.flock(self._flock, fcntl.LOCK_SH)
    meta = dict(self._db.execute("SELECT name, value FROM meta"))
    self.total = int(meta["total"])
    self.abstained = int(meta["abstained"])
    self.skipped_errors = int(meta["skipped"])  # Rows predict could not score.
    # Which products the queue holds: every scored one ("uncertain"), or a
    # selection with how many rows it read ("considered") and "kept".
    self.selection = json.loads(meta["selection"])

  def __len__(self) -> int:
    return self.total

  def close(self) -> None:
    with self._lock:
      self._db.close()
      os.close(self._flock)

  @contextlib.contextmanager
  def _connect(self) -> Iterator[sqlite3.Connection]:
    with self._lock:
      yield self._db

  def label_entries(self) -> list[dict[str, str]]:
    return [{"label": l, "path": self.paths.get(l, "")} for l in self.labels]

  def _product(self, rank: int, row: str, has_photo: bool
               ) -> dict[str, Any]:
    """A row as the page gets it: taxonomy paths added, whether there is a
    photo (never the server's file paths)."""
    product = json.loads(row)
    product.pop("export", None)
    product["top_k"] = [{**e, "path": self.paths.get(e["label"], "")}
                        for e in product["top_k"]]
    product["photo"] = bool(has_photo)
    product["rank"] = rank
    return product

  # A product's rank, row and whether it has a photo, from
  # ``products p CROSS JOIN rows r`` (p first: by rank, or by id).
  _SELECT = ("SELECT p.rank, r.row, r.photo_file IS NOT NULL OR "
             "r.photo_shard IS NOT NULL FROM products p CROSS JOIN rows r "
             "ON r.line = p.line ")

  def __contains__(self, product_id: object) -> bool:
    with self._connect() as db:
      return db.execute("SELECT 1 FROM products WHERE id = ?",
                        (product_id,)).fetchone() is not None

  def get(self, product_id: str) -> dict[str, Any] | None:
    """One product by id (as :meth:`page` gives it), or None."""
    with self._connect() as db:
      row = db.execute(self._SELECT + "WHERE p.id = ?",
                       (product_id,)).fetchone()
    return self._product(*row) if row else None

  def photo_source(self, product_id: str) -> dict[str, Any] | None:
    with self._connect() as db:
      row = db.execute("SELECT r.photo_file, r.photo_shard, r.photo_index "
                       "FROM products p CROSS JOIN rows r ON r.line = "
                       "p.line WHERE p.id = ?", (product_id,)).fetchone()
    if not row or (row[0] is None and row[1] is None):
      return None
    if row[0] is not None:
      return {"file": row[0]}
    return {"tfrecord": row[1], "index": row[2]}

  def page(self, after: int = 0, limit: int = 100, *,
           undecided: bool = False) -> list[dict[str, Any]]:
    """Up to ``limit`` products ranked after ``after``, in review order
    (only the undecided ones when asked: call :meth:`sync` first)."""
    query = (self._SELECT + "WHERE p.rank > ? " +
             ("AND p.status IS NULL " if undecided else "") +
             "ORDER BY p.rank LIMIT ?")
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
    first call on an index (or on an index whose last synced decision the
    review database does not have: another database) reads the current
    decisions whole, in SQL. Each step is one write transaction of the
    index, the last synced row read inside it: two servers sharing the
    index never apply a decision twice."""
    with self._connect() as db:
      last, product = db.execute(
          "SELECT history_id, product_id FROM synced").fetchone()
      if not self._checked:  # Once: is it the database synced with?
        if last > 0 and not store.has_history_row(last, product):
          last, product = -1, "another database"
        self._checked = True
      if last < 0:  # Never synced (a new index), or another database.
        self._sync_all(db, store, reset=product is not None)
        return
      while rows := store.history_since(last):
        db.execute("BEGIN IMMEDIATE")
        try:
          now, _ = db.execute(
              "SELECT history_id, product_id FROM synced").fetchone()
          if now != last:  # Another server synced meanwhile: read again.
            db.execute("ROLLBACK")
            last = now
            continue
          for history_id, product_id, status in rows:
            last, product = history_id, product_id
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
          db.execute("UPDATE synced SET history_id = ?, product_id = ?",
                     (last, product))
          db.execute("COMMIT")
        except BaseException:
          db.execute("ROLLBACK")
          raise

  @staticmethod
  def _sync_all(db: sqlite3.Connection, store: Any, reset: bool) -> None:
    """The statuses and counts from the current decisions, in one read of
    the review database (its decisions and last history row are of one
    snapshot, so the next :meth:`sync` misses nothing)."""
    uri = pathlib.Path(store.path).absolute().as_uri() + "?mode=ro"
    db.execute("ATTACH DATABASE ? AS review", (uri,))
    try:
      db.execute("BEGIN IMMEDIATE")
      try:
        last = db.execute("SELECT id, product_id FROM review.history "
                          "ORDER BY id DESC LIMIT 1").fetchone() or (0, None)
        if reset:  # Statuses of another database: none is kept.
          db.execute("UPDATE products SET status = NULL WHERE status IS "
                     "NOT NULL")
        db.execute("UPDATE products SET status = d.status FROM "
                   "review.decisions d WHERE d.product_id = products.id")
        db.execute("DELETE FROM counts")
        db.execute("INSERT INTO counts SELECT abstain, coalesce(status, ?),"
                   " count(*) FROM products GROUP BY 1, 2", (UNDECIDED,))
        db.execute("UPDATE synced SET history_id = ?, product_id = ?", last)
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
      elif n:
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


def file_digest(path: pathlib.Path) -> tuple[str, int, int]:
  """(SHA-256, size, mtime_ns) of a file, read in blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    stat = os.fstat(f.fileno())
    while block := f.read(_HASH_BLOCK):
      digest.update(block)
  return digest.hexdigest(), stat.st_size, stat.st_mtime_ns


def index_key(sha256: str, size: int, identity: str,
              suspects: suspects_lib.Suspects | None) -> dict[str, Any]:
  """What shapes an index: the score file's content, the export, the
  queue kind and its thresholds, the layout's version."""
  return {"version": INDEX_VERSION, "scores_sha256": sha256,
          "scores_size": size, "export": identity,
          "queue": "uncertain" if suspects is None else suspects_lib.NAME,
          "suspects": dataclasses.asdict(suspects) if suspects else None}


def _key_name(key: dict[str, Any]) -> str:
  text = json.dumps(key, sort_keys=True)
  return "queue-" + hashlib.sha256(text.encode()).hexdigest()[:32] + ".sqlite"


def _complete(index: pathlib.Path, key: dict[str, Any]) -> bool:
  """Whether ``index`` is a whole index built for ``key`` (not a half
  written or foreign file, nor one of another key)."""
  try:
    db = sqlite3.connect(f"{index.absolute().as_uri()}?mode=ro", uri=True,
                         timeout=30)
    try:
      meta = dict(db.execute("SELECT name, value FROM meta"))
      if meta.get("complete") != "1" or json.loads(
          meta.get("key", "null")) != key:
        return False
      total = db.execute("SELECT max(rank) FROM products").fetchone()[0]
      return (total or 0) == int(meta["total"])
    finally:
      db.close()
  except (sqlite3.Error, ValueError, KeyError):
    return False


def load(scores: str | pathlib.Path, export_dir: str | pathlib.Path, *,
         index_dir: str | pathlib.Path | None = None,
         suspects: suspects_lib.Suspects | None = None) -> Queue:
  """The queue of a score file: its SQLite index, and the export's labels;
  checks they belong. With ``index_dir``, an index built there before for
  the same score file content, export and queue options is reused, else
  one is built there and kept (see the module doc); without, one is built
  in a temporary folder removed at exit. With ``suspects``, only the
  suspected label errors, most suspicious first (:mod:`.suspects`)."""
  export_dir = pathlib.Path(export_dir)
  try:
    manifest = bundle.read_manifest(export_dir)
  except bundle.ExportDirError as e:
    raise QueueError(str(e)) from e
  identity = bundle.identity(export_dir)
  labels = bundle.read_labels(export_dir, manifest)
  paths = _taxonomy_paths(bundle.read_taxonomy(export_dir, manifest), labels)
  path = pathlib.Path(scores)
  sha256, size, mtime = file_digest(path)
  key = index_key(sha256, size, identity, suspects)
  model = str(manifest.get("model", ""))
  directory = pathlib.Path(index_dir) if index_dir else _temporary_dir()
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise QueueError(f"queue index folder {directory}: {e}") from e
  index = directory / _key_name(key)
  reused = _complete(index, key)
  if not reused:
    if index.exists() and not _in_use(index):  # Half written or foreign.
      _remove(index)  # (One a server holds is whole: never removed.)
    building = directory / f"{index.name}.building-{os.getpid()}"
    try:
      _build(building, path, key, identity, export_dir, set(labels),
             suspects)
      if os.stat(path).st_size != size or os.stat(path).st_mtime_ns != mtime:
        raise QueueError(f"{path}: changed while it was read; start again")
      try:  # Under its name only when whole; another start's may win.
        os.link(building, index)
      except FileExistsError:
        if not _complete(index, key):
          raise
    finally:
      _remove(building)
  os.utime(index)  # Most recently used: pruned last.
  queue = Queue(index, labels, paths, identity, model, reused)
  if index_dir:
    _prune(directory, keep=index)
  return queue


def _remove(index: pathlib.Path) -> None:
  for suffix in ("", "-wal", "-shm", "-journal"):
    with contextlib.suppress(FileNotFoundError):
      os.unlink(f"{index}{suffix}")


def _prune(directory: pathlib.Path, keep: pathlib.Path) -> None:
  """Removes the index files of ``directory`` no server holds (a build
  holds its file too): leftovers of interrupted builds, and all but the
  :data:`KEEP_INDEXES` most recently used indexes."""
  indexes, leftovers = [], []
  for entry in directory.glob("queue-*.sqlite*"):
    name = entry.name
    if name.endswith(("-wal", "-shm", "-journal")) or entry == keep:
      continue
    (leftovers if ".building-" in name else indexes).append(entry)
  indexes.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0,
               reverse=True)
  for entry in leftovers + indexes[KEEP_INDEXES - 1:]:
    if _in_use(entry):
      continue
    _remove(entry)


def _in_use(path: pathlib.Path) -> bool:
  """Whether a server or a build holds ``path`` (its ``flock``)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return True
  finally:
    os.close(fd)  # Releases the lock too.
  return False


def _build(index: pathlib.Path, path: pathlib.Path, key: dict[str, Any],
           identity: str, export_dir: pathlib.Path, known: set[str],
           suspects: suspects_lib.Suspects | None) -> None:
  """Streams the score file into a new index at ``index`` (held under an
  exclusive ``flock`` while it is built): rows in file order, then ranked
  in review order into ``products``, indexed, counted; ``meta`` marks it
  complete in the last transaction."""
  _remove(index)
  fd = os.open(index, os.O_RDWR | os.O_CREAT, 0o644)
  fcntl.flock(fd, fcntl.LOCK_EX)
  db = sqlite3.connect(index, isolation_level=None)
  try:
    for pragma in ("journal_mode=OFF", "synchronous=OFF",
                   "cache_size=-65536", "temp_store=FILE"):
      db.execute(f"PRAGMA {pragma}")
    db.executescript(_SCHEMA)
    skipped, considered, kept = _stream(db, path, identity, export_dir,
                                        known, suspects)
    db.execute("BEGIN")
    # Ranked: a sort of narrow tuples; the rows stay where they are.
    db.execute("INSERT INTO products (line, id, abstain) SELECT line, id, "
               "abstain FROM rows ORDER BY grp, key, line")
    try:
      db.execute("CREATE UNIQUE INDEX products_id ON products (id)")
    except sqlite3.IntegrityError:
      line, product = db.execute(
          "SELECT line, id FROM (SELECT line, id, row_number() OVER "
          "(PARTITION BY id ORDER BY line) AS k FROM products) "
          "WHERE k = 2 ORDER BY line LIMIT 1").fetchone()
      db.execute("ROLLBACK")
      raise QueueError(f"{path}:{line}: product {product!r} appears "
                       "twice") from None
    db.execute("COMMIT")
    db.execute("BEGIN")
    db.execute("CREATE INDEX undecided ON products (rank) WHERE status IS "
               "NULL")
    db.execute("INSERT INTO counts SELECT abstain, ?, count(*) FROM products"
               " GROUP BY abstain", (UNDECIDED,))
    db.execute("INSERT INTO synced VALUES (-1, NULL)")  # Never synced.
    total = db.execute("SELECT count(*) FROM products").fetchone()[0]
    abstained = db.execute("SELECT count(*) FROM products WHERE abstain"
                           ).fetchone()[0]
    selection: dict[str, Any] = {"queue": "uncertain"}
    if suspects is not None:
      selection = {"queue": suspects_lib.NAME, "considered": considered,
                   "kept": kept, **dataclasses.asdict(suspects),
                   "description": suspects.describe()}
    db.executemany("INSERT INTO meta VALUES (?, ?)", [
        ("key", json.dumps(key)), ("total", str(total)),
        ("abstained", str(abstained)), ("skipped", str(skipped)),
        ("selection", json.dumps(selection)),
        ("built", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        ("complete", "1")])
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=WAL")  # Served: readers never wait.
  finally:
    db.close()
    os.close(fd)


def _stream(db: sqlite3.Connection, path: pathlib.Path, identity: str,
            export_dir: pathlib.Path, known: set[str],
            suspects: suspects_lib.Suspects | None) -> tuple[int, int, int]:
  """Reads the score file a line at a time into ``rows`` in batches; returns (rows skipped for 'error', considered, kept)."""
  skipped = considered = kept = 0
  batch: list[tuple[Any, ...]] = []
  insert = "INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
  db.execute("BEGIN")
  loads = json.loads
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:  # The usual line, quickly; any other through _parse_line.
        text = raw.decode("utf-8")
        row = loads(text)
      except ValueError:  # UnicodeDecodeError and JSONDecodeError too.
        row = None
      if row.__class__ is not dict:
        row = _parse_line(f"{path}:{line_no}", raw)  # Raises, or blank.
        if row is None:
          continue
      if "error" in row:
        skipped += 1  # predict could not score it: nothing to review.
        continue
      if not _row_ok(row, identity, known):
        _check_row(f"{path}:{line_no}", row, identity, export_dir, known)  # Says why.
      considered += 1
      abstain = bool(row.get("abstain"))
      photo = row.get("photo")
      if suspects is None:  # Abstained first, least confident first.
        grp, key = (0 if abstain else 1), row["top_k"][0]["prob"]
        # ``text``, the line as it is: parsed again when served.
      else:
        try:
          margin = suspects.margin(row, known)
        except suspects_lib.SuspectsError as e:
          raise QueueError(f"{path}:{line_no}: {e}") from e
        if margin is None:
          continue
        grp, key = 0, -margin  # Largest margin first.
        row["label_prob"] = suspects_lib.catalogue_prob(row)
        row["margin"] = margin
        row.pop("photo", None)
        text = json.dumps(row)
      kept += 1
      if photo is None:
        file = shard = number = None
      elif isinstance(photo.get("file"), str):
        file, shard, number = photo["file"], None, None
      else:
        file, shard, number = None, photo["tfrecord"], photo["index"]
      batch.append((line_no, row["id"], abstain, grp, key, text, file,
                    shard, number))
      if len(batch) >= _BATCH:
        db.executemany(insert, batch)
        batch.clear()
  db.executemany(insert, batch)
  db.execute("COMMIT")
  return skipped, considered, kept


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


def _row_ok(row: dict[str, Any], identity: str, known: set[str]) -> bool:
  """Whether ``row`` is reviewable, decided quickly (exact types, as
  ``json`` makes them); when not, :func:`_check_row` says why."""
  product = row.get("id")
  if product.__class__ is not str or not product or row.get(
      "export") != identity:
    return False
  top_k = row.get("top_k")
  if top_k.__class__ is not list or not top_k:
    return False
  for entry in top_k:
    if entry.__class__ is not dict:
      return False
    label, prob = entry.get("label"), entry.get("prob")
    if label.__class__ is not str or label not in known:
      return False
    kind = prob.__class__
    if (kind is not float and kind is not int) or not 0 <= prob <= 1:
      return False
  photo = row.get("photo")
  if photo is None:
    return True
  return photo.__class__ is dict and (photo.get("file").__class__ is str or (
      photo.get("tfrecord").__class__ is str
      and photo.get("index").__class__ is int))


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
