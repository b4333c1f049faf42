"""Reviewers and their decisions, in one SQLite file (WAL mode).

Tables::

  reviewers  name, token_sha256, created, revoked (when, or NULL)
  sessions   id_sha256, reviewer, created: one per browser sign-in
  decisions  product_id, status, label, reviewer, export, decided_at,
             version: the current decision per product
  history    every decision ever made (the current one included), with
             the version it replaced: nothing is overwritten unseen

A token is ``secrets.token_urlsafe(32)`` (256 random bits), shown once by
:func:`add_reviewer`; only its SHA-256 is stored. A slow password hash is
not needed for a secret that is not guessable to begin with; the lookup
compares the hashes of every reviewer in constant time
(``hmac.compare_digest``), so timing says nothing about a stored hash.

The browser's cookie holds a session id (as random as a token, stored
hashed too), never the token: signing out ends that session, and
:meth:`Store.revoke_reviewer` ends a reviewer's token and every session.
A session lasts :data:`SESSION_DAYS` days.

A decision is written only against the version its author saw
(``base_version``: 0 for an undecided product). When another reviewer
decided the product in between, :class:`Conflict` carries that decision
and nothing is written; the author may decide again with the version it
now saw. Every write is one ``BEGIN IMMEDIATE`` transaction, so two
processes or threads deciding at once are serialized by SQLite.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import hmac
import io
import os
import pathlib
import re
import secrets
import sqlite3
from typing import Any, Iterator

ACCEPTED = "accepted"      # One of the model's labels is right.
RELABELLED = "relabelled"  # Another label, chosen from the label list.
UNCLEAR = "unclear"        # The reviewer cannot tell; no label.
STATUSES = (ACCEPTED, RELABELLED, UNCLEAR)
# Versions stay below 2**53, so the page's JavaScript numbers hold them.
MAX_VERSION = 2 ** 53 - 1
# What secrets.token_urlsafe makes; anything else (non-UTF-8 bytes, other
# characters, an empty or huge value) is no token and is not looked up.
SESSION_DAYS = 7
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{16,128}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviewers (
  name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE,
  created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
  id_sha256 TEXT PRIMARY KEY, reviewer TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
  product_id TEXT PRIMARY KEY, status TEXT NOT NULL, label TEXT,
  reviewer TEXT NOT NULL, export TEXT NOT NULL, decided_at TEXT NOT NULL,
  version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS history (
  id INTEGER PRIMARY KEY AUTOINCREMENT, product_id TEXT NOT NULL,
  status TEXT NOT NULL, label TEXT, reviewer TEXT NOT NULL,
  export TEXT NOT NULL, decided_at TEXT NOT NULL, version INTEGER NOT NULL,
  replaced_version INTEGER NOT NULL);
"""


class StoreError(ValueError):
  """A request the store refuses (bad name, bad status); says why."""


class Busy(Exception):
  """Another process held the database longer than ``busy_timeout``; the
  request may be tried again (the server answers 503)."""


@dataclasses.dataclass(frozen=True)
class Decision:
  """The current decision on one product."""
  product_id: str
  status: str
  label: str | None
  reviewer: str
  export: str
  decided_at: str
  version: int

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class Conflict(Exception):
  """The product was decided (again) since the author looked at it."""

  def __init__(self, current: Decision | None, base_version: int):
    who = (f"decided by {current.reviewer} at {current.decided_at} as "
           f"{current.status}" + (f" {current.label!r}" if current.label
                                  else "") + f" (version {current.version})"
           if current else "not decided")
    super().__init__(f"product {current.product_id if current else '?'} is "
                     f"{who}; you saw version {base_version}")
    self.current = current
    self.base_version = base_version


def well_formed(token: str | None) -> bool:
  """Whether ``token`` could be one this store made (checked before any
  hashing, so odd bytes in a header give 401, not an error)."""
  return isinstance(token, str) and bool(_TOKEN_SHAPE.fullmatch(token))


def token_hash(token: str) -> str:
  """Hex SHA-256 of a token (what the store keeps)."""
  return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


class Store:
  """One SQLite review database; a connection per call, so any thread
  (the server's executor, a test's threads) may use it."""

  def __init__(self, path: str | os.PathLike[str], *,
               busy_timeout: float = 5.0):
    self.path = pathlib.Path(path)
    # How long a write waits for another process's transaction; after it,
    # :class:`Busy` (a page would rather retry than hang for 30 s).
    self.busy_timeout = busy_timeout
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with self._connect() as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        columns = {r["name"] for r in db.execute(
            "PRAGMA table_info(reviewers)")}
        if "revoked" not in columns:  # A database of an older version.
          db.execute("ALTER TABLE reviewers ADD COLUMN revoked TEXT")
    except (OSError, sqlite3.Error) as e:
      # A read-only file or folder, a directory, not a database: say which
      # file, not a traceback.
      raise StoreError(f"review database {self.path}: {e} (give --db a "
                       "writable SQLite file, or a new path)") from e

  @contextlib.contextmanager
  def _connect(self) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(self.path, timeout=self.busy_timeout,
                         isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
      yield db
    except sqlite3.OperationalError as e:
      if "locked" in str(e) or "busy" in str(e):
        raise Busy(f"the review database {self.path.name} is busy (another "
                   f"program is writing to it); try again") from e
      raise
    finally:
      db.close()

  # ----------------------------------------------------------- reviewers --

  def add_reviewer(self, name: str) -> str:
    """Creates reviewer ``name``; returns its token (stored only hashed)."""
    name = name.strip()
    if not name or len(name) > 64 or any(c in name for c in "\r\n\t"):
      raise StoreError(f"a reviewer name is 1-64 characters on one line, "
                       f"got {name!r}")
    token = secrets.token_urlsafe(32)
    with self._connect() as db:
      try:
        db.execute("INSERT INTO reviewers (name, token_sha256, created) "
                   "VALUES (?, ?, ?)", (name, token_hash(token), _now()))
      except sqlite3.IntegrityError as e:
        raise StoreError(f"reviewer {name!r} exists already") from e
    return token

  def reviewer_of(self, token: str | None) -> str | None:
    """The reviewer a token belongs to, or None."""
    if not well_formed(token):
      return None
    wanted = token_hash(token)
    with self._connect() as db:
      rows = db.execute("SELECT name, token_sha256 FROM reviewers "
                        "WHERE revoked IS NULL").fetchall()
    found = None
    for row in rows:  # Every row, no early exit: constant time per row.
      if hmac.compare_digest(row["token_sha256"], wanted):
        found = row["name"]
    return found

  def revoke_reviewer(self, name: str) -> int:
    """Ends ``name``'s token and sessions (the name stays taken, so past
    decisions keep naming one person); returns how many sessions ended."""
    with self._connect() as db:
      db.execute("BEGIN IMMEDIATE")
      try:
        found = db.execute("UPDATE reviewers SET revoked = ? WHERE name = ? "
                           "AND revoked IS NULL", (_now(), name)).rowcount
        ended = db.execute("DELETE FROM sessions WHERE reviewer = ?",
                           (name,)).rowcount
        db.execute("COMMIT")
      except BaseException:
        db.execute("ROLLBACK")
        raise
    if not found:
      raise StoreError(f"no reviewer {name!r} (or revoked already) in "
                       f"{self.path}")
    return ended

  # ------------------------------------------------------------ sessions --

  def start_session(self, reviewer: str) -> str:
    """A new session of ``reviewer``: its id (for the cookie; stored
    only hashed)."""
    session = secrets.token_urlsafe(32)
    with self._connect() as db:
      db.execute("INSERT INTO sessions VALUES (?, ?, ?)",
                 (token_hash(session), reviewer, _now()))
    return session

  def session_reviewer(self, session: str | None) -> str | None:
    """The reviewer of a live session (not ended, not expired, reviewer
    not revoked), or None."""
    if not well_formed(session):
      return None
    oldest = (datetime.datetime.now(datetime.timezone.utc) -
              datetime.timedelta(days=SESSION_DAYS)).isoformat(
                  timespec="seconds")
    with self._connect() as db:
      row = db.execute(
          "SELECT s.reviewer FROM sessions s JOIN reviewers r ON "
          "r.name = s.reviewer WHERE s.id_sha256 = ? AND s.created >= ? "
          "AND r.revoked IS NULL", (token_hash(session), oldest)).fetchone()
    return row["reviewer"] if row else None

  def end_session(self, session: str | None) -> None:
    """Signs a session out (nothing happens for an unknown one)."""
    if well_formed(session):
      with self._connect() as db:
        db.execute("DELETE FROM sessions WHERE id_sha256 = ?",
                   (token_hash(session),))

  # ----------------------------------------------------------- decisions --

  def decide(self, product_id: str, status: str, label: str | None, *,
             reviewer: str, export: str, base_version: int) -> Decision:
    """Records a decision made on top of ``base_version``; raises
    :class:`Conflict` (and writes nothing) if that is not the current one."""
    if status not in STATUSES:
      raise StoreError(f"unknown status {status!r} (one of "
                       f"{', '.join(STATUSES)})")
    if (label is None) != (status == UNCLEAR):
      raise StoreError(f"status {status} {'takes no' if status == UNCLEAR else 'needs a'} label")
    with self._connect() as db:
      db.execute("BEGIN IMMEDIATE")
      try:
        current = self._current(db, product_id)
        seen = current.version if current else 0
        if base_version > seen:
          raise StoreError(
              f"base_version {base_version} is ahead of product "
              f"{product_id}'s current version {seen}"
              f"{'' if current else ' (undecided)'}: this page is out of "
              "date (another database?); reload the page")
        if seen != base_version:
          raise Conflict(current, base_version)
        decision = Decision(product_id, status, label, reviewer, export,
                            _now(), seen + 1)
        db.execute("INSERT OR REPLACE INTO decisions VALUES "
                   "(?, ?, ?, ?, ?, ?, ?)", (
                       decision.product_id, decision.status, decision.label,
                       decision.reviewer, decision.export,
                       decision.decided_at, decision.version))
        db.execute("INSERT INTO history (product_id, status, label, "
                   "reviewer, export, decided_at, version, replaced_version)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                       decision.product_id, decision.status, decision.label,
                       decision.reviewer, decision.export,
                       decision.decided_at, decision.version, seen))
        db.execute("COMMIT")
      except BaseException:
        db.execute("ROLLBACK")
        raise
    return decision

  @staticmethod
  def _current(db: sqlite3.Connection, product_id: str) -> Decision | None:
    row = db.execute("SELECT * FROM decisions WHERE product_id = ?",
                     (product_id,)).fetchone()
    return Decision(**dict(row)) if row else None

  def decision(self, product_id: str) -> Decision | None:
    with self._connect() as db:
      return self._current(db, product_id)

  def decisions(self) -> dict[str, Decision]:
    """Every current decision, by product id."""
    with self._connect() as db:
      rows = db.execute("SELECT * FROM decisions ORDER BY product_id")
      return {r["product_id"]: Decision(**dict(r)) for r in rows}

  def history_since(self, history_id: int, limit: int = 100_000
                    ) -> list[tuple[int, str, str]]:
    """(id, product, status) of the decisions recorded after history row
    ``history_id``, oldest first: what a queue's counts have not seen."""
    with self._connect() as db:
      return [tuple(r) for r in db.execute(
          "SELECT id, product_id, status FROM history WHERE id > ? "
          "ORDER BY id LIMIT ?", (history_id, limit))]

  def has_history_row(self, history_id: int, product_id: str | None
                      ) -> bool:
    """Whether history row ``history_id`` is of ``product_id`` here (a
    queue index synced with another database is not)."""
    with self._connect() as db:
      row = db.execute("SELECT product_id FROM history WHERE id = ?",
                       (history_id,)).fetchone()
    return row is not None and row[0] == product_id

  def decisions_of(self, product_ids: list[str]) -> dict[str, Decision]:
    """The current decisions of these products (a page's), by id."""
    out = {}
    with self._connect() as db:
      for i in range(0, len(product_ids), 500):
        chunk = product_ids[i:i + 500]
        rows = db.execute("SELECT * FROM decisions WHERE product_id IN (" +
                          ",".join("?" * len(chunk)) + ")", chunk)
        out.update({r["product_id"]: Decision(**dict(r)) for r in rows})
    return out

  def history(self, product_id: str | None = None) -> list[dict[str, Any]]:
    """Every decision ever recorded (of one product), oldest first."""
    with self._connect() as db:
      if product_id is None:
        rows = db.execute("SELECT * FROM history ORDER BY id")
      else:
        rows = db.execute("SELECT * FROM history WHERE product_id = ? "
                          "ORDER BY id", (product_id,))
      return [dict(r) for r in rows]


CSV_COLUMNS = ("product_id", "status", "label", "reviewer", "export",
               "decided_at", "version")


# A cell starting with one of these is a formula to a spreadsheet (CSV
# injection: a product id or reviewer name like =HYPERLINK(...)).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
  """``value`` as a CSV cell no spreadsheet runs: a leading quote before a
  formula start, and before a leading quote (so reading back is exact:
  ``prepare --corrections`` drops one leading quote)."""
  text = "" if value is None else str(value)
  return "'" + text if text.startswith(FORMULA_STARTS + ("'",)) else text


def csv_text(store: Store) -> str:
  """The current decisions as CSV (what ``prepare --corrections`` also
  reads), every cell through :func:`csv_cell`."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  for d in store.decisions().values():
    row = d.as_dict()
    writer.writerow([csv_cell(row[c]) for c in CSV_COLUMNS])
  return out.getvalue()


def write_csv(store: Store, path: str | os.PathLike[str]) -> int:
  """Writes :func:`csv_text` to ``path`` whole or not at all; returns how
  many decisions it holds."""
  out = pathlib.Path(path)
  tmp = out.with_name(f".{out.name}.tmp")
  text = csv_text(store)
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, out)
  return len(list(csv.DictReader(io.StringIO(text))))
