r"""Prepares a product catalogue as sharded TFRecords for mic_jax.

Example (generic CSV, image paths relative to the CSV's folder):

  python -m data_prep.prepare --input=catalogue.csv --id_column=id \
    --title_column=productDisplayName --label_column=articleType \
    --image_pattern='images/{id}.jpg' --tokenizer=TOKENIZER_DIR \
    --max_length=32 --output_dir=prepared/

Passes: (1) stream the catalogue, validate ids/titles/labels, write the good
rows to a spill file and collect per-title-group label counts; (2) assign
splits and deal rows to per-shard spill files; (3) process shards in
parallel (images + tokens -> one TFRecord each). Every stage leaves a marker,
so a rerun with the same arguments resumes; other arguments are refused.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
from typing import Any

# Before TensorFlow loads (here and in the spawned workers): quiet C++ logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tqdm import tqdm  # noqa: E402

from data_prep import corrections as corrections_lib
from data_prep import new_products as new_products_lib
from data_prep import readers
from data_prep import split as split_lib
from data_prep import writer
from mic_jax import console
from mic_jax.data import photos
from mic_jax.data import records
from mic_jax.text import title_group_key

WORK = ".work"
# Reasons a row is rejected before images are looked at.
EMPTY_TITLE = "empty_title"
MISSING_ID = "missing_id"
MISSING_LABEL = "missing_label"
UNKNOWN_LABEL = "unknown_label"
# labels.txt holds one class per line (mic_jax.data.records.label_problem).
LABEL_LINE_BREAK = "label_line_break"
DUPLICATE_ID = "duplicate_id"
BAD_SPLIT = "bad_split_value"
RARE_CLASS = "rare_class"
TITLE_TRUNCATED = "title_truncated"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m data_prep.prepare", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--input", required=True,
    help="catalogue file (csv/tsv/jsonl), the fashion folder, or Rakuten "
         "X_train.csv")
  a("--format", default="auto", choices=("auto", "generic", "fashion",
                                         "rakuten"))
  a("--output_dir", required=True)
  a("--tokenizer", required=True, help="tokenizer directory or .model file")
  a("--max_length", type=int, default=64, help="tokens incl. [CLS]/[SEP]")
  a("--id_column", default="id")
  a("--title_column", default="title")
  a("--label_column", default="label")
  a("--image_column", default="", help="column with an image path")
  a("--image_pattern", default="",
    help="image path pattern with {column} fields, e.g. images/{id}.jpg")
  a("--image_root", default="",
    help="folder image paths are relative to (default: the input's folder)")
  a("--delimiter", default=None, help="override the CSV delimiter")
  a("--split_column", default="",
    help="keep the given splits (values train/validation/test)")
  a("--parent_columns", default="",
    help="comma-separated parent levels, coarse to fine -> taxonomy.json")
  a("--fashion_level", default="articleType",
    choices=readers.FASHION_LEVELS)
  a("--rakuten_labels", default="", help="Y_train.csv (default: next to X)")
  a("--rakuten_images", default="",
    help="image folder (default: images/image_train next to X)")
  a("--rakuten_description", action="store_true",
    help="append the description to the designation")
  a("--labels_file", default="",
    help="fixed class list (one per line); other labels are rejected")
  a("--seed", type=int, default=0, help="split seed")
  a("--split_fractions", default="0.8,0.1,0.1")
  a("--min_examples_per_class", type=int, default=2)
  a("--rare_classes", default="drop", choices=("drop", "keep"))
  a("--drop_missing_images", action="store_true",
    help="reject products without a usable image instead of keeping them "
         "with image/present=0")
  a("--max_title_chars", type=int, default=1000)
  a("--max_image_side", type=int, default=512)
  a("--jpeg_quality", type=int, default=90)
  a("--examples_per_shard", type=int, default=2048)
  a("--num_workers", type=int, default=os.cpu_count() or 1)
  a("--corrections", default="",
    help="reviewed labels (mic-jax-review database or its CSV) to use "
         "instead of the catalogue's; see data_prep/corrections.py")
  a("--corrections_splits", default=",".join(corrections_lib.DEFAULT_SPLITS),
    help="comma-separated splits whose labels --corrections may change "
         "(default: train). Decisions for products in other splits are "
         "counted as eval_split_refused and not applied: accepting the "
         "model's own labels on validation or test products makes them "
         "grade the model by its answers. Add validation,test only to fix "
         "known catalogue errors before a new benchmark, knowing scores "
         "before and after are then not comparable")
  a("--new_products", action="append", default=[],
    help="a file of new products (no label, or an empty label column) that "
         "mic-jax-predict --input scored and reviewers labelled: each one "
         "with an accepted or relabelled decision in --corrections is added "
         "to the train split (never validation/test); read with the column "
         "flags above, image paths relative to its folder. Repeatable. See "
         "data_prep/new_products.py")
  a("--unmatched_decisions", default="error", choices=("error", "count"),
    help="a --corrections decision whose product is in neither --input nor "
         "--new_products: stop before writing anything (error), or leave it "
         "out, counted as unknown_product (count)")
  a("--engine", default="pool", choices=("pool", "beam"),
    help="pool: this process and --num_workers worker processes; beam: an "
         "Apache Beam pipeline (data_prep/beam_pipeline.py, docs/beam.md), "
         "on Beam's local runner with --num_workers workers unless Beam "
         "options such as --runner=DataflowRunner follow; other flags the "
         "same. Not yet with --corrections/--new_products")
  a("--overwrite", action="store_true", help="delete output_dir first")
  a("-v", "--verbose", action="store_true", help=console.VERBOSE_HELP)
  return p


# Arguments that do not change the output (safe to vary on restart).
# ``beam_args``: the Beam pipeline options after the flags (--engine=beam).
_RUNTIME_ONLY = ("num_workers", "overwrite", "verbose", "beam_args")


def _fingerprint(args: argparse.Namespace) -> dict[str, Any]:
  return {k: v for k, v in sorted(vars(args).items()) if k not in _RUNTIME_ONLY}


def _format(args: argparse.Namespace) -> str:
  """``--format``, with ``auto`` resolved from the input's name."""
  path = pathlib.Path(args.input)
  if args.format != "auto":
    return args.format
  return ("fashion" if (path / "styles.csv").exists() else
          "rakuten" if path.name.startswith("X_") else "generic")


def _generic_columns(args: argparse.Namespace) -> readers.Columns:
  return readers.Columns(
      id=args.id_column, title=args.title_column, label=args.label_column,
      image=args.image_column, image_pattern=args.image_pattern,
      split=args.split_column,
      parents=readers.parse_columns(args.parent_columns))


def check_columns(args: argparse.Namespace) -> None:
  """Exits with one line when a generic catalogue lacks a named column.

  Before any row is read or any work file written, so the user fixes a flag
  and reruns (the fixed-layout formats name their own columns).
  """
  if _format(args) != "generic":
    return
  path = pathlib.Path(args.input)
  if not path.is_file():
    raise SystemExit(f"error: --input: no file {path}")
  try:
    readers.check_columns(path, _generic_columns(args),
                          delimiter=args.delimiter)
  except readers.ColumnsError as e:
    raise SystemExit(f"error: {e}") from e


def _rows(args: argparse.Namespace) -> tuple[Any, tuple[str, ...]]:
  """The row stream and the parent level names."""
  path = pathlib.Path(args.input)
  fmt = _format(args)
  if fmt == "fashion":
    root = path if path.is_dir() else path.parent
    parents = readers.FASHION_LEVELS[:readers.FASHION_LEVELS.index(
        args.fashion_level)]
    return readers.read_fashion(root, args.fashion_level), parents
  if fmt == "rakuten":
    y = pathlib.Path(args.rakuten_labels or path.with_name(
        path.name.replace("X_", "Y_", 1)))
    img = pathlib.Path(args.rakuten_images or path.parent / "images" /
                       "image_train")
    return readers.read_rakuten(path, y, img,
                                use_description=args.rakuten_description), ()
  columns = _generic_columns(args)
  parents = columns.parents
  root = pathlib.Path(args.image_root) if args.image_root else None
  return readers.read_generic(path, columns, image_root=root,
                              delimiter=args.delimiter), parents


def reject_line(row: readers.RawRow, reason: str, detail: str = "") -> str:
  """One line of rejected.jsonl (without its line break)."""
  line = json.dumps(
      {"source": row.source, "id": row.product_id, "reason": reason,
       "detail": detail, "title": row.title[:200]}, ensure_ascii=False)
  # JSON allows raw U+2028/U+2029, but str.splitlines() breaks there.
  return line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


class _Rejects:
  """Counts rejected rows by reason and logs each to rejected.jsonl."""

  def __init__(self, path: pathlib.Path):
    self.counts: collections.Counter[str] = collections.Counter()
    self._f = open(path, "w", encoding="utf-8")

  def add(self, row: readers.RawRow, reason: str, detail: str = "") -> None:
    self.counts[reason] += 1
    self._f.write(reject_line(row, reason, detail) + "\n")

  def close(self) -> None:
    self._f.close()


@dataclasses.dataclass
class Pass1:
  """What pass 1 found; kept as ``.work/pass1.json`` so a rerun resumes.

  ``groups``: title-group hash (as a string) -> label counts; ``given``:
  ``[split, label, count]`` (split empty unless ``--split_column``);
  ``taxonomy``: label -> parent path -> count; ``found``: where the
  catalogue has the products a decision or a new product names.
  """
  rows_in: int
  rejected: dict[str, int]
  repaired: dict[str, int]
  parents: list[str]
  groups: dict[str, dict[str, int]]
  given: list[list[Any]]
  taxonomy: dict[str, dict[str, int]]
  # Product id -> FILE:LINE of its catalogue row (rejected or not), for
  # the ids a decision or a new product names.
  found: dict[str, str] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, record: dict[str, Any]) -> Pass1:
    return cls(**record)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The classes and splits chosen from pass 1 (see :func:`plan`)."""
  labels: list[str]          # Class names in id order.
  rare: set[str]             # Classes below --min_examples_per_class.
  assignment: dict[int, str]  # Title-group hash -> split.
  unknown: set[str]          # Rejected: given splits hold them outside train.


@dataclasses.dataclass
class Pass2:
  """Shards per split and pass 2's rejections; ``.work/pass2.json``."""
  num_shards: dict[str, int]
  rejected: dict[str, int]

  def to_json(self) -> dict[str, Any]:
    return {**self.num_shards, "rejected": self.rejected}

  @classmethod
  def from_json(cls, record: dict[str, Any]) -> Pass2:
    record = dict(record)
    rejected = record.pop("rejected")
    return cls(num_shards=record, rejected=rejected)


@dataclasses.dataclass(frozen=True)
class Shard:
  """One output shard: its task and, once written, its stats."""
  split: str
  index: int
  task: writer.ShardTask
  stats: dict[str, Any] | None = None


def _id_hash(product_id: str) -> bytes:
  return hashlib.blake2b(product_id.encode("utf-8", "replace"),
                         digest_size=8).digest()


def fixed_labels(args: argparse.Namespace) -> set[str] | None:
  """The ``--labels_file`` classes, or None without one."""
  if not args.labels_file:
    return None
  return set(pathlib.Path(args.labels_file).read_text(
      encoding="utf-8").splitlines()) - {""}


def check_row(row: readers.RawRow, args: argparse.Namespace,
              fixed: set[str] | None) -> tuple[str, str] | None:
  """Why pass 1 rejects ``row`` (reason, detail) before looking for
  duplicate ids, or None when it passes."""
  if row.error:
    return row.error, row.detail
  if not row.product_id:
    return MISSING_ID, ""
  if not row.title.strip() or not title_group_key(row.title):
    return EMPTY_TITLE, ""
  if not row.label:
    return MISSING_LABEL, ""
  if records.label_problem(row.label):
    return LABEL_LINE_BREAK, row.label
  if fixed is not None and row.label not in fixed:
    return UNKNOWN_LABEL, row.label
  if args.split_column and row.split not in split_lib.SPLITS:
    return BAD_SPLIT, row.split
  return None


def normalize(row: readers.RawRow, args: argparse.Namespace
              ) -> tuple[dict[str, Any], bool]:
  """A row that passed: its rows.jsonl record (title cut to
  ``--max_title_chars``, title group hash) and whether the title was cut."""
  title = row.title
  truncated = len(title) > args.max_title_chars
  if truncated:
    title = title[:args.max_title_chars]
  group = split_lib.group_hash(title_group_key(title), args.seed)
  return ({"source": row.source, "id": row.product_id, "title": title,
           "label": row.label, "image": row.image_path, "split": row.split,
           "group": group}, truncated)


def pass1(args: argparse.Namespace, work: pathlib.Path,
          watch: frozenset[str] = frozenset()) -> Pass1:
  """Validates rows, writes good ones to rows.jsonl, counts groups/labels.

  Memory is one 8-byte id hash and one small label counter per title group
  (not per row); rows themselves stream to disk. Where the ids in
  ``watch`` (reviewed products, new products) occur is noted in ``found``.
  """
  stream, parents = _rows(args)
  rejects = _Rejects(work / "rejected_pass1.jsonl")
  fixed = fixed_labels(args)
  seen_ids: set[bytes] = set()
  groups: dict[int, collections.Counter[str]] = collections.defaultdict(
      collections.Counter)
  given: collections.Counter[tuple[str, str]] = collections.Counter()
  taxonomy: dict[str, collections.Counter[str]] = collections.defaultdict(
      collections.Counter)
  repaired: collections.Counter[str] = collections.Counter()
  found: dict[str, str] = {}
  rows_in = 0
  with open(work / "rows.jsonl.tmp", "w", encoding="utf-8") as out:
    for row in tqdm(stream, desc="pass 1: validate", unit=" rows",
                    mininterval=2, disable=None):
      rows_in += 1
      if row.product_id in watch:
        found.setdefault(row.product_id, row.source)
      problem = check_row(row, args, fixed)
      if problem is not None:
        rejects.add(row, *problem)
        continue
      key = _id_hash(row.product_id)
      if key in seen_ids:
        rejects.add(row, DUPLICATE_ID)
        continue
      seen_ids.add(key)
      record, truncated = normalize(row, args)
      if truncated:
        repaired[TITLE_TRUNCATED] += 1
      groups[record["group"]][row.label] += 1
      given[(row.split, row.label)] += 1
      if parents:
        taxonomy[row.label][" > ".join(row.parents)] += 1
      out.write(json.dumps(record, ensure_ascii=False) + "\n")
  rejects.close()
  os.replace(work / "rows.jsonl.tmp", work / "rows.jsonl")
  return Pass1(rows_in=rows_in, rejected=dict(rejects.counts),
               repaired=dict(repaired), parents=list(parents),
               groups={str(g): dict(c) for g, c in groups.items()},
               given=[[s, l, n] for (s, l), n in given.items()],
               taxonomy={k: dict(v) for k, v in taxonomy.items()},
               found=found)


def plan(args: argparse.Namespace, p1: Pass1) -> Plan:
  """Chooses the classes, the group splits, and labels to reject."""
  label_totals: collections.Counter[str] = collections.Counter()
  train_labels: set[str] = set()
  for s, label, n in p1.given:
    label_totals[label] += n
    if s == "train":
      train_labels.add(label)
  rare = {l for l, n in label_totals.items()
          if n < args.min_examples_per_class}
  keep = set(label_totals)
  if args.rare_classes == "drop":
    keep -= rare
  unknown: set[str] = set()
  if args.split_column:
    # A class never seen in training cannot be learned: reject its rows.
    unknown = keep - train_labels
    keep &= train_labels
  if args.labels_file:
    labels = [l for l in pathlib.Path(args.labels_file).read_text(
        encoding="utf-8").splitlines() if l]
  else:
    labels = sorted(keep)
  assignment: dict[int, str] = {}
  if not args.split_column:
    fractions = [float(x) for x in args.split_fractions.split(",")]
    groups = {int(g): {l: n for l, n in c.items() if l in keep}
              for g, c in p1.groups.items()}
    groups = {g: c for g, c in groups.items() if c}
    assignment = split_lib.assign_groups(groups, seed=args.seed,
                                         fractions=fractions)
  return Plan(labels, rare, assignment, unknown)


def counted_split(r: dict[str, Any], assignment: dict[int, str]) -> str:
  """The split a rows.jsonl record is counted in to size the shards ("" for
  a group without one: all its rows are dropped)."""
  return r["split"] or assignment.get(r["group"], "")


def final_split(r: dict[str, Any], assignment: dict[int, str]) -> str:
  """The split a kept rows.jsonl record is written to."""
  # A group of dropped rows only has no split; a restored row joins
  # train (it was never evaluation data).
  return r["split"] or assignment.get(r["group"], "train")


def drop_reason(r: dict[str, Any], chosen: Plan, label_id: dict[str, int],
                args: argparse.Namespace) -> tuple[str, str] | None:
  """Why pass 2 rejects a rows.jsonl record (reason, detail), or None."""
  if r["label"] in chosen.unknown:
    return UNKNOWN_LABEL, r["label"] + " (not in train)"
  if r["label"] in chosen.rare and args.rare_classes == "drop":
    # Also when --labels_file gives the class an id: its groups have no
    # split and a class this rare cannot be learned or measured.
    return RARE_CLASS, r["label"]
  if r["label"] not in label_id:
    return UNKNOWN_LABEL, r["label"]
  return None


def pass2(args: argparse.Namespace, work: pathlib.Path, chosen: Plan,
          fix: corrections_lib.Applier | None = None,
          dealer: new_products_lib.Dealer | None = None) -> Pass2:
  """Deals validated rows to per-shard spill files; returns shard counts.

  ``fix`` relabels reviewed products once their split is chosen;
  ``dealer`` adds reviewed new products to train (after the catalogue's
  rows, whose splits it must see first) and its record goes to
  ``.work/new_products.json``.
  """
  labels, assignment = chosen.labels, chosen.assignment
  label_id = {l: i for i, l in enumerate(labels)}
  rejects = _Rejects(work / "rejected_pass2.jsonl")
  counts: collections.Counter[str] = collections.Counter()
  with open(work / "rows.jsonl", encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      split = counted_split(r, assignment)
      if not split and fix is not None and fix.decides(r["id"]):
        split = "train"  # May be restored (a group of a dropped class).
      counts[split] += 1
      if dealer is not None:
        dealer.watch(r["group"], split)
  added, held = dealer.deal() if dealer is not None else ([], [])
  counts["train"] += len(added)
  num_shards = {s: max(1, -(-counts[s] // args.examples_per_shard))
                for s in split_lib.SPLITS if counts[s]}
  handles = {}
  for s, n in num_shards.items():
    for i in range(n):
      handles[(s, i)] = open(work / f"spill-{s}-{i:05d}.jsonl", "w",
                             encoding="utf-8")
  position: collections.Counter[str] = collections.Counter()
  with open(work / "rows.jsonl", encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      row = readers.RawRow(source=r["source"], product_id=r["id"],
                           title=r["title"])
      dropped = drop_reason(r, chosen, label_id, args)
      split = final_split(r, assignment)
      if dropped is not None:
        if fix is None or not fix.restore(r, split):
          rejects.add(row, *dropped)
          continue
      elif fix is not None:
        fix.apply(r, split)
      shard = position[split] % num_shards[split]
      position[split] += 1
      r["label_id"] = label_id[r["label"]]
      handles[(split, shard)].write(json.dumps(r, ensure_ascii=False) + "\n")
  for product, label, group in added:
    shard = position["train"] % num_shards["train"]
    position["train"] += 1
    handles[("train", shard)].write(json.dumps(
        {"source": product.source, "id": product.product_id,
         "title": product.title, "label": label, "image": product.image,
         "split": "train", "group": group, "label_id": label_id[label]},
        ensure_ascii=False) + "\n")
  for product, split in held:
    rejects.add(readers.RawRow(source=product.source,
                               product_id=product.product_id,
                               title=product.title),
                new_products_lib.SAME_TITLE_AS_EVAL,
                f"its title group is in {split}")
  for h in handles.values():
    h.close()
  rejects.close()
  if dealer is not None:  # Before pass2.json (a resume finds both or none).
    records.write_json_atomic(work / "new_products.json",
                              dealer.record(added, held))
  return Pass2(num_shards, dict(rejects.counts))


def _merge(total: dict[str, Any], part: dict[str, Any]) -> None:
  for key in ("repaired", "rejected", "token_lengths", "image_sizes"):
    bucket = total.setdefault(key, collections.Counter())
    bucket.update(part.get(key, {}))
  examples = total.setdefault("image_examples", {})
  for reason, path in part.get("image_examples", {}).items():
    examples.setdefault(reason, path)


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs (or resumes) the whole preparation; returns stats.json's content."""
  start = time.time()
  try:  # Checked before hours of work, not at the end.
    photos.PhotoPreprocessing(args.max_image_side, args.jpeg_quality)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
  check_columns(args)
  beam = getattr(args, "engine", "pool") == "beam"
  if beam and (args.corrections or args.new_products):
    raise SystemExit("error: --engine=beam does not take --corrections or "
                     "--new_products yet (docs/beam.md); use --engine=pool")
  try:
    allowed = corrections_lib.parse_splits(args.corrections_splits,
                                           split_lib.SPLITS)
  except corrections_lib.CorrectionsError as e:
    raise SystemExit(f"error: {e}") from e
  # Read now: a bad file stops before any work (and before --overwrite
  # deletes the previous output).
  reviewed, new = _reviewed(args)
  out = pathlib.Path(args.output_dir)
  if args.overwrite and out.exists():
    _clear(out)
  work = out / WORK
  work.mkdir(parents=True, exist_ok=True)
  fingerprint = _fingerprint(args)
  if reviewed is not None:
    fingerprint["corrections_sha256"] = reviewed.sha256
  if new is not None:
    fingerprint["new_products_sha256"] = [f["sha256"] for f in new.files]
  fp_file = work / "arguments.json"
  if fp_file.exists():
    old = json.loads(fp_file.read_text(encoding="utf-8"))
    if old != fingerprint:
      diff = sorted(k for k in set(old) | set(fingerprint)
                    if old.get(k) != fingerprint.get(k))
      raise SystemExit(
          f"{out} holds a preparation with other arguments (differs in: "
          f"{', '.join(diff)}). Use another --output_dir or --overwrite.")
  elif (out / records.INFO_FILE).exists():
    raise SystemExit(f"{out} already holds a prepared data set; use "
                     "--overwrite to replace it")
  records.write_json_atomic(fp_file, fingerprint)
  if beam:
    from data_prep import beam_pipeline  # pylint: disable=g-import-not-at-top
    return beam_pipeline.run(args, start)

  p1_file = work / "pass1.json"
  if not p1_file.exists():
    watch = frozenset(reviewed.decisions) if reviewed else frozenset()
    records.write_json_atomic(p1_file, pass1(args, work, watch).to_json())
  p1 = Pass1.from_json(json.loads(p1_file.read_text(encoding="utf-8")))
  chosen = plan(args, p1)
  labels = chosen.labels
  if not labels:
    raise SystemExit(_no_class(args, p1, chosen, out))
  if reviewed is not None:  # Before anything but work files is written.
    try:
      new_products_lib.check(
          reviewed, new, p1.found, labels, chosen.rare,
          catalogue_name=str(args.input),
          count_unmatched=args.unmatched_decisions == "count",
          min_examples=args.min_examples_per_class)
    except new_products_lib.NewProductsError as e:
      # Nothing to resume: a rerun with other flags must not be refused.
      shutil.rmtree(work, ignore_errors=True)
      raise SystemExit(f"error: {e}") from e
  p2_file = work / "pass2.json"
  if not p2_file.exists():
    fix = (corrections_lib.Applier(reviewed, labels, allowed) if reviewed
           else None)
    dealer = None
    if new is not None:
      fix.claim(new.ids())
      dealer = new_products_lib.Dealer(new, reviewed, args.seed)
    p2 = pass2(args, work, chosen, fix, dealer)
    if fix is not None:  # Before pass2.json: a resume finds both or none.
      records.write_json_atomic(work / "corrections.json", fix.record())
    records.write_json_atomic(p2_file, p2.to_json())
  p2 = Pass2.from_json(json.loads(p2_file.read_text(encoding="utf-8")))

  tasks = []
  for s in split_lib.SPLITS:
    for i in range(p2.num_shards.get(s, 0)):
      tasks.append((s, i, writer.ShardTask(
          spill=str(work / f"spill-{s}-{i:05d}.jsonl"),
          output=str(out / records.shard_name(s, i, p2.num_shards[s])),
          rejected=str(work / f"rejected-{s}-{i:05d}.jsonl"),
          tokenizer=str(args.tokenizer), max_length=args.max_length,
          num_classes=len(labels), max_side=args.max_image_side,
          jpeg_quality=args.jpeg_quality,
          drop_missing_images=args.drop_missing_images)))
  done = {}
  todo = []
  for s, i, task in tasks:
    marker = work / f"done-{s}-{i:05d}.json"
    if marker.exists() and pathlib.Path(task.output).exists():
      done[(s, i)] = json.loads(marker.read_text(encoding="utf-8"))
    else:
      todo.append((s, i, task))
  sizes = {(s, i): sum(1 for _ in open(t.spill, encoding="utf-8"))
           for s, i, t in todo}
  bar = tqdm(total=sum(sizes.values()), desc="pass 3: images+tokens",
             unit=" products", mininterval=2, disable=None)
  workers = max(1, min(args.num_workers, len(todo)))
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers) if workers > 1 else _InlinePool() as pool:
    keyed = pool.imap_unordered(_run_task, todo)
    for (s, i), stats in keyed:
      records.write_json_atomic(work / f"done-{s}-{i:05d}.json", stats)
      done[(s, i)] = stats
      bar.update(sizes[(s, i)])
  bar.close()
  shards = [Shard(s, i, task, done[(s, i)]) for s, i, task in tasks]
  return finish(args, p1, chosen, p2, shards, time.time() - start)


def _reviewed(args: argparse.Namespace
              ) -> tuple[corrections_lib.Corrections | None,
                         new_products_lib.NewProducts | None]:
  """``--corrections`` and ``--new_products`` read (or one line of error:
  nothing is read or written after a bad file)."""
  if args.new_products and not args.corrections:
    raise SystemExit("error: --new_products needs --corrections (the "
                     "review database or its CSV): a new product is added "
                     "with its reviewed label, and it has no other")
  if not args.corrections:
    return None, None
  try:
    reviewed = corrections_lib.load(args.corrections)
    new = (new_products_lib.load(args.new_products, args, reviewed)
           if args.new_products else None)
  except (corrections_lib.CorrectionsError,
          new_products_lib.NewProductsError) as e:
    raise SystemExit(f"error: {e}") from e
  return reviewed, new


def _shard_rejections(parts: list[pathlib.Path]) -> dict[str, str]:
  """Product id -> reason of the rows the shard writers rejected."""
  found = {}
  for part in parts:
    if part.exists():
      with open(part, encoding="utf-8") as f:
        for line in f:
          row = json.loads(line)
          found[row["id"]] = row["reason"]
  return found


def _write_rejected(out: pathlib.Path, parts: list[pathlib.Path]) -> None:
  """Joins the passes' rejected rows into ``out/rejected.jsonl``."""
  with open(out / "rejected.jsonl.tmp", "w", encoding="utf-8") as f:
    for part in parts:
      if part.exists():
        f.write(part.read_text(encoding="utf-8"))
  os.replace(out / "rejected.jsonl.tmp", out / "rejected.jsonl")


def _no_class(args: argparse.Namespace, p1: Pass1, chosen: Plan,
              out: pathlib.Path) -> str:
  """The one-line error when no class is left, with the rejected rows.

  Their file is written where the message says, and the work files go:
  nothing can be resumed, and a rerun with corrected flags must not be
  refused as "other arguments".
  """
  _write_rejected(out, [out / WORK / "rejected_pass1.jsonl"])
  shutil.rmtree(out / WORK, ignore_errors=True)
  why = [f"{p1.rows_in:,} rows in"]
  if p1.rejected:
    why.append("rejected: " + ", ".join(
        f"{k} {v:,}" for k, v in sorted(p1.rejected.items())))
  if chosen.rare and args.rare_classes == "drop":
    why.append(f"{len(chosen.rare)} class(es) below "
               f"--min_examples_per_class={args.min_examples_per_class}")
  if chosen.unknown:
    why.append(f"{len(chosen.unknown)} class(es) not in the train split")
  return (f"error: no class has enough valid rows ({'; '.join(why)}); "
          f"rejected rows: {out / 'rejected.jsonl'}")


def _clear(out: pathlib.Path) -> None:
  """Deletes ``out`` for --overwrite, except this run's open log file."""
  session = console.active()
  keep = session.log_path.resolve() if session else None
  if keep is None or keep.parent != out.resolve():
    shutil.rmtree(out)
    return
  for child in out.iterdir():
    if child.resolve() == keep:
      continue
    if child.is_dir() and not child.is_symlink():
      shutil.rmtree(child)
    else:
      child.unlink()


def _run_task(item):
  s, i, task = item
  return (s, i), writer.process_shard(task)


class _InlinePool:
  """``multiprocessing.Pool`` stand-in for one worker (no process start)."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def imap_unordered(self, fn, items):
    return map(fn, items)


def finish(args: argparse.Namespace, p1: Pass1, chosen: Plan, p2: Pass2,
           written: list[Shard], seconds: float) -> dict[str, Any]:
  """Merges shard stats, writes rejected.jsonl, stats.json, info files."""
  out = pathlib.Path(args.output_dir)
  work = out / WORK
  labels, rare = chosen.labels, chosen.rare
  shards: dict[str, list[dict[str, Any]]] = {}
  total: dict[str, Any] = {}
  splits: dict[str, Any] = {}
  for shard in written:
    s, task, st = shard.split, shard.task, shard.stats
    _merge(total, st)
    shards.setdefault(s, []).append({
        "file": pathlib.Path(task.output).name, "examples": st["examples"],
        "class_counts": st["class_counts"],
        records.LENGTH_COUNTS: records.length_counts(st["token_lengths"],
                                                     args.max_length)})
    sp = splits.setdefault(s, {"examples": 0, "image_present": 0,
                               "per_class": collections.Counter()})
    sp["examples"] += st["examples"]
    sp["image_present"] += st["image_present"]
    sp["per_class"].update({labels[c]: n for c, n in
                            enumerate(st["class_counts"]) if n})
  rejected = collections.Counter(p1.rejected)
  rejected.update(p2.rejected)
  rejected.update(total.get("rejected", {}))
  _write_rejected(out, [work / "rejected_pass1.jsonl",
                        work / "rejected_pass2.jsonl"] +
                  [pathlib.Path(w.task.rejected) for w in written])
  repaired = collections.Counter(p1.repaired)
  repaired.update(total.get("repaired", {}))
  rows_out = sum(sp["examples"] for sp in splits.values())
  new = None
  if (work / "new_products.json").exists():
    new = new_products_lib.after_shards(
        json.loads((work / "new_products.json").read_text(encoding="utf-8")),
        _shard_rejections([pathlib.Path(w.task.rejected) for w in written
                           if w.split == "train"]))
  stats = {
      "rows_in": p1.rows_in, "rows_out": rows_out,
      "rejected_total": sum(rejected.values()),
      "splits": {s: {**sp, "per_class": dict(sorted(sp["per_class"].items()))}
                 for s, sp in splits.items()},
      "rejected": dict(sorted(rejected.items())),
      "repaired": dict(sorted(repaired.items())),
      "rare_classes": sorted(rare), "rare_classes_policy": args.rare_classes,
      "num_classes": len(labels),
      "token_length_histogram": dict(sorted(
          total.get("token_lengths", {}).items(), key=lambda kv: int(kv[0]))),
      "image_size_histogram": dict(total.get("image_sizes", {})),
      "image_problem_examples": dict(sorted(
          total.get("image_examples", {}).items())),
      "seconds": round(seconds, 1),
      "products_per_second": round(p1.rows_in / max(seconds, 1e-9), 1),
  }
  if new is not None:
    stats["new_products"] = new
  # Reviewed new products enter beside the catalogue's rows.
  entered = stats["rows_in"] + (new["entered"] if new else 0)
  if entered != rows_out + stats["rejected_total"]:
    raise RuntimeError("internal error: rows in != rows out + rejected")
  # The photo steps serving must repeat (the export copies this record).
  extra = {"tokenizer": str(args.tokenizer), "seed": args.seed,
           photos.INFO_KEY: photos.PhotoPreprocessing(
               args.max_image_side, args.jpeg_quality).to_dict()}
  if (work / "corrections.json").exists():
    extra["corrections"] = json.loads((work / "corrections.json").read_text(
        encoding="utf-8"))
    stats["corrections"] = extra["corrections"]
  if new is not None:
    extra["new_products"] = new
  if p1.parents:
    taxonomy = {"levels": p1.parents + [args.fashion_level
                if not args.parent_columns else args.label_column],
                "parents": {l: p1.taxonomy.get(l, {}) for l in labels}}
    records.write_json_atomic(out / "taxonomy.json", taxonomy)
    extra["taxonomy_file"] = "taxonomy.json"
  records.write_json_atomic(out / "stats.json", stats)
  records.write_info(out, labels=labels, max_length=args.max_length,
                     shards=shards, extra=extra)
  shutil.rmtree(work, ignore_errors=True)
  return stats


def main(argv: list[str] | None = None) -> None:
  """The program: flags, a console session, the preparation, a summary."""
  parser = build_parser()
  args, beam_args = parser.parse_known_args(argv)
  if beam_args and args.engine != "beam":
    parser.error("unrecognized arguments: " + " ".join(beam_args))
  args.beam_args = beam_args
  nested = console.active() is not None  # E.g. the demo data of a run.
  with console.session("prepare", args.output_dir, verbose=args.verbose):
    if not nested:
      console.say("prepare  %s -> %s (log: %s)", args.input, args.output_dir,
                  console.active().log_path)
    stats = run(args)
    report(stats, args.output_dir, brief=nested,
           image_flags=(_format(args) != "generic" or
                        bool(args.image_column or args.image_pattern)))


# Why a kept product has no photo (stats["repaired"]); said as photos.
_PHOTO_REASONS = {photos.NOT_GIVEN: "no image named",
                  photos.MISSING: "not found",
                  photos.CORRUPT: "unreadable",
                  photos.TOO_LARGE: "too large"}


def _photos(stats: dict[str, Any], image_flags: bool) -> str:
  """One console line about photos: a warning when no product has one.

  A catalogue whose photos all failed to load is worth a warning, not a
  "repaired" count: the model will then learn from titles alone.
  """
  kept = stats["rows_out"]
  with_photo = sum(v["image_present"] for v in stats["splits"].values())
  problems = {k: v for k, v in stats["repaired"].items()
              if k in _PHOTO_REASONS}
  if not problems and with_photo == kept:
    return ""
  examples = stats.get("image_problem_examples", {})
  why = []
  for reason, n in sorted(problems.items(), key=lambda kv: -kv[1]):
    text = f"{n:,} {_PHOTO_REASONS[reason]}"
    if reason in examples:
      text += f" (e.g. {examples[reason]})"
    why.append(text)
  if with_photo == 0 and kept:
    if set(problems) == {photos.NOT_GIVEN} and not image_flags:
      return ("warning  no product has a photo: no image column or pattern "
              "was given (--image_column or --image_pattern); the model "
              "will learn from titles alone")
    if set(problems) == {photos.MISSING}:
      return (f"warning  no product has a photo: none of the {kept:,} image "
              f"files exist (looked for e.g. {examples.get(photos.MISSING)}; "
              "see --image_pattern, --image_column, --image_root)")
    return f"warning  no product has a photo: {'; '.join(why)}"
  return (f"photos   {with_photo:,} of {kept:,} products have one; without: "
          f"{'; '.join(why)}")


def report(stats: dict[str, Any], output_dir: str, brief: bool = False,
           image_flags: bool = True) -> None:
  """What was prepared: rows kept and rejected, then per split (console).

  ``image_flags``: whether the catalogue's photos were named by flags (a
  generic catalogue without them has no photos by choice or by oversight).
  """
  splits = stats["splits"]
  new = stats.get("new_products")
  console.say("prepared %s of %s rows%s in %.1f s (%s rejected, %s) -> %s",
              f"{stats['rows_out']:,}", f"{stats['rows_in']:,}",
              f" and {new['entered']:,} reviewed new products" if new else "",
              stats["seconds"], f"{stats['rejected_total']:,}",
              ", ".join(f"{s} {v['examples']:,}" for s, v in splits.items()),
              output_dir)
  photo_line = _photos(stats, image_flags)
  if photo_line and (not brief or photo_line.startswith("warning")):
    console.say("%s", photo_line)
  if brief:
    return
  if stats["rejected"]:
    console.say("rejected %s (rows in rejected.jsonl)", ", ".join(
        f"{k} {v:,}" for k, v in stats["rejected"].items()))
  if stats.get("corrections"):
    c = stats["corrections"]
    console.say("reviewed %d decisions from %s: %d relabelled (%d of them "
                "restored from a dropped class), %d confirmed, "
                "%d unclear (kept), not applied: %s", c["decisions"],
                c["source"], c["relabelled"], c.get("restored", 0),
                c["confirmed"],
                c["unclear_kept"], ", ".join(
                    f"{k} {v}" for k, v in c["rejected"].items()) or "none")
    if c.get("other_export"):
      console.say("warning  %d of %d reviewed decisions were made against "
                  "another export than %s (exports: %s); they are applied",
                  c["other_export"], sum(c["exports"].values()),
                  c["export"][:12],
                  ", ".join(f"{k[:12]} {v}" for k, v in c["exports"].items()))
    console.say("reviewed per split (labels may change in %s): %s",
                ", ".join(c["splits"]), "; ".join(
                    f"{s} " + ", ".join(f"{k} {v}" for k, v in n.items())
                    for s, n in c["by_split"].items()) or "none")
  if new:
    console.say("new      %d of %d new products added to %s with their "
                "reviewed label (from %s); not added: %d unclear, %d "
                "undecided%s", new["added"], new["rows"], new["split"],
                ", ".join(f["path"] for f in new["files"]), new["unclear"],
                new["undecided"], "".join(
                    f", {v} {k}" for k, v in new["rejected"].items()))
  repaired = {k: v for k, v in stats["repaired"].items()
              if k not in _PHOTO_REASONS}
  if repaired:
    console.say("repaired %s", ", ".join(
        f"{k} {v:,}" for k, v in repaired.items()))
  session = console.active()
  console.say("wrote    %s: %d TFRecord shard(s), dataset_info.json, "
              "labels.txt, stats.json, rejected.jsonl%s", output_dir,
              sum(len(v) for v in _shard_files(output_dir).values()),
              f", {session.log_path.name}" if session else "")
  console.table(
      ["split", "products", "with photo", "classes"],
      [[s, f"{v['examples']:,}", f"{v['image_present']:,}",
        f"{len(v['per_class'])}"] for s, v in splits.items()])


def _shard_files(output_dir: str) -> dict[str, list[str]]:
  info = json.loads((pathlib.Path(output_dir) / records.INFO_FILE).read_text(
      encoding="utf-8"))
  return {s: [f["file"] for f in shards]
          for s, shards in info.get("shards", {}).items()}


if __name__ == "__main__":
  main(sys.argv[1:])
