"""Fusion layer tests: eqs. (1)-(4) against an independent NumPy transcription.

The reference below is written from the paper's equations, not from the
Flax code: it takes the weights as plain matrices (``W_Q`` is ``Dq x Dt``,
heads are contiguous column blocks), computes in float64 with explicit
loops over examples and heads, and handles "no photo" by dropping the cross
term, which is what the paper's equations mean for a product without an
image. The only thing read from the Flax side is the parameter values.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mic_jax.layers import attention
from mic_jax.models import fusion

B, L, M, DT, DV = 5, 7, 5, 16, 12
TOL = 1e-5


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((B, L, DT)).astype(np.float32)
  v = rng.standard_normal((B, M, DV)).astype(np.float32)
  lengths = np.array([7, 3, 5, 1, 6])
  text_mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int32)
  present = np.array([1, 0, 1, 0, 1], np.int32)
  return h, v, text_mask, present


def _params(model, h, v, text_mask, present, seed=1):
  variables = model.init(jax.random.key(seed), h, v, text_mask, present)
  params = nn.meta.unbox(variables["params"])
  # Biases start at zero; randomise them so a misplaced bias would show.
  leaves, tree = jax.tree.flatten_with_path(params)
  rng = np.random.default_rng(seed)
  leaves = [x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
            if path[-1].key == "bias" else x for path, x in leaves]
  return jax.tree.unflatten(tree, leaves)


def _matrix(kernel):
  """A projection kernel as the ``D x (H dk)`` matrix W of eq. (2)."""
  k = np.asarray(kernel, np.float64)
  return k.reshape(k.shape[0], -1)


def _np_sa(q, k, v, wq, wk, wv, key_valid, heads):
  """Eq. (2) for one example: softmax(q Wq (k Wk)^T / sqrt(d_k)) v Wv."""
  qq, kk, vv = q @ wq, k @ wk, v @ wv
  dk = qq.shape[1] // heads
  out = np.zeros((q.shape[0], qq.shape[1]))
  for head in range(heads):
    cols = slice(head * dk, (head + 1) * dk)
    scores = qq[:, cols] @ kk[:, cols].T / np.sqrt(dk)
    if not key_valid.any():
      continue  # Nothing to attend to: the term is absent.
    scores = scores[:, key_valid]
    scores = scores - scores.max(axis=1, keepdims=True)
    attn = np.exp(scores)
    attn /= attn.sum(axis=1, keepdims=True)
    out[:, cols] = attn @ vv[key_valid][:, cols]
  return out


def _np_fusion(params, h, v, text_mask, present, *, heads, gate, pool):
  """Eqs. (1), (3) and the sum of (4), example by example, in float64."""
  h = h.astype(np.float64)
  v = v.astype(np.float64)
  sa_self, sa_cross = params["self_attn"], params["cross_attn"]
  pooled, h_primes = [], []
  for b in range(h.shape[0]):
    valid = text_mask[b] > 0
    self_term = _np_sa(h[b], h[b], h[b], _matrix(sa_self["query"]["kernel"]),
                       _matrix(sa_self["key"]["kernel"]),
                       _matrix(sa_self["value"]["kernel"]), valid, heads)
    h_prime = self_term
    if present[b]:
      cross = _np_sa(h[b], v[b], v[b], _matrix(sa_cross["query"]["kernel"]),
                     _matrix(sa_cross["key"]["kernel"]),
                     _matrix(sa_cross["value"]["kernel"]),
                     np.ones(v.shape[1], bool), heads)
      if gate:
        w1 = np.asarray(params["gate_text"]["kernel"], np.float64)
        bias = np.asarray(params["gate_text"]["bias"], np.float64)
        w2 = np.asarray(params["gate_image"]["kernel"], np.float64)
        vg = 1.0 / (1.0 + np.exp(-(h[b] @ w1 + v[b, 0] @ w2 + bias)))
        cross = vg * cross
      h_prime = h_prime + cross
    total = h_prime[valid].sum(axis=0)
    if pool == "mean":
      total = total / max(valid.sum(), 1)
    pooled.append(total)
    h_primes.append(h_prime)
  return np.stack(pooled), np.stack(h_primes)


@pytest.mark.parametrize("heads,gate,pool", [
    (1, True, "sum"), (1, False, "sum"), (4, True, "sum"), (4, False, "sum"),
    (2, True, "mean")])
def test_cross_modal_matches_numpy_equations(heads, gate, pool):
  h, v, text_mask, present = _inputs()
  model = fusion.CrossModalAttention(heads=heads, gate=gate, pool=pool)
  params = _params(model, h, v, text_mask, present)
  got, state = model.apply({"params": params}, h, v, text_mask, present,
                           mutable=["intermediates"])
  want, want_h_prime = _np_fusion(params, h, v, text_mask, present,
                                  heads=heads, gate=gate, pool=pool)
  assert got.shape == (B, DT) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
  h_prime = np.asarray(state["intermediates"]["h_prime"][0])
  valid = text_mask > 0
  np.testing.assert_allclose(h_prime[valid], want_h_prime[valid], atol=TOL,
                             rtol=0)


def test_eq4_logits_with_the_head():
  """``softmax(W_3 Σ h'_i)``: the head without bias is exactly ``W_3``."""
  h, v, text_mask, present = _inputs(seed=3)
  model = fusion.CrossModalAttention(heads=2)
  params = _params(model, h, v, text_mask, present)
  pooled = model.apply({"params": params}, h, v, text_mask, present)
  head = fusion.ClassifierHead(num_classes=6, use_bias=False)
  w3 = np.random.default_rng(4).standard_normal((DT, 6)).astype(np.float32)
  logits = head.apply({"params": {"output": {"kernel": w3}}}, pooled)
  want_pooled, _ = _np_fusion(params, h, v, text_mask, present, heads=2,
                              gate=True, pool="sum")
  want = want_pooled @ w3.astype(np.float64)
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-6)
  probs = jax.nn.softmax(logits)
  want_p = np.exp(want - want.max(1, keepdims=True))
  want_p /= want_p.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(probs), want_p, atol=1e-5)


@pytest.mark.parametrize("gate", [True, False])
def test_no_image_is_exactly_the_text_path(gate):
  """A photo-less product ignores its placeholder image completely."""
  h, v, text_mask, present = _inputs(seed=5)
  model = fusion.CrossModalAttention(heads=2, gate=gate)
  params = _params(model, h, v, text_mask, present)
  run = lambda v_: model.apply({"params": params}, h, v_, text_mask, present,
                               mutable=["intermediates"])
  out, state = run(v)
  garbage = v.copy()
  garbage[present == 0] = 1e4 * np.random.default_rng(6).standard_normal(
      garbage[present == 0].shape)
  out_garbage, _ = run(garbage)
  absent = present == 0
  # Bit-identical: the image contributes exactly nothing.
  np.testing.assert_array_equal(np.asarray(out)[absent],
                                np.asarray(out_garbage)[absent])
  assert np.all(np.asarray(state["intermediates"]["gate"][0])[absent] == 0)
  # And it equals Σ SA(h, h, h) over real tokens, computed independently.
  p = params["self_attn"]
  for b in np.flatnonzero(absent):
    valid = text_mask[b] > 0
    want = _np_sa(h[b].astype(np.float64), h[b], h[b],
                  _matrix(p["query"]["kernel"]), _matrix(p["key"]["kernel"]),
                  _matrix(p["value"]["kernel"]), valid, 2)[valid].sum(0)
    np.testing.assert_allclose(np.asarray(out)[b], want, atol=TOL, rtol=0)
  assert np.isfinite(np.asarray(out)).all()


def test_gradients_are_finite_with_masked_rows():
  """All-masked rows (no photo, even an empty title) give finite gradients."""
  h, v, text_mask, present = _inputs(seed=7)
  text_mask[3] = 0  # A fully padded title, the worst case.
  model = fusion.CrossModalAttention(heads=4, dropout=0.1)
  params = _params(model, h, v, text_mask, present)

  def loss(params, h, v):
    out = model.apply({"params": params}, h, v, text_mask, present,
                      train=True, rngs={"dropout": jax.random.key(0)})
    return jnp.sum(out ** 2)

  value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(params, h, v)
  assert np.isfinite(float(value))
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  grad_v = np.asarray(grads[2])
  assert np.all(grad_v[present == 0] == 0)  # No signal reaches a fake image.
  assert np.abs(grad_v[present == 1]).sum() > 0
  assert np.all(np.asarray(grads[1])[3] == 0)


def test_masked_softmax():
  logits = jnp.array([[1.0, 2.0, 3.0], [5.0, -1e30, 0.0], [1.0, 1.0, 1.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 1], [0, 0, 0]])
  got = np.asarray(attention.masked_softmax(logits, mask))
  np.testing.assert_allclose(got[0], jax.nn.softmax(logits[0]), atol=1e-7)
  pair = np.exp([5.0, 0.0]) / np.exp([5.0, 0.0]).sum()
  np.testing.assert_allclose(got[1], [pair[0], 0.0, pair[1]], atol=1e-7)
  assert np.all(got[2] == 0)


def test_stats_dropout_and_bf16():
  h, v, text_mask, present = _inputs(seed=8)
  model = fusion.CrossModalAttention(heads=2, return_stats=True, dropout=0.5)
  params = _params(model, h, v, text_mask, present)
  out, stats = model.apply({"params": params}, h, v, text_mask, present)
  assert 0.0 < float(stats["gate_mean"]) < 1.0
  again, _ = model.apply({"params": params}, h, v, text_mask, present)
  np.testing.assert_array_equal(out, again)  # train=False: no dropout.
  dropped, _ = model.apply({"params": params}, h, v, text_mask, present,
                           train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(out, dropped)
  bf16 = fusion.CrossModalAttention(heads=2, dtype=jnp.bfloat16)
  low = bf16.apply({"params": params}, h, v, text_mask, present)
  assert low.dtype == jnp.bfloat16
  scale = np.abs(np.asarray(out)).max()
  np.testing.assert_allclose(np.asarray(low, np.float32), out,
                             atol=0.05 * scale)


def test_options_and_errors():
  h, v, text_mask, present = _inputs()
  model = fusion.CrossModalAttention(heads=2, out_proj=True, qkv_bias=True)
  params = nn.meta.unbox(model.init(jax.random.key(0), h, v, text_mask,
                                    present)["params"])
  assert set(params["cross_attn"]) == {"query", "key", "value", "out"}
  assert params["cross_attn"]["key"]["kernel"].shape == (DV, DT)
  with pytest.raises(ValueError, match="divisible"):
    fusion.CrossModalAttention(heads=3).init(jax.random.key(0), h, v)
  with pytest.raises(ValueError, match="pool"):
    fusion.CrossModalAttention(pool="max").init(jax.random.key(0), h, v)


def test_early_fusion_missing_image_uses_the_flag():
  rng = np.random.default_rng(9)
  t = rng.standard_normal((4, DT)).astype(np.float32)
  im = rng.standard_normal((4, DV)).astype(np.float32)
  present = np.array([1, 0, 1, 0], np.int32)
  model = fusion.EarlyFusion(mlp_dim=8)
  variables = model.init(jax.random.key(0), t, im, present)
  kernel = nn.meta.unbox(variables["params"])["hidden"]["kernel"]
  assert kernel.shape == (DT + DV + 1, 8)
  out = model.apply(variables, t, im, present)
  out2 = model.apply(variables, t, im * 100, present)
  np.testing.assert_array_equal(np.asarray(out)[present == 0],
                                np.asarray(out2)[present == 0])
  assert not np.allclose(np.asarray(out)[present == 1],
                         np.asarray(out2)[present == 1])
  flat = fusion.EarlyFusion(mlp_dim=0).apply({}, t, im, present)
  np.testing.assert_array_equal(np.asarray(flat)[:, -1], present)


def test_classifier_head_starts_near_uniform():
  head = fusion.ClassifierHead(num_classes=5, mlp_dim=8, dtype=jnp.bfloat16)
  x = jnp.ones((3, DT))
  variables = head.init(jax.random.key(0), x)
  logits = head.apply(variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (3, 5)
  kernel = np.asarray(nn.meta.unbox(variables)["params"]["output"]["kernel"])
  assert abs(kernel.std() - fusion.HEAD_INIT_STD) < 0.01
  # Small but not all equal: the towers get a gradient from the first step.
  assert 0 < np.abs(np.asarray(logits)).max() < 0.5


@pytest.mark.needs_8_devices
def test_sharded_on_a_tensor_parallel_mesh():
  """With 1 head (eq. 2) the projections still shard on "tensor"."""
  from mic_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  h, v, text_mask, present = _inputs()
  h = np.concatenate([h] * 2)[:8]
  v, text_mask, present = (np.concatenate([x] * 2)[:8]
                           for x in (v, text_mask, present))
  mesh = shd.make_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=2, tensor=2, rules=())))
  rules = shd.validate_rules(shd.DEFAULT_RULES)
  model = fusion.CrossModalAttention(heads=1)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), h, v,
                                            text_mask, present))["params"]
  shardings = shd.logical_shardings(boxed, mesh, rules)
  assert tuple(shardings["cross_attn"]["key"]["kernel"].spec) == (
      "fsdp", "tensor")
  params = _params(model, h, v, text_mask, present)
  want = model.apply({"params": params}, h, v, text_mask, present)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = jax.jit(lambda p: model.apply({"params": p}, h, v, text_mask,
                                        present))(
                                            jax.device_put(params, shardings))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL)


def test_image_to_output_appends_the_normalized_photo_token():
  """``image_to_output``: [eq. 4's pooled h', LayerNorm(v_0)], the token
  zeroed for a product without a photo; the first block is unchanged."""
  h, v, text_mask, present = _inputs(seed=7)
  plain = fusion.CrossModalAttention(heads=2)
  params = _params(plain, h, v, text_mask, present)
  wide = fusion.CrossModalAttention(heads=2, image_to_output=True)
  wide_params = _params(wide, h, v, text_mask, present)
  assert set(wide_params) == set(params) | {"image_norm"}
  wide_params = {**params, "image_norm": wide_params["image_norm"]}
  out = np.asarray(plain.apply({"params": params}, h, v, text_mask, present))
  both = np.asarray(wide.apply({"params": wide_params}, h, v, text_mask,
                               present))
  width = h.shape[-1]
  assert both.shape == (h.shape[0], width + v.shape[-1])
  np.testing.assert_array_equal(both[:, :width], out)
  cls = v[:, 0].astype(np.float64)
  normed = (cls - cls.mean(-1, keepdims=True)) / np.sqrt(
      cls.var(-1, keepdims=True) + 1e-6)
  norm = wide_params["image_norm"]  # Its bias was randomised by _params.
  want = (normed * np.asarray(norm["scale"]) + np.asarray(norm["bias"])) * (
      present > 0)[:, None]
  np.testing.assert_allclose(both[:, width:], want, atol=1e-5, rtol=0)
  assert not np.any(both[present == 0, width:])
