r"""Reviewed new products (``--new_products``) added to the training split.

A marketplace's products arrive without a category. The loop that turns
them into training data::

  mic-jax-predict --model=EXPORT --input=new.csv --output=new_scores.jsonl
  mic-jax-review --db=review.sqlite --scores=new_scores.jsonl --export=EXPORT
  python -m data_prep.prepare --input=catalogue.csv ... \
      --corrections=review.sqlite --new_products=new.csv

``new.csv`` is the file that was scored, read with the catalogue's column
flags (``--id_column``, ``--title_column``, ``--image_column`` or
``--image_pattern``; image paths relative to its own folder, as
``mic-jax-predict`` reads them). Its label column may be absent or empty and
is never read: a new product is trained on with its reviewed label only.
The file, not the review database, is where a new product's title and photo
come from: the database keeps decisions (product, label, who, export), and
the file holds exactly the title and photo the model scored and the reviewer
saw.

Per new product:

* ``accepted`` / ``relabelled``: added to **train** with the reviewed label
  (never to validation or test: a label the reviewer took from the model's
  top 5 would let evaluation grade the model by its own answers);
* except when its title group (the normalized title,
  :func:`mic_jax.text.title_group_key`) is a validation or test product's:
  a copy of an evaluation product in train would make evaluation measure
  memory. It is held out (``same_title_as_eval``, in ``rejected.jsonl``);
* ``unclear``, or no decision: not added (counted; no label to learn).

The catalogue decides the classes and the splits; new products change
neither (a correction never moves a product, a new product never moves
one either). What a new product could not become is an error that stops
``prepare`` before anything is written, each one named ``FILE:LINE: what``
(all of them, counted): a reviewed new product with an empty title, an id
twice in the new products, an id also in the catalogue, a reviewed label
that is not a class of the preparation. So is a decision for a product in
neither the catalogue nor the new products (e.g. a batch whose file was not
given), unless ``--unmatched_decisions=count`` leaves such decisions out
(counted as ``unknown_product``, as a product the catalogue rejected is).
What was added is recorded in ``dataset_info.json`` and ``stats.json``
under ``new_products``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from data_prep import corrections as corrections_lib
from data_prep import readers
from data_prep import split as split_lib
from mic_jax.text import title_group_key

SAME_TITLE_AS_EVAL = "same_title_as_eval"
EVAL_SPLITS = ("validation", "test")
_SHOWN = 10  # Problems named one by one in an error; the rest are counted.


class NewProductsError(ValueError):
  """Reviewed decisions that cannot become training data; one line each."""


@dataclasses.dataclass(frozen=True)
class NewProduct:
  """One reviewed new product, as its file has it."""
  source: str      # FILE:LINE.
  product_id: str
  title: str
  image: str       # Absolute path, or "" (no photo).


@dataclasses.dataclass
class NewProducts:
  """The reviewed products of the new-products files, and counts.

  ``reviewed``: product id -> the product, for every product a decision
  names (whatever it says), in file order.
  """
  files: list[dict[str, Any]]
  reviewed: dict[str, NewProduct]
  rows: int = 0
  undecided: int = 0
  unreadable: int = 0  # Rows the reader could not read, none reviewed.
  title_truncated: int = 0

  def ids(self) -> set[str]:
    return set(self.reviewed)

  def labelled(self, reviewed: corrections_lib.Corrections
               ) -> list[tuple[NewProduct, str]]:
    """(product, reviewed label) of the accepted and relabelled ones."""
    out = []
    for product in self.reviewed.values():
      status, label = reviewed.decisions[product.product_id]
      if status in corrections_lib.APPLIED_STATUSES and label:
        out.append((product, label))
    return out

  def unclear(self, reviewed: corrections_lib.Corrections) -> int:
    return sum(reviewed.decisions[p][0] == corrections_lib.UNCLEAR
               for p in self.reviewed)


def columns(args: Any, path: pathlib.Path) -> readers.Columns:
  """The catalogue's column flags, for a file whose label column may be
  missing (a product not categorised yet has no label to put there)."""
  names = readers.column_names(path, args.delimiter)
  label = (args.label_column if args.label_column in names else
           args.id_column)  # Any present column: the label is not read.
  return readers.Columns(id=args.id_column, title=args.title_column,
                         label=label, image=args.image_column,
                         image_pattern=args.image_pattern)


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _raise(problems: list[str], what: str, hint: str = "") -> None:
  """One error for every problem: counted, the first ones named."""
  if not problems:
    return
  shown = "; ".join(problems[:_SHOWN])
  more = (f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN
          else "")
  raise NewProductsError(f"{len(problems)} {what} (nothing was written): "
                         f"{shown}{more}{hint}")


def load(paths: Iterable[str | pathlib.Path], args: Any,
         reviewed: corrections_lib.Corrections) -> NewProducts:
  """Reads the new-products files; keeps the products a decision names.

  ``args``: prepare's flags (the column flags, ``delimiter``,
  ``max_title_chars``). Raises :class:`NewProductsError` naming every
  reviewed product that cannot be added whatever the catalogue holds
  (unreadable row, empty title, an id given twice); rows nobody reviewed
  are only counted, whatever their state, since they are not used.
  """
  found = NewProducts(files=[], reviewed={})
  first: dict[str, str] = {}  # Reviewed id -> where it was first seen.
  problems: list[str] = []
  for path in (pathlib.Path(p) for p in paths):
    if not path.is_file():
      raise NewProductsError(f"--new_products: no file {path}")
    try:
      readers.check_columns(path, dataclasses.replace(
          columns(args, path), label=args.id_column))
    except readers.ColumnsError as e:
      raise NewProductsError(f"--new_products: {e}") from e
    rows = 0
    for row in readers.read_generic(path, columns(args, path),
                                    image_root=path.parent,
                                    delimiter=args.delimiter):
      rows += 1
      where = f"{path}:{row.source.rsplit(':', 1)[-1]}"
      product = row.product_id
      if product not in reviewed.decisions:
        if row.error:
          found.unreadable += 1
        else:
          found.undecided += 1
        continue
      decision = " ".join(x for x in reviewed.decisions[product] if x)
      if product in first:
        problems.append(f"{where}: product {product!r} (reviewed: "
                        f"{decision}) appears again (first at "
                        f"{first[product]})")
        continue
      first[product] = where
      if row.error:
        problems.append(f"{where}: product {product!r} (reviewed: "
                        f"{decision}) cannot be read: {row.error} "
                        f"({row.detail})")
        continue
      if not row.title.strip() or not title_group_key(row.title):
        problems.append(f"{where}: product {product!r} (reviewed: "
                        f"{decision}) has an empty title")
        continue
      title = row.title
      if len(title) > args.max_title_chars:
        title = title[:args.max_title_chars]
        found.title_truncated += 1
      found.reviewed[product] = NewProduct(where, product, title,
                                           row.image_path)
    found.rows += rows
    found.files.append({"path": str(path.resolve()),
                        "sha256": _sha256(path), "rows": rows})
  _raise(problems, "reviewed new product(s) cannot be added")
  return found


def check(reviewed: corrections_lib.Corrections, new: NewProducts | None,
          catalogue: Mapping[str, str], labels: list[str], rare: set[str],
          *, catalogue_name: str, count_unmatched: bool,
          min_examples: int) -> None:
  """Raises :class:`NewProductsError` naming every decision that would be
  lost: a new product also in the catalogue, a new product's label outside
  the class list, a decision whose product is in neither file (unless
  ``count_unmatched``).

  ``catalogue``: product id -> ``FILE:LINE`` of the catalogue rows whose id
  a decision or a new product names (rejected rows included: a decision on
  a product the catalogue rejected is counted, as before).
  """
  problems = []
  new_ids = new.ids() if new else set()
  known = set(labels)
  for product, item in (new.reviewed.items() if new else ()):
    status, label = reviewed.decisions[product]
    if product in catalogue:
      problems.append(f"{item.source}: product {product!r} is also in the "
                      f"catalogue ({catalogue[product]}): a product comes "
                      "from one of them; drop it from the new products")
    elif status in corrections_lib.APPLIED_STATUSES and label not in known:
      why = (f"dropped as rare (fewer than --min_examples_per_class="
             f"{min_examples} catalogue products)" if label in rare else
             "not a class of the catalogue")
      problems.append(f"{item.source}: product {product!r} was labelled "
                      f"{label!r} ({reviewed.where.get(product, '')}), "
                      f"{why}; decide it again on the review page")
  hint = ""
  if not count_unmatched:
    given = ", ".join(f["path"] for f in new.files) if new else "not given"
    unmatched = sorted(set(reviewed.decisions) - set(catalogue) - new_ids)
    for product in unmatched:
      problems.append(
          f"{reviewed.where.get(product, reviewed.source)}: product "
          f"{product!r} is in neither the catalogue ({catalogue_name}) nor "
          f"--new_products ({given})")
    if unmatched:
      hint = (". Give every new-products file that was reviewed "
              "(--new_products=FILE, repeatable), or "
              "--unmatched_decisions=count to leave such decisions out")
  _raise(problems, "reviewed decision(s) would be lost", hint)


def group_of(title: str, seed: int) -> int:
  """The title group a product joins (the catalogue's split key)."""
  return split_lib.group_hash(title_group_key(title), seed)


class Dealer:
  """Decides which labelled new products join train; counts them.

  :meth:`watch` is called for every catalogue row with its split, so a new
  product whose title group is an evaluation product's is held out.
  """

  def __init__(self, new: NewProducts,
               reviewed: corrections_lib.Corrections, seed: int):
    self._new = new
    self._reviewed = reviewed
    self._labelled = new.labelled(reviewed)
    self._groups = {group_of(p.title, seed) for p, _ in self._labelled}
    self._seed = seed
    self._eval: dict[int, str] = {}

  def watch(self, group: int, split: str) -> None:
    """A catalogue row of ``group`` is in ``split``."""
    if split in EVAL_SPLITS and group in self._groups:
      self._eval.setdefault(group, split)

  def deal(self) -> tuple[list[tuple[NewProduct, str, int]],
                          list[tuple[NewProduct, str]]]:
    """(product, label, group) to add to train, and (product, split of
    its title group) of those held out."""
    added, held = [], []
    for product, label in self._labelled:
      group = group_of(product.title, self._seed)
      if group in self._eval:
        held.append((product, self._eval[group]))
      else:
        added.append((product, label, group))
    return added, held

  def record(self, added: list[tuple[NewProduct, str, int]],
             held: list[tuple[NewProduct, str]]) -> dict[str, Any]:
    """What ``dataset_info.json`` keeps under ``new_products``, before the
    photos are read (:func:`after_shards` takes out what pass 3 rejected
    and the ``labels`` of the added products, kept for it)."""
    return {"files": self._new.files, "rows": self._new.rows,
            "reviewed": len(self._new.reviewed),
            "added": len(added), "split": "train",
            "entered": len(added) + len(held),
            "unclear": self._new.unclear(self._reviewed),
            "undecided": self._new.undecided,
            "unreadable": self._new.unreadable,
            "title_truncated": self._new.title_truncated,
            "rejected": ({SAME_TITLE_AS_EVAL: len(held)} if held else {}),
            "labels": {p.product_id: label for p, label, _ in added}}


def after_shards(record: dict[str, Any],
                 rejected_in_shards: Mapping[str, str]) -> dict[str, Any]:
  """The final ``new_products`` record: ``record`` less the added products
  a shard writer rejected (``rejected_in_shards``: product id -> reason;
  e.g. a missing photo with ``--drop_missing_images``), with the added
  products counted per label instead of listed."""
  record = dict(record)
  labels = record.pop("labels")
  gone = {p: r for p, r in rejected_in_shards.items() if p in labels}
  rejected = collections.Counter(record["rejected"])
  rejected.update(gone.values())
  by_label = collections.Counter(l for p, l in labels.items()
                                 if p not in gone)
  return {**record, "added": record["added"] - len(gone),
          "rejected": dict(sorted(rejected.items())),
          "by_label": dict(sorted(by_label.items()))}
