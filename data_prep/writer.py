"""Pass 2: turn one shard's validated rows into one TFRecord shard.

A worker process handles a whole shard (images + tokenization + writing) so
shards are independent units of work: they can run on any core, in any
order, be skipped when already done, or become the elements of a
distributed (e.g. Apache Beam) collection without changing this code.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterable, Iterator
from typing import Any

from data_prep import images
from mic_jax.data import records

_TOKENIZER: Any = None
_TOKENIZER_PATH = ""


@dataclasses.dataclass(frozen=True)
class ShardTask:
  spill: str  # JSONL of validated rows for this shard.
  output: str  # Final shard path.
  rejected: str  # JSONL of rows rejected in this pass.
  tokenizer: str
  max_length: int
  num_classes: int
  max_side: int
  jpeg_quality: int
  drop_missing_images: bool


def _tokenizer(path: str):
  global _TOKENIZER, _TOKENIZER_PATH
  if _TOKENIZER is None or _TOKENIZER_PATH != path:
    from mic_jax.text import load_tokenizer  # pylint: disable=g-import-not-at-top
    _TOKENIZER, _TOKENIZER_PATH = load_tokenizer(path), path
  return _TOKENIZER


def size_bucket(width: int, height: int) -> str:
  side = max(width, height)
  for limit in (64, 128, 256, 512, 1024, 2048):
    if side <= limit:
      return f"<={limit}"
  return ">2048"


def _rows(path: str) -> Iterator[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    for line in f:
      yield json.loads(line)


def process_shard(task: ShardTask, chunk: int = 256) -> dict[str, Any]:
  """Writes ``task.output``; returns the shard's statistics."""
  return process_rows(task, _rows(task.spill), chunk)


def process_rows(task: ShardTask, rows: Iterable[dict[str, Any]],
                 chunk: int = 256) -> dict[str, Any]:
  """:func:`process_shard` on rows given as dicts (``task.spill`` unused):
  the Beam pipeline hands a shard's rows over this way."""
  tok = _tokenizer(task.tokenizer)
  stats: dict[str, Any] = {
      "examples": 0, "class_counts": [0] * task.num_classes,
      "image_present": 0, "repaired": collections.Counter(),
      "rejected": collections.Counter(),
      "token_lengths": collections.Counter(),
      "image_sizes": collections.Counter(),
      # The first path per photo problem: where a person should look.
      "image_examples": {},
  }

  def examples() -> Iterator[records.Example]:
    with open(task.rejected, "w", encoding="utf-8") as rejected:
      batch: list[dict[str, Any]] = []

      def flush() -> Iterator[records.Example]:
        encoded = tok.encode_batch([r["title"] for r in batch],
                                   max_length=task.max_length)
        for i, r in enumerate(batch):
          lengths = int(encoded["attention_mask"][i].sum())
          stats["token_lengths"][lengths] += 1
          stats["examples"] += 1
          stats["class_counts"][r["label_id"]] += 1
          stats["image_present"] += bool(r["jpeg"])
          yield records.Example(
              product_id=r["id"], title=r["title"],
              input_ids=encoded["input_ids"][i],
              attention_mask=encoded["attention_mask"][i],
              token_type_ids=encoded["token_type_ids"][i],
              label=r["label_id"], label_name=r["label"],
              image_jpeg=r["jpeg"])
        batch.clear()

      for row in rows:
        result = images.load(row["image"], max_side=task.max_side,
                             quality=task.jpeg_quality)
        if result.original_size != (0, 0):
          stats["image_sizes"][size_bucket(*result.original_size)] += 1
        if result.error:
          if row["image"]:
            stats["image_examples"].setdefault(result.error, row["image"])
          if task.drop_missing_images:
            stats["rejected"][result.error] += 1
            rejected.write(json.dumps(
                {"source": row["source"], "id": row["id"],
                 "reason": result.error, "detail": result.detail},
                ensure_ascii=False) + "\n")
            continue
          stats["repaired"][result.error] += 1
        row["jpeg"] = result.jpeg
        batch.append(row)
        if len(batch) >= chunk:
          yield from flush()
      if batch:
        yield from flush()

  records.write_shard(task.output, examples())
  for key in ("repaired", "rejected", "token_lengths", "image_sizes"):
    stats[key] = {str(k): v for k, v in stats[key].items()}
  return stats
