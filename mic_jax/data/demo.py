"""The built-in demo catalogue: neither modality alone can solve it.

Every product belongs to one of 8 classes = 4 product families x 2 colour
lines. The **title** names the family ("canvas sneaker", "leather tote")
but never the colour; the **photo** shows the colour line (a red or a blue
product on a grey background) but the shape is the same blob for every
family. So:

* text-only can at best tell the family: ~50% accuracy, macro-F1 <= ~0.5;
* image-only can at best tell the colour: ~25% accuracy, macro-F1 <= ~0.25;
* a model that fuses both can reach ~100%.

To make it less of a toy, 10% of titles are generic ("new arrival item"),
so the family is unknown from the text, and 10% of products have no photo
(``image/present = 0``), so the colour is unknown; photos vary in hue,
brightness, position and noise. The catalogue is written as a CSV + JPEG
files + a WordPiece vocabulary and then goes through the *real*
``data_prep`` path, so the demo exercises exactly what users run.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

FAMILIES = {
    "sneaker": ["sneaker", "trainer", "running shoe", "canvas sneaker"],
    "tote": ["tote", "shoulder bag", "leather tote", "handbag"],
    "watch": ["watch", "wristwatch", "chronograph", "steel watch"],
    "tee": ["tee", "t shirt", "cotton tee", "crew neck tee"],
}
COLOURS = ("red", "blue")
BRANDS = ["acme", "nordic", "urban", "harbor", "summit", "lumen", "atlas",
          "verde", "kite", "orbit"]
ADJECTIVES = ["classic", "slim", "everyday", "premium", "light", "soft",
              "sport", "casual", "vintage", "modern"]
GENERIC = ["new arrival item", "best seller product", "limited offer piece",
           "gift idea item"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NUM_PRODUCTS = 2400
SPLITS = (("train", 0.7), ("validation", 0.15), ("test", 0.15))
RAW = "raw"            # Under the demo directory: the catalogue and photos.
PREPARED = "prepared"  # Under the demo directory: data_prep's output.


def labels() -> list[str]:
  return [f"{family}-{colour}" for family in FAMILIES for colour in COLOURS]


def _photo(rng: np.random.Generator, colour: str, size: int) -> np.ndarray:
  """A coloured blob on grey; hue says the colour line, nothing else."""
  img = np.full((size, size, 3), 128.0) + rng.normal(0, 12, (size, size, 3))
  base = np.array([200.0, 40.0, 40.0]) if colour == "red" else np.array(
      [40.0, 60.0, 200.0])
  base = base * rng.uniform(0.7, 1.15) + rng.normal(0, 15, 3)
  yy, xx = np.mgrid[0:size, 0:size]
  cy, cx = rng.uniform(0.3, 0.7, 2) * size
  radius = rng.uniform(0.2, 0.35) * size
  blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius ** 2
  img[blob] = base + rng.normal(0, 10, (int(blob.sum()), 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def write_catalogue(directory: str | os.PathLike[str], *, image_size: int,
                    seed: int = 0, num_products: int = NUM_PRODUCTS
                    ) -> pathlib.Path:
  """Writes ``catalogue.csv``, ``images/`` and ``tokenizer/`` under ``directory``.

  Returns the CSV path. Splits are given in the CSV's ``split`` column.
  """
  root = pathlib.Path(directory)
  (root / "images").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  names = labels()
  words = set()
  rows = []
  for i in range(num_products):
    label = int(rng.integers(len(names)))
    family, colour = names[label].split("-")
    if rng.random() < 0.1:
      noun = GENERIC[rng.integers(len(GENERIC))]
    else:
      synonyms = FAMILIES[family]
      noun = synonyms[rng.integers(len(synonyms))]
    title = (f"{BRANDS[rng.integers(len(BRANDS))]} "
             f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]} {noun}")
    words.update(title.split())
    has_photo = rng.random() >= 0.1
    if has_photo:
      Image.fromarray(_photo(rng, colour, image_size)).save(
          root / "images" / f"{i}.jpg", quality=92)
    u = rng.random()
    split = "train" if u < 0.7 else ("validation" if u < 0.85 else "test")
    rows.append({"id": str(i), "title": title, "label": names[label],
                 "split": split, "image": f"images/{i}.jpg" if has_photo
                 else ""})
  csv_path = root / "catalogue.csv"
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  write_tokenizer(root / "tokenizer", sorted(words))
  return csv_path


def write_tokenizer(directory: str | os.PathLike[str],
                    words: list[str]) -> pathlib.Path:
  """A lower-casing WordPiece tokenizer directory whose vocabulary is BERT's
  special tokens and ``words`` in that order (whole words only): the demo's,
  and the tests' tiny catalogues'."""
  tok = pathlib.Path(directory)
  tok.mkdir(parents=True, exist_ok=True)
  (tok / "vocab.txt").write_text("\n".join(SPECIAL + list(words)) + "\n",
                                 encoding="utf-8")
  (tok / "tokenizer_config.json").write_text(json.dumps(
      {"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
  return tok


def ensure_demo_dataset(data_dir: str | os.PathLike[str], *, max_length: int,
                        image_size: int, seed: int = 0) -> pathlib.Path:
  """The prepared demo data set under ``data_dir``, made once.

  Writes the raw catalogue to ``data_dir/raw`` and runs the real
  preparation program, ``python -m data_prep.prepare``, on it
  (``data_dir/prepared``). It runs as a program, not an import: the
  library does not depend on ``data_prep``, which sits above it. A
  finished preparation (its ``dataset_info.json`` exists) is reused; an
  interrupted one is resumed by ``prepare`` itself.

  Raises:
    RuntimeError: the preparation failed; the message holds its output.
  """
  from mic_jax.data import records  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(data_dir)
  prepared = root / PREPARED
  if (prepared / records.INFO_FILE).exists():
    return prepared
  raw = root / RAW
  if not (raw / "catalogue.csv").exists():
    write_catalogue(raw, image_size=max(image_size, 32), seed=seed)
  command = prepare_command(root, prepared, max_length=max_length,
                            image_size=image_size)
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode or not (prepared / records.INFO_FILE).exists():
    raise RuntimeError(
        f"preparing the demo data in {prepared} failed (exit "
        f"{done.returncode}): {' '.join(command[1:])}\n"
        f"{(done.stdout + done.stderr)[-3000:]}")
  return prepared


def prepare_command(data_dir: str | os.PathLike[str],
                    output_dir: str | os.PathLike[str], *, max_length: int,
                    image_size: int) -> list[str]:
  """The ``data_prep.prepare`` command that prepares the demo catalogue
  under ``data_dir`` (its ``raw/``) into ``output_dir``; add arguments
  (e.g. ``--corrections``) to prepare it again differently."""
  raw = pathlib.Path(data_dir) / RAW
  return [
      sys.executable, "-m", "data_prep.prepare",
      f"--input={raw / 'catalogue.csv'}", f"--output_dir={output_dir}",
      f"--tokenizer={raw / 'tokenizer'}", f"--max_length={max_length}",
      "--image_column=image", "--split_column=split",
      f"--max_image_side={max(image_size, 32)}", "--num_workers=1"]


def single_modality_ceilings(data_dir: str | os.PathLike[str], split: str
                             ) -> dict[str, float]:
  """The best accuracy any text-only or image-only model can reach on ``split``.

  By construction a title carries only the product family (brand and
  adjective are drawn independently of the label) and a photo only the
  colour line. An oracle that knows the family (or that the title is
  generic) gives each such group its most frequent label in the split; an
  oracle that knows the colour (or that there is no photo) does the same.
  Both are fitted on the split itself, so no model that reads only one
  modality can expect to beat them: the demo's fusion model must, to show
  that it uses both.

  Args:
    data_dir: the directory given to :func:`ensure_demo_dataset`.
    split: ``"validation"`` or ``"test"``.
  """
  with open(pathlib.Path(data_dir) / RAW / "catalogue.csv",
            encoding="utf-8") as f:
    rows = [r for r in csv.DictReader(f) if r["split"] == split]
  if not rows:
    raise ValueError(f"no {split} rows in {data_dir}/raw/catalogue.csv")

  def oracle_accuracy(evidence) -> float:
    groups: dict[str, dict[str, int]] = {}
    for r in rows:
      counts = groups.setdefault(evidence(r), {})
      counts[r["label"]] = counts.get(r["label"], 0) + 1
    return sum(max(c.values()) for c in groups.values()) / len(rows)

  def colour(r):
    return r["label"].split("-")[1] if r["image"] else "no photo"

  family_of = {noun: family for family, nouns in FAMILIES.items()
               for noun in nouns}

  def family(r):
    noun = r["title"].split(" ", 2)[2]  # After brand and adjective.
    return family_of.get(noun, "generic")

  return {"text_only_max_accuracy": oracle_accuracy(family),
          "image_only_max_accuracy": oracle_accuracy(colour)}
