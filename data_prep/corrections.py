"""Reviewed labels (``--corrections``) applied to a preparation.

The decisions come from the review database (``mic-jax-review --db``,
SQLite) or its CSV export (``--decisions_csv``; columns ``product_id``,
``status``, ``label``; a spreadsheet's BOM is fine; a cell's one leading
``'``, which keeps spreadsheets from running it as a formula, is dropped).
Per product:

* ``accepted`` / ``relabelled``: the product is prepared with the
  reviewed label instead of the catalogue's;
* ``accepted`` / ``relabelled`` for a product whose catalogue class was
  dropped (rare, or outside the class list): the product is prepared with
  the reviewed label when it is in the class list (counted as ``restored``
  and ``relabelled``); its split is its title group's, or train when the
  group had none (all its rows were dropped before the splits were dealt);
* ``unclear``: the product stays as the catalogue has it (the reviewer
  could not tell, which is no evidence against the catalogue's label);
  counted as ``unclear_kept``.

Labels are replaced *after* the splits are chosen (from the catalogue's
labels), so a correction never moves a product to another split, and the
class list is the catalogue's. A correction whose label is not in the
class list, or whose product the catalogue rejected, is not applied and is
counted by reason; one whose product is in neither the catalogue nor the
new products stops ``prepare`` unless ``--unmatched_decisions=count``
(then counted as ``unknown_product``); decisions on new products are
applied by :mod:`data_prep.new_products`. Decisions name the export whose scores were reviewed; those naming
another export than most do are counted (``other_export``), not refused.

Only the splits given (``--corrections_splits``, train by default) change.
A reviewer who accepts the model's top label on the validation products it
abstained on makes validation grade the model by its own answers (one
model's validation accuracy went from 0.885 to 0.957 that way), so a
decision for a product in another split is not applied and is counted as
``eval_split_refused``. What was applied is recorded in
``dataset_info.json`` (``corrections``: source, a SHA-256 of the decisions,
the splits allowed, counts in total and per split, reasons).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import pathlib
import sqlite3
from typing import Any

APPLIED_STATUSES = ("accepted", "relabelled")
UNCLEAR = "unclear"
UNKNOWN_PRODUCT = "unknown_product"
UNKNOWN_LABEL = "unknown_label"
EVAL_SPLIT_REFUSED = "eval_split_refused"
DEFAULT_SPLITS = ("train",)
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SHOWN = 20  # Rejected corrections listed by id in the record.


class CorrectionsError(ValueError):
  """The corrections file cannot be read; names the file and the line."""


@dataclasses.dataclass(frozen=True)
class Corrections:
  """Reviewed decisions: product id -> (status, label or None); ``exports``:
  product id -> the identity of the export whose scores were reviewed (when
  the source names it)."""
  source: str
  decisions: dict[str, tuple[str, str | None]]
  exports: dict[str, str] = dataclasses.field(default_factory=dict)
  # Product id -> where its decision is (``FILE:LINE``, or the database
  # and the product): what an error about the decision names.
  where: dict[str, str] = dataclasses.field(default_factory=dict,
                                            compare=False)

  @property
  def sha256(self) -> str:
    """Of the decisions themselves (the same from the DB or its CSV)."""
    digest = hashlib.sha256()
    for product, (status, label) in sorted(self.decisions.items()):
      line = f"{product}\t{status}\t{label or ''}"
      if product in self.exports:
        line += f"\t{self.exports[product]}"
      digest.update(f"{line}\n".encode("utf-8"))
    return digest.hexdigest()


def _check(where: str, product: Any, status: Any, label: Any
           ) -> tuple[str, str, str | None]:
  if not isinstance(product, str) or not product:
    raise CorrectionsError(f"{where}: no product id")
  if status not in APPLIED_STATUSES + (UNCLEAR,):
    raise CorrectionsError(f"{where}: unknown status {status!r} (one of "
                           f"{', '.join(APPLIED_STATUSES + (UNCLEAR,))})")
  if status != UNCLEAR and not label:
    raise CorrectionsError(f"{where}: status {status} without a label")
  return product, status, (label or None) if status != UNCLEAR else None


def _cell(text: str | None) -> str | None:
  """A CSV cell's value: the review CSV quotes cells a spreadsheet would
  run as formulas (``'=...``) and cells starting with a quote
  (``mic_jax.reviewing.store.csv_cell``); one leading quote goes."""
  return text[1:] if text and text.startswith("'") else text


def load(path: str | pathlib.Path) -> Corrections:
  """Reads a review database or its CSV export."""
  path = pathlib.Path(path)
  try:
    with open(path, "rb") as f:
      head = f.read(len(_SQLITE_MAGIC))
  except OSError as e:
    raise CorrectionsError(f"--corrections={path}: {e.strerror or e}") from e
  rows = []
  if head == _SQLITE_MAGIC:
    try:
      db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
      try:
        found = db.execute("SELECT product_id, status, label, export FROM "
                           "decisions ORDER BY product_id").fetchall()
      finally:
        db.close()
    except sqlite3.Error as e:
      raise CorrectionsError(f"--corrections={path}: not a review database "
                             f"({e})") from e
    rows = [(f"{path} product {p!r}", p, s, l, e) for p, s, l, e in found]
  else:
    # utf-8-sig: a CSV re-saved by a spreadsheet starts with a BOM.
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f)
      missing = {"product_id", "status", "label"} - set(
          reader.fieldnames or ())
      if missing:
        raise CorrectionsError(f"--corrections={path}: no column(s) "
                               f"{', '.join(sorted(missing))} (a CSV of "
                               "mic-jax-review --decisions_csv)")
      for row in reader:
        rows.append((f"{path}:{reader.line_num}", _cell(row["product_id"]),
                     _cell(row["status"]), _cell(row["label"]),
                     _cell(row.get("export"))))
  decisions: dict[str, tuple[str, str | None]] = {}
  exports: dict[str, str] = {}
  places: dict[str, str] = {}
  for where, product, status, label, export in rows:
    product, status, label = _check(where, product, status, label)
    if product in decisions:
      raise CorrectionsError(f"{where}: product {product!r} decided twice")
    decisions[product] = (status, label)
    places[product] = where
    if export:
      exports[product] = export
  return Corrections(str(path), decisions, exports, places)


def parse_splits(text: str, known: tuple[str, ...]) -> tuple[str, ...]:
  """``--corrections_splits``: a comma-separated subset of ``known``."""
  splits = tuple(s.strip() for s in text.split(",") if s.strip())
  for s in splits:
    if s not in known:
      raise CorrectionsError(f"--corrections_splits: unknown split {s!r} "
                             f"(one of {', '.join(known)})")
  if not splits:
    raise CorrectionsError("--corrections_splits: no split given")
  return tuple(s for s in known if s in splits)


def _order(split: str) -> tuple[int, str]:
  """Train, validation, test first, in that order (a readable record)."""
  known = ("train", "validation", "test")
  return (known.index(split) if split in known else len(known), split)


class Applier:
  """Relabels the prepared rows; counts what it did (see module doc)."""

  def __init__(self, corrections: Corrections, labels: list[str],
               splits: tuple[str, ...] = DEFAULT_SPLITS):
    self._corrections = corrections
    self._labels = set(labels)
    self._splits = tuple(splits)
    self._seen: set[str] = set()
    self.counts: collections.Counter[str] = collections.Counter()
    self.rejected: collections.Counter[str] = collections.Counter()
    self.by_split: dict[str, collections.Counter[str]] = (
        collections.defaultdict(collections.Counter))
    self._shown: list[dict[str, Any]] = []

  def _count(self, split: str, what: str) -> None:
    self.counts[what] += 1
    self.by_split[split][what] += 1

  def _reject(self, product: str, reason: str, label: str | None,
              split: str | None = None) -> None:
    self.rejected[reason] += 1
    if split is not None:
      self.by_split[split][reason] += 1
    if len(self._shown) < _SHOWN:
      self._shown.append({"id": product, "reason": reason, "label": label})

  def claim(self, products: set[str]) -> None:
    """Decisions on these products (new products, added elsewhere) are
    accounted for: not counted as ``unknown_product``."""
    self._seen |= products

  def decides(self, product: str) -> bool:
    """Whether a decision names ``product`` (whatever it says)."""
    return product in self._corrections.decisions

  def _usable(self, row: dict[str, Any], split: str) -> str | None:
    """The reviewed label ``row`` may take in ``split``, or None (counted
    by reason: refused split, unclear, label outside the class list)."""
    found = self._corrections.decisions.get(row["id"])
    if found is None:
      return None
    self._seen.add(row["id"])
    status, label = found
    if split not in self._splits:
      self._reject(row["id"], EVAL_SPLIT_REFUSED, label, split)
    elif status == UNCLEAR:
      self._count(split, "unclear_kept")
    elif label not in self._labels:
      self._reject(row["id"], UNKNOWN_LABEL, label, split)
    else:
      return label
    return None

  def apply(self, row: dict[str, Any], split: str) -> None:
    """Sets ``row["label"]`` to the reviewed label, when there is one and
    ``split`` (the product's) may change."""
    label = self._usable(row, split)
    if label is None:
      return
    if label == row["label"]:
      self._count(split, "confirmed")
    else:
      self._count(split, "relabelled")
      row["label"] = label

  def restore(self, row: dict[str, Any], split: str) -> bool:
    """For a row whose catalogue class was dropped (rare, or not in the
    class list): relabels it and returns True when a reviewed label in the
    class list may bring it back into ``split``.

    A reviewer who names a real class for a product of a class too rare to
    learn has made it a good example of that class; dropping it with its
    catalogue class would throw the review away.
    """
    label = self._usable(row, split)
    if label is None:
      return False
    if label == row["label"]:  # A dropped class stays dropped.
      self._count(split, "confirmed")
      return False
    self._count(split, "relabelled")
    self._count(split, "restored")
    row["label"] = label
    return True

  def record(self) -> dict[str, Any]:
    """What ``dataset_info.json`` keeps under ``corrections``."""
    for product in sorted(set(self._corrections.decisions) - self._seen):
      self._reject(product, UNKNOWN_PRODUCT,
                   self._corrections.decisions[product][1])
    self._seen |= set(self._corrections.decisions)
    return {"source": str(pathlib.Path(self._corrections.source).resolve()),
            "sha256": self._corrections.sha256,
            "decisions": len(self._corrections.decisions),
            "splits": list(self._splits),
            "relabelled": self.counts["relabelled"],
            "confirmed": self.counts["confirmed"],
            "restored": self.counts["restored"],
            "unclear_kept": self.counts["unclear_kept"],
            "unclear_policy": "kept with the catalogue's label",
            "rejected": dict(sorted(self.rejected.items())),
            "by_split": {s: dict(sorted(c.items()))
                         for s, c in sorted(self.by_split.items(),
                                            key=lambda kv: _order(kv[0]))},
            "rejected_examples": self._shown, **self._exports()}

  def _exports(self) -> dict[str, Any]:
    """Which exports the decisions were made against.

    A database collects decisions over retrainings; one made on another
    model's queue is still the reviewer's label (so it is applied), but a
    mix says the queue was not this model's uncertain products. The
    export most decisions name is taken as the current one (ties: the
    first identity in order).
    """
    exports = collections.Counter(self._corrections.exports.values())
    current = (min(exports.items(), key=lambda kv: (-kv[1], kv[0]))[0]
               if exports else None)
    return {"exports": dict(sorted(exports.items())), "export": current,
            "other_export": sum(exports.values()) - exports[current]
                            if current else 0}
