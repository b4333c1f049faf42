"""Packed titles: the models compute on a packed batch what they compute on
the padded batch of the same products (with dropout too), and the packed
training stream is every example once per epoch, resumable, equal-shaped."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from mic_jax.data import packing
from mic_jax.models import classifier
from mic_jax.train import steps

LENGTH = 16
# A one-layer BERT and precomputed photo tokens: compiles in seconds.
TINY_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=LENGTH)


def _tiny_model(kind, text_repr, rate, scan=False):
  config = common.make_config(kind, "demo")
  with config.unlocked():
    config.model.scan_layers = scan
    config.text.remat = scan
    config.num_classes = 8
    config.text.max_length = LENGTH
    config.text.bert = TINY_BERT
    config.text.dropout = config.fusion.dropout = rate
    config.model.text_repr = text_repr
  return classifier.build_model(config)


def _products(rng, n):
  """``n`` padded products: titles of 1..LENGTH tokens, photo tokens."""
  out = []
  for i in range(n):
    size = int(rng.choice([2, 3, 5, 7, 9, 12, LENGTH]))
    ids = np.zeros(LENGTH, np.int32)
    ids[:size] = rng.integers(5, 64, size)
    out.append({
        "input_ids": ids,
        "attention_mask": (np.arange(LENGTH) < size).astype(np.int32),
        "token_type_ids": np.zeros(LENGTH, np.int32),
        "image_tokens": rng.normal(size=(5, 24)).astype(np.float32),
        "image_present": np.int32(i % 4 != 1),
        "label": np.int32(rng.integers(0, 8)),
        "mask": np.float32(1.0),
    })
  return out


def _stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def test_pack_plan_and_unpack_round_trip():
  rng = np.random.default_rng(0)
  products = _products(rng, 11)
  lengths = [packing.title_length(p) for p in products]
  per_row = packing.plan_rows(lengths, 24, 3)
  assert sum(per_row) == 11 and max(per_row) <= 3
  for r, count in enumerate(per_row):  # Greedy: the next title did not fit.
    first = sum(per_row[:r])
    assert sum(lengths[first:first + count]) <= 24
    if r + 1 < len(per_row) and count < 3:
      assert sum(lengths[first:first + count + 1]) > 24
  batch = packing.pack(products, pack_length=24, slots=3,
                       rows=len(per_row) + 1)
  assert batch["input_ids"].shape == (len(per_row) + 1, 24)
  assert batch["mask"].sum() == 11 and not batch["mask"][-1].any()
  seg, pos = batch["segment_ids"], batch["positions"]
  for r in range(len(per_row)):
    for s in range(per_row[r]):
      start, n = batch["slot_start"][r, s], batch["slot_length"][r, s]
      assert np.all(seg[r, start:start + n] == s + 1)
      np.testing.assert_array_equal(pos[r, start:start + n], np.arange(n))
  padded = packing.unpack(batch, LENGTH)
  real = padded["mask"] > 0
  want = _stack(products)
  for key in ("input_ids", "attention_mask", "label", "image_tokens"):
    np.testing.assert_array_equal(padded[key][real], want[key], err_msg=key)
  with pytest.raises(ValueError, match="rows"):
    packing.pack(products, pack_length=24, slots=3, rows=len(per_row) - 1)


CASES = [("cross_modal", "pooler", False), ("text_only", "cls", False),
         ("text_only", "mean", False), ("early", "pooler", False),
         ("text_only", "pooler", True)]


@pytest.mark.parametrize("kind,text_repr,scan", CASES)
def test_packed_loss_and_grads_equal_padded(kind, text_repr, scan):
  """Loss and gradients of a packed batch equal those of the same products
  padded (in slot order), dropout off and on (0.3 in BERT, fusion, head);
  ``scan``: BERT's layers under nn.scan with remat."""
  rng = np.random.default_rng(1)
  products = _products(rng, 10)
  packed = packing.pack(products, pack_length=32, slots=4, rows=4)
  assert 0 < (packed["mask"] == 0).sum()  # Empty slots are part of the test.
  padded = packing.unpack(packed, LENGTH)
  for rate in (0.0, 0.3):
    model = _tiny_model(kind, text_repr, rate, scan)
    params = nn.meta.unbox(jax.jit(lambda b, model=model: model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, b))(
            padded)["params"])

    def loss(params, batch, key, model=model):
      logits, _ = model.apply({"params": params}, batch, train=True,
                              rngs={"dropout": key})
      total = steps.weighted_xent(logits, batch["label"], batch["mask"], 0.0)
      return total / batch["mask"].sum()

    grad = jax.jit(jax.value_and_grad(loss))
    key = jax.random.key(7)
    want_loss, want = grad(params, padded, key)
    got_loss, got = grad(params, packed, key)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                            jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5,
                                 rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    if rate:  # Not vacuous: dropout changed the loss.
      plain = model.apply({"params": params}, padded, train=False)[0]
      plain_loss = steps.weighted_xent(plain, padded["label"],
                                       padded["mask"], 0.0) / 10
      assert abs(float(plain_loss) - float(want_loss)) > 1e-3
  # Without dropout, also the padded batch of just the 10 products.
  logits, _ = model.apply({"params": params}, _stack(products))
  packed_logits, _ = model.apply({"params": params}, packed)
  assert packed_logits.shape == (4, 4, 8)
  np.testing.assert_allclose(
      np.asarray(packed_logits)[packed["mask"] > 0], logits, atol=2e-5)


# --------------------------------------------------------- pipeline --

from mic_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from mic_jax.data import records  # pylint: disable=g-import-not-at-top

N_TRAIN = 37
PACK = pipeline.Packing(length=24, slots=3, rows=2)


def _examples(n, offset=1000):
  """Example ``i`` carries ``i + offset`` as its first token."""
  out = []
  for i in range(n):
    size = (3, 5, 7, 4, 9, 12, 6, 15, 2, 16)[i % 10]
    ids = [i + offset] + [5] * (size - 1) + [0] * (LENGTH - size)
    out.append(records.Example(
        product_id=str(i), title=f"item {i}", input_ids=ids,
        attention_mask=[1] * size + [0] * (LENGTH - size), label=i % 3,
        label_name="abc"[i % 3]))
  return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("packed")
  records.write_examples(path, {"train": _examples(N_TRAIN),
                                "validation": _examples(23, 6000)},
                         labels=["a", "b", "c"], max_length=LENGTH,
                         examples_per_shard=10)
  return str(path)


def _slot_tags(batch):
  """Products of a packed batch in slot order (real slots only)."""
  tags = batch["input_ids"][np.arange(len(batch["slot_start"]))[:, None],
                            batch["slot_start"]]
  return tags[batch["mask"] > 0].tolist()


def _epochs(stream, per_epoch, epochs):
  """Split a packed stream into epochs of ``per_epoch`` products (an epoch
  must end exactly at a batch boundary): ``[(tags, batches)]``."""
  out = []
  for _ in range(epochs):
    tags, batches = [], []
    while len(tags) < per_epoch:
      batches.append(next(stream))
      tags += _slot_tags(batches[-1])
    assert len(tags) == per_epoch
    out.append((tags, batches))
  return out


@pytest.mark.parametrize("processes", [1, 2])
def test_packed_stream_is_the_padded_stream_once_per_epoch(data_dir,
                                                           processes):
  kwargs = dict(image_size=8, seed=2, shuffle_buffer=8,
                process_index=processes - 1, process_count=processes)
  per_epoch = N_TRAIN // processes
  padded = pipeline.train_batches(data_dir, batch_size=1, **kwargs)
  want = [next(padded) for _ in range(2 * per_epoch)]
  tags = [int(b["input_ids"][0, 0]) for b in want]
  stream = pipeline.train_batches(data_dir, batch_size=0, packing=PACK,
                                  **kwargs)
  (first, batches), (second, _) = _epochs(stream, per_epoch, 2)
  assert batches[0]["input_ids"].shape == (2, 24)
  assert batches[0]["image"].shape == (2, 3, 8, 8, 3)
  # The padded stream's products in its order, with the same photos (the
  # same augmentation positions), each once per epoch.
  assert first == tags[:per_epoch] and second == tags[per_epoch:]
  assert len(set(first)) == per_epoch
  photos = [b["image"][b["mask"] > 0] for b in batches]
  np.testing.assert_array_equal(
      np.concatenate(photos), np.concatenate([b["image"] for b in want])[
          :per_epoch])


def test_packed_epochs_each_hold_every_example_once(data_dir):
  stream = pipeline.train_batches(data_dir, batch_size=0, image_size=8,
                                  seed=1, packing=PACK, image_keys=True)
  epochs = _epochs(stream, N_TRAIN, 3)
  for tags, batches in epochs:
    assert sorted(tags) == list(range(1000, 1000 + N_TRAIN))
    assert all(b["image_key"].shape == (2, 3) for b in batches)
  assert epochs[0][0] != epochs[1][0]  # Reshuffled each epoch.


@pytest.mark.parametrize("processes", [1, 2])
def test_packed_resume_is_bitwise_identical(data_dir, processes):
  kwargs = dict(batch_size=0, image_size=8, seed=3, shuffle_buffer=8,
                packing=PACK, process_index=processes - 1,
                process_count=processes)
  full = pipeline.train_batches(data_dir, **kwargs)
  full = [next(full) for _ in range(30)]  # Several epochs.
  for start in (3, 17):
    resumed = pipeline.train_batches(data_dir, start_step=start, **kwargs)
    for a in full[start:start + 5]:
      b = next(resumed)
      assert set(a) == set(b)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_two_hosts_get_equal_shapes_every_step(data_dir):
  streams = [pipeline.train_batches(data_dir, batch_size=0, image_size=8,
                                    seed=7, process_index=i, process_count=2,
                                    packing=PACK) for i in range(2)]
  for _ in range(15):
    a, b = next(streams[0]), next(streams[1])
    assert {k: v.shape for k, v in a.items()} == {
        k: v.shape for k, v in b.items()}


@pytest.mark.parametrize("processes", [1, 3])
def test_packed_eval_sees_every_example_once(data_dir, processes):
  seen, shapes = [], []
  for index in range(processes):
    batches = list(pipeline.eval_batches(
        data_dir, "validation", batch_size=0, image_size=8, packing=PACK,
        process_index=index, process_count=processes, image_keys=True))
    shapes.append([{k: v.shape for k, v in b.items()} for b in batches])
    for b in batches:
      seen += _slot_tags(b)
      assert np.all(b["slot_length"][b["mask"] == 0] == 0)
  assert all(s == shapes[0] for s in shapes), "hosts must agree on shapes"
  assert sorted(seen) == list(range(6000, 6023))


def test_withheld_titles_and_photos_are_the_padded_ones():
  """Title and photo dropout pick the same products, packed or padded."""
  rng = np.random.default_rng(3)
  packed = packing.pack(_products(rng, 10), pack_length=32, slots=4, rows=4)
  padded = packing.unpack(packed, LENGTH)
  key = jax.random.key(5)
  got = packing.unpack(jax.tree.map(np.asarray, steps.withhold_titles(
      steps.withhold_photos(packed, key, 0.5), key, 0.5)), LENGTH)
  want = steps.withhold_titles(steps.withhold_photos(padded, key, 0.5), key,
                               0.5)
  for name in ("attention_mask", "image_present"):
    np.testing.assert_array_equal(got[name], np.asarray(want[name]))
  cut = np.asarray(want["attention_mask"]).sum() < padded[
      "attention_mask"].sum()
  assert cut and np.asarray(want["image_present"]).sum() < padded[
      "image_present"].sum()


# ------------------------------------------------------------ a run --


def test_packed_run_trains_evaluates_and_exports_a_padded_model(tmp_path):
  """A demo run with ``data.pack_titles`` trains and evaluates packed; its
  export (padded inputs) scores products as the model does packed."""
  import json  # pylint: disable=g-import-not-at-top
  import demo_configs  # pylint: disable=g-import-not-at-top
  from mic_jax import export  # pylint: disable=g-import-not-at-top
  from mic_jax import trainer  # pylint: disable=g-import-not-at-top
  from mic_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(demo_configs.short_demo(
      "cross_modal", total_steps=3, log_every=3, eval_every=3,
      **{"data.pack_titles": True}), str(workdir))
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["pack_titles"] and config["data"]["pack_slots"] > 1
  out = tmp_path / "export"
  export.export_run(str(workdir), str(out))
  predictor = Predictor(out)
  rng = np.random.default_rng(0)
  titles = ["canvas sneaker", "leather tote bag with a long strap", "scarf",
            "blue denim jacket", "wool hat"]
  images = [rng.integers(0, 255, (40, 30, 3), np.uint8), None,
            rng.integers(0, 255, (30, 30, 3), np.uint8), None, None]
  got = predictor.probabilities(titles, images)
  arrays = predictor.encode(titles, images)
  products = [{**{k: v[i] for k, v in arrays.items()},
               "label": np.int32(0), "mask": np.float32(1)}
              for i in range(len(titles))]
  packed = packing.pack(products, pack_length=config["data"]["pack_length"],
                        slots=config["data"]["pack_slots"], rows=2)
  model, params, _, _ = export.restore(workdir)
  logits, _ = model.apply({"params": params}, packed)
  calibration = workdir / "calibration.json"
  temperature = (json.loads(calibration.read_text())["temperature"]
                 if calibration.exists() else 1.0)
  want = np.asarray(jax.nn.softmax(np.asarray(logits)[packed["mask"] > 0]
                                   / temperature, axis=-1))
  assert np.abs(got - want).max() <= 1e-5


def test_resolve_packing(data_dir):
  info = pipeline.DatasetInfo.load(data_dir)
  got = pipeline.resolve_packing(info, pack_length=0, slots=0,
                                 global_batch_size=12, row_multiple=2,
                                 process_count=2)
  # Titles of 2..16 tokens, mean 7.6: 64-token rows, 13 slots (1.5 x 64 /
  # 7.6, under 64 / 2), 12 titles of about 7.5 per row -> 2 rows, 1 a host.
  assert got == pipeline.Packing(length=4 * LENGTH, slots=13, rows=1)
  assert pipeline.resolve_packing(
      info, pack_length=40, slots=3, global_batch_size=30,
      row_multiple=1).rows == 10  # 3 titles a row at most.
  with pytest.raises(ValueError, match="pack_length"):
    pipeline.resolve_packing(info, pack_length=8, slots=3,
                             global_batch_size=4, row_multiple=1)
