"""Length buckets: choices, the shared schedule, and the bucketed pipelines
(every example once, exact resume, equal shapes on every host)."""

import collections
import json
import pathlib

import numpy as np
import pytest

from mic_jax.data import buckets
from mic_jax.data import pipeline
from mic_jax.data import records

LENGTH = 24
LABELS = ["a", "b", "c"]
KEYS = ("input_ids", "attention_mask", "token_type_ids", "image",
        "image_present", "label", "mask")


def _title_length(i):
  """Example ``i``'s token count: mostly short, a few long (like titles)."""
  return (3, 5, 7, 4, 9, 12, 6, 15, 20, 24)[i % 10]


def _examples(n, offset=0):
  """Example ``i`` carries ``i + offset + 1000`` as its first token."""
  out = []
  for i in range(n):
    size = _title_length(i)
    ids = [i + offset + 1000] + [5] * (size - 1) + [0] * (LENGTH - size)
    out.append(records.Example(
        product_id=str(i + offset), title=f"item {i}", input_ids=ids,
        attention_mask=[1] * size + [0] * (LENGTH - size),
        label=i % len(LABELS), label_name=LABELS[i % len(LABELS)]))
  return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("prepared")
  records.write_examples(
      path, {"train": _examples(97), "validation": _examples(41, 5000)},
      labels=LABELS, max_length=LENGTH, examples_per_shard=20)
  return str(path)


LENGTHS = (8, 16, 24)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _tags(batch):
  return batch["input_ids"][:, 0].tolist()


def _length(batch):
  return batch["attention_mask"].sum(axis=1)


# ---------------------------------------------------------- choices --


def test_parse():
  assert buckets.parse("", 32) == ()
  assert buckets.parse("auto", 32) == "auto"
  assert buckets.parse("16, 8", 32) == (8, 16, 32)
  assert buckets.parse("8,32", 32) == (8, 32)
  with pytest.raises(ValueError, match="length_buckets"):
    buckets.parse("8,64", 32)
  with pytest.raises(ValueError, match="length_buckets"):
    buckets.parse("eight", 32)


def test_choose_minimises_padding_on_title_like_lengths():
  counts = np.zeros(33, np.int64)
  counts[5:16] = 100   # Most titles 5..15 tokens.
  counts[30] = 3       # A few long ones.
  chosen = buckets.choose(counts, 32)
  assert chosen[-1] == 32 and len(chosen) <= buckets.MAX_AUTO_BUCKETS
  assert all(c % buckets.ALIGN == 0 for c in chosen)
  assert buckets.padded_tokens(counts, chosen) < 0.6 * buckets.padded_tokens(
      counts, (32,))
  # No title shorter than 9: a bucket of 8 would be empty, so none.
  counts[:9] = 0
  assert 8 not in buckets.choose(counts, 32)


def test_merge_small_buckets():
  assert buckets.merge_small((8, 16, 32), np.array([100, 3, 50]), 10) == (
      8, 32)
  # A small last bucket takes its neighbour's titles (it must stay: only it
  # holds the longest titles).
  assert buckets.merge_small((8, 16, 32), np.array([100, 50, 3]), 10) == (
      8, 32)
  assert buckets.merge_small((8, 16, 32), np.array([4, 7, 1]), 10) == (32,)
  assert buckets.merge_small((8, 32), np.array([2, 3]), 10) == (32,)


def test_every_merged_bucket_fills_a_batch():
  rng = np.random.default_rng(0)
  for _ in range(500):
    lengths = tuple(sorted(rng.choice(np.arange(1, 33), rng.integers(1, 6),
                                      replace=False)))
    if lengths[-1] != 32:
      lengths += (32,)
    sizes = rng.integers(0, 40, len(lengths)) * rng.integers(0, 2, len(lengths))
    minimum = int(rng.integers(1, 60))
    merged = buckets.merge_small(lengths, sizes, minimum)
    assert merged[-1] == 32 and set(merged) <= set(lengths)
    merged_sizes = np.bincount(np.searchsorted(merged, lengths),
                               weights=sizes, minlength=len(merged))
    if sizes.sum() >= minimum:
      assert merged_sizes.min() >= minimum, (lengths, sizes, minimum, merged)
    else:
      assert merged == (32,)


def test_schedule_follows_bucket_shares_and_replays():
  schedule = buckets.Schedule([600.0, 300.0, 0.0, 100.0], batch_size=10,
                              seed=4)
  taken = schedule.consumed(1000)
  assert taken.sum() == 1000 and taken[2] == 0
  # Each bucket within one batch of its share of the titles.
  np.testing.assert_allclose(taken, [600, 300, 0, 100], atol=1.01)
  first = list(__import__("itertools").islice(iter(schedule), 50))
  again = list(__import__("itertools").islice(iter(
      buckets.Schedule([600.0, 300.0, 0.0, 100.0], 10, seed=4)), 50))
  other = list(__import__("itertools").islice(iter(
      buckets.Schedule([600.0, 300.0, 0.0, 100.0], 10, seed=5)), 50))
  assert first == again and first != other


# --------------------------------------------------------- training --


def test_prepared_set_records_length_counts(data_dir):
  info = pipeline.DatasetInfo.load(data_dir)
  counts = info.length_counts("train")
  want = np.bincount([_title_length(i) for i in range(97)],
                     minlength=LENGTH + 1)
  np.testing.assert_array_equal(counts, want)


def test_old_prepared_set_counts_lengths_from_records(data_dir, tmp_path):
  old = tmp_path / "old"
  old.mkdir()
  for f in pathlib.Path(data_dir).iterdir():
    (old / f.name).write_bytes(f.read_bytes())
  info_file = old / records.INFO_FILE
  info = json.loads(info_file.read_text())
  for shards in info["shards"].values():
    for shard in shards:
      del shard[records.LENGTH_COUNTS]
  info_file.write_text(json.dumps(info))
  old_info = pipeline.DatasetInfo.load(str(old))
  assert old_info.length_counts("train") is None
  np.testing.assert_array_equal(
      pipeline.split_length_counts(old_info, "train"),
      pipeline.DatasetInfo.load(data_dir).length_counts("train"))


def test_resolve_buckets(data_dir):
  info = pipeline.DatasetInfo.load(data_dir)
  assert pipeline.resolve_buckets(info, "", global_batch_size=4) == ()
  auto = pipeline.resolve_buckets(info, "auto", global_batch_size=4)
  assert auto[-1] == LENGTH and len(auto) > 1
  # 97 titles: 10 of length 20..24, fewer than a batch of 16 -> merged away.
  assert pipeline.resolve_buckets(info, "8,16", global_batch_size=4) == (
      8, 16, 24)
  assert pipeline.resolve_buckets(info, "8,16,20", global_batch_size=16) == (
      8, 16, 24)
  # The last bucket (21..24 tokens: 9 titles) is too small as well.
  assert pipeline.resolve_buckets(info, "8,20", global_batch_size=16) == (
      8, 24)


@pytest.mark.parametrize("spec", ["8,20", "8,16,20", "4,8,12,16,20", "auto"])
@pytest.mark.parametrize("batch_size", [4, 16, 24])
def test_every_bucket_fills_a_batch_within_an_epoch(data_dir, spec,
                                                    batch_size):
  """Each resolved bucket holds at least one global batch of training
  titles, so its first batch is read from one epoch: distinct titles."""
  info = pipeline.DatasetInfo.load(data_dir)
  lengths = pipeline.resolve_buckets(info, spec, global_batch_size=batch_size)
  sizes = buckets.per_bucket(info.length_counts("train"), lengths)
  assert sizes.min() >= batch_size, (lengths, sizes)
  if batch_size != 16:
    return  # The stream itself, once: reading it is slow.
  it = pipeline.train_batches(data_dir, batch_size=batch_size, image_size=8,
                              seed=0, length_buckets=lengths)
  first = {}
  for batch in _take(it, 3 * 97 // batch_size):
    first.setdefault(batch["input_ids"].shape[1], _tags(batch))
  assert set(first) == set(lengths)
  for width, tags in first.items():
    assert len(set(tags)) == batch_size, (width, sorted(tags))


def test_bucketed_batches_hold_one_bucket_each(data_dir):
  it = pipeline.train_batches(data_dir, batch_size=4, image_size=8, seed=0,
                              length_buckets=LENGTHS)
  seen = collections.Counter()
  for batch in _take(it, 40):
    width = batch["input_ids"].shape[1]
    assert width in LENGTHS
    for key in ("attention_mask", "token_type_ids"):
      assert batch[key].shape == (4, width)
    k = LENGTHS.index(width)
    lo = LENGTHS[k - 1] if k else 0
    assert np.all(_length(batch) <= width) and np.all(_length(batch) > lo)
    seen[width] += 1
  assert set(seen) == set(LENGTHS)


@pytest.mark.parametrize("processes", [1, 3])
def test_bucket_streams_are_the_padded_stream_filtered(data_dir, processes):
  """Each bucket takes its titles in the padded stream's order: nothing
  dropped, nothing repeated, same augmentation positions."""
  index = processes - 1
  kwargs = dict(image_size=8, seed=2, shuffle_buffer=16,
                process_index=index, process_count=processes)
  per_epoch = 97 // processes
  padded = _take(pipeline.train_batches(data_dir, batch_size=1, **kwargs),
                 3 * per_epoch)
  stream = [(_tags(b)[0], int(_length(b)[0])) for b in padded]
  batches = _take(pipeline.train_batches(data_dir, batch_size=3,
                                         length_buckets=LENGTHS, **kwargs),
                  (2 * per_epoch) // 3)
  for k, width in enumerate(LENGTHS):
    lo = LENGTHS[k - 1] if k else 0
    got = [t for b in batches if b["input_ids"].shape[1] == width
           for t in _tags(b)]
    want = [t for t, n in stream if lo < n <= width]
    assert got == want[:len(got)], width
    assert got, width


def test_one_host_epoch_is_every_example_once_within_a_batch(data_dir):
  # 97 titles, batch 3, 3 buckets: over two epochs of steps each title was
  # seen twice, up to one batch per bucket at the ends (a bucket's stream
  # runs at most one batch ahead or behind its share).
  it = pipeline.train_batches(data_dir, batch_size=3, image_size=8, seed=1,
                              length_buckets=LENGTHS)
  counts = collections.Counter(t for b in _take(it, 2 * 97 // 3)
                               for t in _tags(b))
  off = sum(abs(counts[t] - 2) for t in range(1000, 1097))
  assert set(counts) <= set(range(1000, 1097)) and max(counts.values()) <= 3
  assert off <= 2 * 3 * len(LENGTHS), counts


@pytest.mark.parametrize("start", [4, 13, 70])
@pytest.mark.parametrize("processes", [1, 2])
def test_bucketed_resume_is_bitwise_identical(data_dir, start, processes):
  # 70 steps of batch 4: several epochs of each bucket.
  kwargs = dict(batch_size=4, image_size=16, seed=3, shuffle_buffer=16,
                length_buckets=LENGTHS, process_index=processes - 1,
                process_count=processes)
  full = _take(pipeline.train_batches(data_dir, **kwargs), start + 6)
  resumed = _take(pipeline.train_batches(data_dir, start_step=start,
                                         **kwargs), 6)
  for a, b in zip(full[start:], resumed):
    for key in KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_two_hosts_get_equal_shapes_every_step(data_dir):
  streams = [pipeline.train_batches(data_dir, batch_size=4, image_size=8,
                                    seed=7, process_index=i, process_count=2,
                                    length_buckets=LENGTHS)
             for i in range(2)]
  widths = set()
  for a, b in zip(_take(streams[0], 30), _take(streams[1], 30)):
    assert {k: v.shape for k, v in a.items()} == {
        k: v.shape for k, v in b.items()}
    widths.add(a["input_ids"].shape[1])
  assert len(widths) > 1


# ------------------------------------------------------------- eval --


@pytest.mark.parametrize("batch_size", [1, 4, 16])
@pytest.mark.parametrize("processes", [1, 2])
def test_bucketed_eval_sees_every_example_once(data_dir, batch_size,
                                               processes):
  counts = collections.Counter()
  shapes = []
  for index in range(processes):
    batches = list(pipeline.eval_batches(
        data_dir, "validation", batch_size=batch_size, image_size=8,
        process_index=index, process_count=processes,
        length_buckets=LENGTHS))
    shapes.append([b["input_ids"].shape for b in batches])
    for b in batches:
      real = b["mask"] == 1
      width = b["input_ids"].shape[1]
      assert np.all(_length(b)[real] <= width)
      assert np.all(b["input_ids"][~real] == 0)
      counts.update(np.asarray(_tags(b))[real].tolist())
  assert all(s == shapes[0] for s in shapes), "hosts must agree on shapes"
  assert {s[1] for s in shapes[0]} == set(LENGTHS)
  assert counts == collections.Counter(range(6000, 6041))
