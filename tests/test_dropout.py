"""Per-position dropout masks: the same at a title position whatever the
padded width (what keeps length buckets equal to padding in training)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mic_jax.layers import dropout
from mic_jax.models import bert


@pytest.mark.parametrize("shape,axes,cut", [
    ((3, 16, 5), (1,), lambda m: m[:, :8]),
    ((3, 2, 16, 16), (2, 3), lambda m: m[:, :, :8, :8]),
    ((3, 2, 16, 4), (2, 3), lambda m: m[:, :, :8]),
])
def test_mask_is_the_padded_mask_cut(shape, axes, cut):
  key = jax.random.key(4)
  full = np.asarray(dropout.keep_mask(key, 0.7, shape, axes))
  narrow_shape = cut(np.zeros(shape)).shape
  narrow = np.asarray(dropout.keep_mask(key, 0.7, narrow_shape, axes))
  np.testing.assert_array_equal(narrow, cut(full))
  assert full.shape == shape and full.dtype == bool
  # Independent draws: positions differ, the keep rate is the one asked.
  assert not np.array_equal(full[:, :, 0], full[:, :, 1]) or len(axes) == 1
  assert abs(full.mean() - 0.7) < 0.1
  other = np.asarray(dropout.keep_mask(jax.random.key(5), 0.7, shape, axes))
  assert not np.array_equal(full, other)


def test_token_dropout_scales_and_is_off_outside_training():
  x = jnp.ones((2, 6, 4))
  layer = dropout.TokenDropout(0.25)
  assert layer.apply({}, x, deterministic=True) is x
  y = np.asarray(layer.apply({}, x, deterministic=False,
                             rngs={"dropout": jax.random.key(0)}))
  assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
  assert (y == 0).any() and (y > 0).any()
  np.testing.assert_array_equal(
      dropout.TokenDropout(1.0).apply({}, x, deterministic=False), 0.0)


def test_bert_training_outputs_do_not_depend_on_padding():
  """Dropout on: a batch padded to 16 tokens and the same cut to 8 give the
  same sequence at real positions and the same pooled vector."""
  cfg = bert.get_bert_config("tiny", vocab_size=50,
                             hidden_dropout_prob=0.3,
                             attention_probs_dropout_prob=0.3)
  rng = np.random.default_rng(0)
  mask = (np.arange(16)[None] < rng.integers(2, 9, (4, 1))).astype(np.int32)
  ids = (rng.integers(1, 50, (4, 16)) * mask).astype(np.int32)
  model = bert.BertEncoder(cfg)
  params = model.init(jax.random.key(0), ids)["params"]
  rngs = {"dropout": jax.random.key(3)}
  run = jax.jit(lambda i, m: model.apply({"params": params}, i, m,
                                         train=True, rngs=rngs))
  seq, pooled = run(ids, mask)
  seq8, pooled8 = run(ids[:, :8], mask[:, :8])
  real = mask[:, :8] == 1
  np.testing.assert_allclose(np.asarray(seq8)[real],
                             np.asarray(seq)[:, :8][real], atol=1e-5)
  np.testing.assert_allclose(pooled8, pooled, atol=1e-5)
  plain, _ = model.apply({"params": params}, ids, mask)
  assert np.abs(np.asarray(plain) - np.asarray(seq)).max() > 1e-2
