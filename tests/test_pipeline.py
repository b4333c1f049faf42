"""The tf.data pipeline: batch contract, eval-once, determinism, resume."""

import collections
import io
import pathlib

import numpy as np
from PIL import Image
import pytest

from mic_jax.data import pipeline
from mic_jax.data import records

LENGTH = 8
LABELS = ["a", "b", "c"]
KEYS = {"input_ids": np.int32, "attention_mask": np.int32,
        "token_type_ids": np.int32, "image": np.float32,
        "image_present": np.int32, "label": np.int32, "mask": np.float32}


def _jpeg(rng, w, h):
  arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(arr).save(out, format="JPEG")
  return out.getvalue()


def _examples(n, rng, offset=0):
  """Example ``i`` carries ``i + 1000`` as its first token: a unique tag."""
  out = []
  for i in range(n):
    ids = [i + offset + 1000] + [5] * (LENGTH - 1)
    jpeg = b"" if i % 5 == 0 else _jpeg(rng, int(rng.integers(20, 90)),
                                        int(rng.integers(20, 90)))
    out.append(records.Example(
        product_id=str(i + offset), title=f"item {i}", input_ids=ids,
        attention_mask=[1] * LENGTH, label=i % len(LABELS),
        label_name=LABELS[i % len(LABELS)], image_jpeg=jpeg))
  return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("prepared")
  records.write_examples(
      path, {"train": _examples(37, rng), "validation": _examples(23, rng,
                                                                   5000)},
      labels=LABELS, max_length=LENGTH, examples_per_shard=10)
  return str(path)


def _tags(batch):
  return batch["input_ids"][:, 0]


def test_dataset_info(data_dir):
  info = pipeline.DatasetInfo.load(data_dir)
  assert info.num_classes == 3 and info.max_length == LENGTH
  assert info.split_size("train") == 37 and info.has_split("validation")
  assert not info.has_split("test")
  assert info.class_counts("train").tolist() == [13, 12, 12]
  assert len(info.files("train")) == 4


@pytest.mark.parametrize("label", ["two\nlines", "para\u2028graph", "x\ry"])
def test_label_with_a_line_break_is_never_written(tmp_path, label):
  """labels.txt is one class per line: such a class list is refused."""
  rng = np.random.default_rng(0)
  with pytest.raises(records.LabelsError, match="labels.txt.*line break"):
    records.write_examples(tmp_path, {"train": _examples(3, rng)},
                           labels=["a", label, "c"], max_length=LENGTH)
  assert not (tmp_path / records.LABELS_FILE).exists()
  assert not (tmp_path / records.INFO_FILE).exists()


@pytest.mark.parametrize("text", ["a\nb\nc\nd\n", "a\nb\u2028x\nc\n"])
def test_labels_file_that_reads_back_wrong_is_named(data_dir, tmp_path, text):
  """A labels.txt an older writer left with a class name holding a line
  break (more lines than classes, or a U+2028 inside a line) stops at
  load, naming the file, not later with a broadcasting error."""
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / "copy"
  shutil.copytree(data_dir, copy)
  (copy / records.LABELS_FILE).write_text(text, encoding="utf-8")
  with pytest.raises(records.LabelsError,
                     match=f"{copy / records.LABELS_FILE}.*prepare"):
    pipeline.DatasetInfo.load(str(copy))


def test_train_batch_contract(data_dir):
  batch = next(pipeline.train_batches(data_dir, batch_size=6, image_size=32,
                                      seed=0))
  for key, dtype in KEYS.items():
    assert batch[key].dtype == dtype, key
    assert batch[key].shape[0] == 6
  assert batch["input_ids"].shape == (6, LENGTH)
  assert batch["image"].shape == (6, 32, 32, 3)
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  absent = batch["image_present"] == 0
  assert np.all(batch["image"][absent] == 0)
  assert np.all(batch["image"][~absent].std(axis=(1, 2, 3)) > 0)
  assert np.all(batch["mask"] == 1)
  assert np.all(batch["label"] == (_tags(batch) - 1000) % 3)


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("start", [3, 5, 11])
def test_resume_is_bitwise_identical(data_dir, start):
  # 37 examples per epoch, batch 7: resumes cross epoch boundaries.
  kwargs = dict(batch_size=7, image_size=16, seed=3, shuffle_buffer=16)
  full = _take(pipeline.train_batches(data_dir, **kwargs), 14)
  resumed = _take(pipeline.train_batches(data_dir, start_step=start,
                                         **kwargs), 14 - start)
  for a, b in zip(full[start:], resumed):
    for key in KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_epochs_cover_data_and_seed_matters(data_dir):
  kwargs = dict(batch_size=37, image_size=16, shuffle_buffer=64)
  epochs = _take(pipeline.train_batches(data_dir, seed=0, **kwargs), 2)
  for epoch in epochs:
    assert sorted(_tags(epoch)) == list(range(1000, 1037))
  assert not np.array_equal(_tags(epochs[0]), _tags(epochs[1]))
  other = next(pipeline.train_batches(data_dir, seed=1, **kwargs))
  assert not np.array_equal(_tags(epochs[0]), _tags(other))


def test_train_two_processes_read_disjoint_files(data_dir):
  seen = []
  for index in range(2):
    it = pipeline.train_batches(data_dir, batch_size=17, image_size=16,
                                seed=0, process_index=index, process_count=2)
    seen.append(set(_tags(next(it)).tolist()))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 34


@pytest.mark.parametrize("batch_size", [1, 4, 8, 23, 64])
@pytest.mark.parametrize("processes", [1, 2])
def test_eval_sees_every_example_once(data_dir, batch_size, processes):
  counts = collections.Counter()
  num_batches = set()
  for index in range(processes):
    batches = list(pipeline.eval_batches(
        data_dir, "validation", batch_size=batch_size, image_size=16,
        process_index=index, process_count=processes))
    num_batches.add(len(batches))
    for b in batches:
      assert b["mask"].shape == (batch_size,)
      real = b["mask"] == 1
      assert np.all(b["input_ids"][~real] == 0)
      assert np.all(b["image"][~real] == 0)
      counts.update(_tags(b)[real].tolist())
  assert len(num_batches) == 1, "hosts must run the same number of batches"
  assert counts == collections.Counter(range(6000, 6023))


def test_eval_is_centre_crop_and_deterministic(data_dir):
  a = list(pipeline.eval_batches(data_dir, "validation", batch_size=8,
                                 image_size=24))
  b = list(pipeline.eval_batches(data_dir, "validation", batch_size=8,
                                 image_size=24))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert a[0]["image"].shape == (8, 24, 24, 3)


def _prepared(path, num_files, per_file, rng):
  """``num_files`` shards of ``per_file`` examples (tags 1000, 1001, ...)."""
  records.write_examples(
      path, {"train": _examples(num_files * per_file, rng)}, labels=LABELS,
      max_length=LENGTH, examples_per_shard=per_file)
  assert len(pipeline.DatasetInfo.load(str(path)).files("train")) == num_files
  return str(path)


@pytest.mark.parametrize("num_files,per_file,hosts", [
    (4, 40, 8),   # Fewer files than hosts.
    (4, 10, 4),   # As many files as hosts.
    (14, 10, 4),  # Files not divisible by hosts.
    (4, 10, 3),
    (4, None, 3),  # Uneven files (10, 9, 9, 9): the module's data set.
])
def test_train_epoch_covers_every_example_once_across_hosts(
    tmp_path, data_dir, num_files, per_file, hosts):
  if per_file is None:
    path, total = data_dir, 37
  else:
    path = _prepared(tmp_path, num_files, per_file, np.random.default_rng(1))
    total = num_files * per_file
  per_host = total // hosts
  epochs = collections.defaultdict(collections.Counter)
  for index in range(hosts):
    # One batch = one epoch of this host; two batches = epochs 0 and 1.
    it = pipeline.train_batches(path, batch_size=per_host, image_size=8,
                                seed=5, process_index=index,
                                process_count=hosts, shuffle_buffer=8)
    for epoch, batch in enumerate(_take(it, 2)):
      epochs[epoch].update(_tags(batch).tolist())
  for epoch, counts in epochs.items():
    assert max(counts.values()) == 1, f"epoch {epoch} repeats examples"
    assert set(counts) <= set(range(1000, 1000 + total))
    assert total - len(counts) == total % hosts < hosts, epoch


@pytest.mark.parametrize("start", [2, 5])
def test_resume_is_bitwise_identical_on_one_of_several_hosts(data_dir, start):
  # 3 hosts share 37 examples: 12 per host and epoch, batch 5.
  kwargs = dict(batch_size=5, image_size=16, seed=3, shuffle_buffer=16,
                process_index=1, process_count=3)
  full = _take(pipeline.train_batches(data_dir, **kwargs), 8)
  resumed = _take(pipeline.train_batches(data_dir, start_step=start,
                                         **kwargs), 8 - start)
  for a, b in zip(full[start:], resumed):
    for key in KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _record_ends(path):
  """Byte offsets where each TFRecord of ``path`` ends (length + 2 CRCs)."""
  data = path.read_bytes()
  ends, pos = [], 0
  while pos < len(data):
    pos += 12 + int.from_bytes(data[pos:pos + 8], "little") + 4
    ends.append(pos)
  return ends


@pytest.fixture
def damaged_dir(tmp_path):
  """A copy of a small prepared set, and its second train shard's path."""
  rng = np.random.default_rng(2)
  records.write_examples(
      tmp_path, {"train": _examples(18, rng), "validation": _examples(9, rng)},
      labels=LABELS, max_length=LENGTH, examples_per_shard=6)
  path = str(tmp_path)
  return path, pathlib.Path(pipeline.DatasetInfo.load(path).files("train")[1])


def _first_epoch(path):
  return next(pipeline.train_batches(path, batch_size=18, image_size=8,
                                     seed=0, shuffle_buffer=1))


@pytest.mark.parametrize("cut", ["mid_record", "record_boundary"])
def test_damaged_train_shard_is_named(damaged_dir, cut):
  path, shard = damaged_dir
  _first_epoch(path)  # Whole: reads fine.
  ends = _record_ends(shard)
  size = ends[3] + 5 if cut == "mid_record" else ends[3]
  shard.write_bytes(shard.read_bytes()[:size])
  with pytest.raises(pipeline.DamagedShardError, match=shard.name) as err:
    _first_epoch(path)
  if cut == "record_boundary":
    assert "4 records, dataset_info.json says 6" in str(err.value)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_damaged_eval_shard_is_named(damaged_dir, split):
  path, _ = damaged_dir
  shard = pathlib.Path(pipeline.DatasetInfo.load(path).files(split)[-1])
  shard.write_bytes(shard.read_bytes()[:-7])
  with pytest.raises(pipeline.DamagedShardError, match=shard.name):
    list(pipeline.eval_batches(path, split, batch_size=4, image_size=8))


def test_missing_shard_is_named(damaged_dir):
  path, shard = damaged_dir
  shard.unlink()
  with pytest.raises(pipeline.DamagedShardError, match=shard.name):
    _first_epoch(path)
  with pytest.raises(pipeline.DamagedShardError, match=shard.name):
    list(pipeline.eval_batches(path, "train", batch_size=4, image_size=8))


_LEFT_OPEN = """
import sys
from mic_jax.data import pipeline
batches = pipeline.train_batches(sys.argv[1], batch_size=4, image_size=16,
                                 seed=0)
next(batches)  # Left open: closed by the garbage collector at exit.
print("done")
"""


def test_stream_left_open_at_exit_closes_quietly(data_dir):
  """A generator collected at interpreter exit used to print
  "AttributeError: 'NoneType' object has no attribute 'errors'"."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  done = subprocess.run([sys.executable, "-c", _LEFT_OPEN, data_dir],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
  assert "Exception ignored" not in done.stderr, done.stderr[-2000:]
  assert "Error" not in done.stderr.replace("TF_CPP", ""), done.stderr[-2000:]
