"""Catalogue readers: generic CSV/TSV/JSONL, the fashion catalogue, Rakuten.

Each reader yields :class:`RawRow`s in file order and never raises on a bad
row: a row it cannot interpret comes out with ``error`` set, so the caller
counts it instead of crashing or silently dropping it.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import pathlib
import string
import sys
from collections.abc import Iterator

# A 10,000-character title is bad input to report, not a csv.Error.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

ERR_MALFORMED = "malformed_row"
ERR_UTF8 = "invalid_utf8"


@dataclasses.dataclass
class RawRow:
  """One catalogue row, before validation."""
  source: str  # "file:line" for messages and rejected.jsonl.
  product_id: str = ""
  title: str = ""
  label: str = ""
  image_path: str = ""  # Absolute path, or "" when the product has no image.
  split: str = ""
  parents: tuple[str, ...] = ()
  error: str = ""  # A reject reason set by the reader (malformed, utf8).
  detail: str = ""


@dataclasses.dataclass(frozen=True)
class Columns:
  """Which fields of a generic catalogue mean what."""
  id: str
  title: str
  label: str
  image: str = ""  # A column holding a path (relative to image_root).
  image_pattern: str = ""  # E.g. "images/{id}.jpg"; any column may be used.
  split: str = ""
  parents: tuple[str, ...] = ()


def _has_surrogates(text: str) -> bool:
  try:
    text.encode("utf-8")
    return False
  except UnicodeEncodeError:
    return True


def _image_path(record: dict[str, str], columns: Columns,
                image_root: pathlib.Path) -> str:
  if columns.image:
    value = (record.get(columns.image) or "").strip()
    return str(image_root / value) if value else ""
  if columns.image_pattern:
    try:
      return str(image_root / columns.image_pattern.format(**record))
    except (KeyError, IndexError, ValueError):
      return ""
  return ""


def _to_row(record: dict[str, str], columns: Columns, source: str,
            image_root: pathlib.Path) -> RawRow:
  row = RawRow(source=source)
  needed = [columns.id, columns.title, columns.label]
  missing = [c for c in needed if not isinstance(record.get(c), str)]
  if missing:
    # The id (when there is one) lets the reader find the row again.
    if isinstance(record.get(columns.id), str):
      row.product_id = record[columns.id].strip()
    row.error, row.detail = ERR_MALFORMED, (
        f"missing field {', '.join(missing)}")
    return row
  values = {c: record[c] for c in needed + list(columns.parents) +
            ([columns.split] if columns.split else []) if c in record}
  if any(isinstance(v, str) and _has_surrogates(v) for v in values.values()):
    row.error, row.detail = ERR_UTF8, "field is not valid UTF-8"
    return row
  row.product_id = record[columns.id].strip()
  row.title = record[columns.title]
  row.label = record[columns.label].strip()
  row.split = (record.get(columns.split) or "").strip() if columns.split else ""
  row.parents = tuple((record.get(p) or "").strip() for p in columns.parents)
  row.image_path = _image_path(record, columns, image_root)
  return row


def read_delimited(path: pathlib.Path, columns: Columns, *,
                   delimiter: str = ",", image_root: pathlib.Path | None = None
                   ) -> Iterator[RawRow]:
  """CSV/TSV with a header. Rows with a wrong field count are malformed."""
  image_root = image_root or path.parent
  # surrogateescape keeps invalid bytes visible so the row can be rejected.
  with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
    reader = csv.reader(f, delimiter=delimiter)
    try:
      header = next(reader)
    except StopIteration:
      return
    header = [h.strip().lstrip("\ufeff") for h in header]
    while True:
      try:
        fields = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        yield RawRow(source=f"{path.name}:{reader.line_num}",
                     error=ERR_MALFORMED, detail=str(e))
        continue
      source = f"{path.name}:{reader.line_num}"
      if not fields:
        continue  # A blank line is not a product.
      if len(fields) != len(header):
        yield RawRow(source=source, error=ERR_MALFORMED,
                     detail=f"{len(fields)} fields, header has {len(header)}")
        continue
      yield _to_row(dict(zip(header, fields)), columns, source, image_root)


def read_jsonl(path: pathlib.Path, columns: Columns, *,
               image_root: pathlib.Path | None = None) -> Iterator[RawRow]:
  """One JSON object per line; values are converted to strings."""
  image_root = image_root or path.parent
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      source = f"{path.name}:{number}"
      if not raw.strip():
        continue
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield RawRow(source=source, error=ERR_UTF8, detail=str(e))
        continue
      try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
          raise ValueError("not a JSON object")
      except ValueError as e:
        yield RawRow(source=source, error=ERR_MALFORMED, detail=str(e)[:200])
        continue
      record = {k: ("" if v is None else str(v)) for k, v in obj.items()}
      yield _to_row(record, columns, source, image_root)


def read_generic(path: pathlib.Path, columns: Columns, *,
                 image_root: pathlib.Path | None = None,
                 delimiter: str | None = None) -> Iterator[RawRow]:
  """Dispatches on the extension: .jsonl/.json, .tsv/.tab, else CSV."""
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json", ".ndjson"):
    return read_jsonl(path, columns, image_root=image_root)
  if delimiter is None:
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
  return read_delimited(path, columns, delimiter=delimiter,
                        image_root=image_root)


FASHION_LEVELS = ("masterCategory", "subCategory", "articleType")


def read_fashion(root: pathlib.Path, level: str = "articleType"
                 ) -> Iterator[RawRow]:
  """The fashion catalogue: ``styles.csv`` + ``images/<id>.jpg``.

  Parent levels above ``level`` become the taxonomy.
  """
  if level not in FASHION_LEVELS:
    raise ValueError(f"level must be one of {FASHION_LEVELS}, got {level!r}")
  parents = FASHION_LEVELS[:FASHION_LEVELS.index(level)]
  columns = Columns(id="id", title="productDisplayName", label=level,
                    image_pattern="images/{id}.jpg", parents=parents)
  return read_delimited(root / "styles.csv", columns, image_root=root)


def read_rakuten(x_csv: pathlib.Path, y_csv: pathlib.Path,
                 image_dir: pathlib.Path, *, use_description: bool = False
                 ) -> Iterator[RawRow]:
  """Rakuten France: X (designation, description, productid, imageid) and Y
  (prdtypecode), joined by row order; images
  ``image_<imageid>_product_<productid>.jpg``."""
  columns = Columns(id="productid", title="designation", label="prdtypecode")
  with open(x_csv, newline="", encoding="utf-8",
            errors="surrogateescape") as fx, open(
                y_csv, newline="", encoding="utf-8",
                errors="surrogateescape") as fy:
    xs, ys = csv.DictReader(fx), csv.DictReader(fy)
    for x, y in zip(xs, ys):
      source = f"{x_csv.name}:{xs.line_num}"
      if None in x or None in x.values() or "prdtypecode" not in y:
        yield RawRow(source=source, error=ERR_MALFORMED,
                     detail="wrong field count")
        continue
      record = dict(x)
      record["prdtypecode"] = y["prdtypecode"] or ""
      if use_description and record.get("description"):
        record["designation"] = (f"{record['designation']} "
                                 f"{record['description']}")
      row = _to_row(record, columns, source, image_dir)
      if not row.error:
        row.image_path = str(image_dir / (
            f"image_{record.get('imageid', '').strip()}_product_"
            f"{row.product_id}.jpg"))
      yield row


class ColumnsError(ValueError):
  """The catalogue lacks a column the flags name (one line, for the user)."""


# Records of a JSON Lines catalogue whose keys count as its "header".
JSONL_HEADER_RECORDS = 100


def required_columns(columns: Columns) -> list[tuple[str, str]]:
  """``(column, flag that names it)`` for every column the flags rely on.

  ``--image_pattern`` fields count too: a field the file lacks would give
  every product "no photo" without a word.
  """
  found = [(columns.id, "--id_column"), (columns.title, "--title_column"),
           (columns.label, "--label_column")]
  if columns.image:
    found.append((columns.image, "--image_column"))
  if columns.split:
    found.append((columns.split, "--split_column"))
  found += [(p, "--parent_columns") for p in columns.parents]
  if columns.image_pattern:
    try:
      fields = [f for _, f, _, _ in string.Formatter().parse(
          columns.image_pattern) if f]
    except ValueError:
      fields = []
    for field in fields:
      name = field.split(".", 1)[0].split("[", 1)[0]
      if name:
        found.append((name, "--image_pattern"))
  return found


def column_names(path: pathlib.Path, delimiter: str | None = None) -> list[str]:
  """The column names of a generic catalogue, without reading its rows.

  CSV/TSV: the first line. JSON Lines: every key of the first
  :data:`JSONL_HEADER_RECORDS` objects (lines that do not parse are left to
  the row reader to report).
  """
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json", ".ndjson"):
    keys: dict[str, None] = {}
    with open(path, "rb") as f:
      for raw in itertools.islice((l for l in f if l.strip()),
                                  JSONL_HEADER_RECORDS):
        try:
          obj = json.loads(raw)
        except ValueError:
          continue
        if isinstance(obj, dict):
          keys.update(dict.fromkeys(obj))
    return list(keys)
  if delimiter is None:
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
  with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
    try:
      first = next(csv.reader(f, delimiter=delimiter))
    except (StopIteration, csv.Error):
      return []
  return [h.strip().lstrip("\ufeff") for h in first]


def check_columns(path: pathlib.Path, columns: Columns, *,
                  delimiter: str | None = None) -> None:
  """Raises :class:`ColumnsError` naming each missing column and its flag.

  Run before any row is read: a wrong ``--title_column`` would otherwise
  reject every row one by one and end in "no class has enough rows".
  """
  names = column_names(path, delimiter)
  missing: dict[str, list[str]] = {}
  for column, flag in required_columns(columns):
    if column not in names:
      missing.setdefault(column, [])
      if flag not in missing[column]:
        missing[column].append(flag)
  if not missing:
    return
  what = ", ".join(f"'{c}' ({', '.join(flags)})"
                   for c, flags in missing.items())
  has = ", ".join(names) if names else "none (the file is empty)"
  raise ColumnsError(
      f"{path.name} has no column {what}; its columns: {has}")


def parse_columns(names: str) -> tuple[str, ...]:
  return tuple(n.strip() for n in names.split(",") if n.strip())
