r"""data_prep as an Apache Beam pipeline (issue 33, ``--engine=beam``).

The same output as the process pool of :mod:`data_prep.prepare` (the digest
of :mod:`data_prep.digest` is equal), from the same per-row functions:

  read (one reader, as today) -> validate (``prepare.check_row``) and count
  rejections by reason -> first row per product id (later ones:
  ``duplicate_id``) -> normalize (``prepare.normalize``: cut titles, title
  group hash) -> per-group label counts -> the plan (``prepare.plan``: the
  classes and ``split.assign_groups``' stratified grouped split) as a side
  input -> drop rare and unknown classes (``prepare.drop_reason``) and deal
  the rows to (split, shard) -> per shard: photos, tokens, one TFRecord
  (``writer.process_rows``) -> ``prepare.finish`` in the launching process
  writes rejected.jsonl, stats.json, labels.txt and dataset_info.json, the
  latter last.

A run killed at any point leaves no ``dataset_info.json``, so nothing the
trainer reads as complete; rerunning the same command starts the pipeline
again from the catalogue (its work files go first). Example, 2 local
workers::

  python -m data_prep.prepare --engine=beam --num_workers=2 --input=... \
    --output_dir=... --tokenizer=...

Flags ``prepare`` does not know are Beam pipeline options (e.g.
``--runner=DataflowRunner --project=... --region=...``); without
``--runner`` the pipeline runs on Beam's DirectRunner with ``--num_workers``
worker processes. The pipeline still reads the catalogue in one worker and
writes its work files and shards through local paths, so a cluster runner
needs a shared file system for now (docs/beam.md).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.options import pipeline_options

from data_prep import prepare
from data_prep import readers
from data_prep import split as split_lib
from data_prep import writer
from mic_jax.data import records

_REJECTED = "rejected"
PASS1 = "pass1.json"
PASS2 = "pass2.json"


# Per element functions (module level, so Beam's workers import them).


def _read(_, args: argparse.Namespace
          ) -> Iterator[tuple[int, readers.RawRow]]:
  """The catalogue's rows with their position (which row of an id is first)."""
  stream, _ = prepare._rows(args)  # pylint: disable=protected-access
  yield from enumerate(stream)


def _validate(item: tuple[int, readers.RawRow], args: argparse.Namespace,
              fixed: set[str] | None):
  seq, row = item
  problem = prepare.check_row(row, args, fixed)
  if problem is not None:
    yield beam.pvalue.TaggedOutput(
        _REJECTED, (problem[0], prepare.reject_line(row, *problem)))
    return
  # Keyed as pass 1 keys its seen ids (an 8-byte hash of the id).
  yield prepare._id_hash(row.product_id), (seq, row)  # pylint: disable=protected-access


def _first_of_id(item):
  """The first row of each product id; the others are duplicates.

  ``item``: (id hash, [(position, RawRow)]). (Beam checks the hints of an
  element argument against the input's, hence none here.)"""
  _, rows = item
  rows = sorted(rows, key=lambda sr: sr[0])
  yield rows[0][1]
  for _, row in rows[1:]:
    yield beam.pvalue.TaggedOutput(
        _REJECTED, (prepare.DUPLICATE_ID,
                    prepare.reject_line(row, prepare.DUPLICATE_ID)))


def _normalize(row: readers.RawRow, args: argparse.Namespace
               ) -> tuple[dict[str, Any], bool, tuple[str, ...]]:
  record, truncated = prepare.normalize(row, args)
  return record, truncated, tuple(row.parents)


def _pass1(_, parents: tuple[str, ...],
           rows_in: int, rejected: list[tuple[str, int]], truncated: int,
           groups: list[tuple[tuple[int, str], int]],
           given: list[tuple[tuple[str, str], int]],
           taxonomy: list[tuple[tuple[str, str], int]]) -> prepare.Pass1:
  """What pass 1 of the pool path finds, from the pipeline's counts."""
  by_group: dict[str, dict[str, int]] = {}
  for (group, label), n in sorted(groups):
    by_group.setdefault(str(group), {})[label] = n
  by_label: dict[str, dict[str, int]] = {}
  for (label, path), n in sorted(taxonomy):
    by_label.setdefault(label, {})[path] = n
  return prepare.Pass1(
      rows_in=rows_in, rejected=dict(sorted(rejected)),
      repaired={prepare.TITLE_TRUNCATED: truncated} if truncated else {},
      parents=list(parents), groups=by_group,
      given=[[s, l, n] for (s, l), n in sorted(given)],
      taxonomy=by_label)


def _plan(p1: prepare.Pass1, args: argparse.Namespace, work: str
          ) -> tuple[prepare.Plan, dict[str, int]]:
  """The pool path's plan (and label ids); pass1.json is kept for the
  launching process, which writes the summary files from it."""
  records.write_json_atomic(pathlib.Path(work) / PASS1, p1.to_json())
  chosen = prepare.plan(args, p1)
  return chosen, {l: i for i, l in enumerate(chosen.labels)}


def _num_shards(counts, args: argparse.Namespace) -> dict[str, int]:
  """Shards per split from [(split, rows)], counted as pass 2 counts them."""
  by_split = dict(counts)
  return {s: max(1, -(-by_split[s] // args.examples_per_shard))
          for s in split_lib.SPLITS if by_split.get(s)}


def _deal(record: dict[str, Any], planned: tuple[prepare.Plan, dict[str, int]],
          num_shards: dict[str, int], args: argparse.Namespace):
  """A kept row keyed by its (split, shard); a dropped one as a rejection."""
  chosen, label_id = planned
  dropped = prepare.drop_reason(record, chosen, label_id, args)
  if dropped is not None:
    row = readers.RawRow(source=record["source"], product_id=record["id"],
                         title=record["title"])
    yield beam.pvalue.TaggedOutput(
        _REJECTED, (dropped[0], prepare.reject_line(row, *dropped)))
    return
  split = prepare.final_split(record, chosen.assignment)
  shard = split_lib.group_hash(record["id"], args.seed) % num_shards[split]
  yield (split, shard), {**record, "label_id": label_id[record["label"]]}


def _all_shards(num_shards: dict[str, int]):
  """Every shard's key with no row: a shard that gets no row is written
  (empty) all the same, as in the pool path."""
  for s, n in num_shards.items():
    for i in range(n):
      yield (s, i), None


def _task(args: argparse.Namespace, work: pathlib.Path, split: str,
          index: int, count: int, num_classes: int) -> writer.ShardTask:
  out = pathlib.Path(args.output_dir)
  return writer.ShardTask(
      spill="", output=str(out / records.shard_name(split, index, count)),
      rejected=str(work / f"rejected-{split}-{index:05d}.jsonl"),
      tokenizer=str(args.tokenizer), max_length=args.max_length,
      num_classes=num_classes, max_side=args.max_image_side,
      jpeg_quality=args.jpeg_quality,
      drop_missing_images=args.drop_missing_images)


def _write_shard(item, planned, num_shards: dict[str, int],
                 args: argparse.Namespace, work: str) -> tuple[str, int]:
  """Photos, tokens and one TFRecord shard; its stats as a done marker."""
  (split, index), rows = item
  rows = sorted((r for r in rows if r is not None), key=lambda r: r["id"])
  work_dir = pathlib.Path(work)
  task = _task(args, work_dir, split, index, num_shards[split],
               len(planned[0].labels))
  stats = writer.process_rows(task, rows)
  records.write_json_atomic(work_dir / f"done-{split}-{index:05d}.json",
                            stats)
  return split, index


def _write_pass2(_, num_shards: dict[str, int],
                 rejected: list[tuple[str, int]], work: str) -> None:
  records.write_json_atomic(
      pathlib.Path(work) / PASS2,
      prepare.Pass2(num_shards, dict(sorted(rejected))).to_json())


def _count_by_reason(rejected, label: str):
  return (rejected
          | f"{label} reason" >> beam.Map(lambda rl: rl[0])
          | f"{label} count" >> beam.combiners.Count.PerElement()
          | f"{label} list" >> beam.combiners.ToList())


def _write_lines(rejected, label: str, path: pathlib.Path):
  return (rejected
          | f"{label} line" >> beam.Map(lambda rl: rl[1])
          | f"{label} write" >> beam.io.WriteToText(
              str(path), num_shards=1, shard_name_template=""))


def _counts(pcoll, label: str, key):
  return (pcoll
          | f"{label} key" >> beam.Map(lambda x: (key(x), 1))
          | f"{label} sum" >> beam.CombinePerKey(sum)
          | f"{label} list" >> beam.combiners.ToList())


def build(p: beam.Pipeline, args: argparse.Namespace, work: pathlib.Path,
          parents: tuple[str, ...]) -> None:
  """Adds the preparation to ``p``: the shards, their done markers,
  pass1.json, pass2.json and the rejected rows in ``work``."""
  side = beam.pvalue.AsSingleton
  start = p | "start" >> beam.Create([None])
  rows = start | "read" >> beam.FlatMap(_read, args)
  checked = rows | "validate" >> beam.FlatMap(
      _validate, args, prepare.fixed_labels(args)).with_outputs(
          _REJECTED, main="valid")
  firsts = (checked.valid
            | "by id" >> beam.GroupByKey()
            | "first of id" >> beam.FlatMap(_first_of_id).with_outputs(
                _REJECTED, main="rows"))
  normal = firsts.rows | "normalize" >> beam.Map(_normalize, args)
  rejected1 = ((checked[_REJECTED], firsts[_REJECTED])
               | "rejected 1" >> beam.Flatten())
  _write_lines(rejected1, "rejected 1", work / "rejected_pass1.jsonl")
  rows_in = rows | "rows in" >> beam.combiners.Count.Globally()
  truncated = (normal
               | "truncated" >> beam.Filter(lambda n: n[1])
               | "truncated count" >> beam.combiners.Count.Globally())
  p1 = start | "pass 1" >> beam.Map(
      _pass1, parents, rows_in=side(rows_in),
      rejected=side(_count_by_reason(rejected1, "rejected 1")),
      truncated=side(truncated),
      groups=side(_counts(normal, "groups",
                          lambda n: (n[0]["group"], n[0]["label"]))),
      given=side(_counts(normal, "given",
                         lambda n: (n[0]["split"], n[0]["label"]))),
      taxonomy=side(_counts(
          normal | "with parents" >> beam.Filter(lambda n: bool(n[2])),
          "taxonomy", lambda n: (n[0]["label"], " > ".join(n[2])))))
  planned = p1 | "plan" >> beam.Map(_plan, args, str(work))
  records_ = normal | "records" >> beam.Map(lambda n: n[0])
  sizes = (records_
           | "counted split" >> beam.Map(
               lambda r, pl: prepare.counted_split(r, pl[0].assignment),
               side(planned))
           | "split size" >> beam.combiners.Count.PerElement()
           | "split sizes" >> beam.combiners.ToList())
  num_shards = sizes | "num shards" >> beam.Map(_num_shards, args)
  dealt = records_ | "deal" >> beam.FlatMap(
      _deal, side(planned), side(num_shards), args).with_outputs(
          _REJECTED, main="kept")
  rejected2 = dealt[_REJECTED]
  _write_lines(rejected2, "rejected 2", work / "rejected_pass2.jsonl")
  _ = start | "pass 2" >> beam.Map(
      _write_pass2, side(num_shards),
      side(_count_by_reason(rejected2, "rejected 2")), str(work))
  empty = num_shards | "all shards" >> beam.FlatMap(_all_shards)
  _ = ((dealt.kept, empty)
       | "with empty shards" >> beam.Flatten()
       | "by shard" >> beam.GroupByKey()
       | "write shard" >> beam.Map(_write_shard, side(planned),
                                   side(num_shards), args, str(work)))


def options(args: argparse.Namespace) -> pipeline_options.PipelineOptions:
  """Beam's options: the flags after prepare's own, and without a runner
  the DirectRunner with ``--num_workers`` processes."""
  beam_args = list(getattr(args, "beam_args", None) or [])
  opts = pipeline_options.PipelineOptions(beam_args)
  if opts.view_as(pipeline_options.StandardOptions).runner is None:
    workers = max(1, args.num_workers)
    beam_args += ["--runner=DirectRunner",
                  f"--direct_num_workers={workers}",
                  "--direct_running_mode=" + (
                      "multi_processing" if workers > 1 else "in_memory")]
    opts = pipeline_options.PipelineOptions(beam_args)
  return opts


def _clear_work(work: pathlib.Path) -> None:
  """A rerun starts again: everything in the work folder but the arguments
  goes (a killed run's markers describe a run that did not finish)."""
  for child in work.iterdir():
    if child.name == "arguments.json":
      continue
    if child.is_dir() and not child.is_symlink():
      shutil.rmtree(child)
    else:
      child.unlink()


def run(args: argparse.Namespace, start: float) -> dict[str, Any]:
  """Runs the pipeline, then writes the summary files as the pool path
  does (``prepare.finish``); returns stats.json's content.

  Called by ``prepare.run`` once the output folder and its arguments are
  checked.
  """
  out = pathlib.Path(args.output_dir)
  work = out / prepare.WORK
  _clear_work(work)
  _, parents = prepare._rows(args)  # pylint: disable=protected-access
  with beam.Pipeline(options=options(args)) as p:
    build(p, args, work, tuple(parents))
  p1 = prepare.Pass1.from_json(json.loads(
      (work / PASS1).read_text(encoding="utf-8")))
  chosen = prepare.plan(args, p1)
  if not chosen.labels:
    raise SystemExit(prepare._no_class(args, p1, chosen, out))  # pylint: disable=protected-access
  p2 = prepare.Pass2.from_json(json.loads(
      (work / PASS2).read_text(encoding="utf-8")))
  shards = []
  for s in split_lib.SPLITS:
    n = p2.num_shards.get(s, 0)
    for i in range(n):
      stats = json.loads((work / f"done-{s}-{i:05d}.json").read_text(
          encoding="utf-8"))
      shards.append(prepare.Shard(
          s, i, _task(args, work, s, i, n, len(chosen.labels)), stats))
  return prepare.finish(args, p1, chosen, p2, shards, time.time() - start)
