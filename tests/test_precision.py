"""f32-accumulating dense matmuls (mic_jax.models.precision).

At float32 compute the models use Flax's own dot (nothing changes). At bf16
the custom-VJP matmul must give the gradients of ``x @ w`` computed in float32
from the same bf16 operands, to bf16 rounding: checked against NumPy in
float64 and against JAX's own autodiff.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mic_jax.models import precision


def test_float32_keeps_flax_dot():
  assert precision.dense_dot_general(jnp.float32) is None
  assert precision.dense_dot_general(jnp.bfloat16) is not None


def _bf16(rng, shape):
  return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)


def test_bf16_dense_forward_and_gradients_match_float64():
  rng = np.random.default_rng(0)
  x, w = _bf16(rng, (4, 8, 96)), _bf16(rng, (96, 48))
  cotangent = _bf16(rng, (4, 8, 48))
  dot = precision.f32_accumulating_dot_general
  dense = (((2,), (0,)), ((), ()))

  y, vjp = jax.vjp(lambda a, b: dot(a, b, dense), x, w)
  dx, dw = vjp(cotangent)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16

  x64, w64, g64 = (np.asarray(t, np.float64) for t in (x, w, cotangent))
  want_y = x64 @ w64
  want_dx = g64 @ w64.T
  want_dw = x64.reshape(-1, 96).T @ g64.reshape(-1, 48)
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
    # One rounding to bf16 (8 bits of mantissa) after an exact-ish sum.
    np.testing.assert_allclose(np.asarray(got, np.float64), want,
                               rtol=2**-7, atol=2**-7 * np.abs(want).max())


def test_bf16_dense_gradients_match_jax_autodiff():
  rng = np.random.default_rng(1)
  model = nn.Dense(32, dtype=jnp.bfloat16,
                   dot_general=precision.dense_dot_general(jnp.bfloat16))
  plain = nn.Dense(32, dtype=jnp.float32)
  x = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
  params = plain.init(jax.random.key(0), x)

  def loss(module, p):
    return jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))

  got = jax.grad(lambda p: loss(model, p))(params)
  # The reference: the same computation in float32 from bf16-rounded
  # operands, differentiated by JAX.
  rounded_x = x.astype(jnp.bfloat16).astype(jnp.float32)
  rounded = jax.tree.map(lambda t: t.astype(jnp.bfloat16).astype(jnp.float32),
                         params)
  want = jax.grad(lambda p: jnp.sum(jnp.sin(plain.apply(p, rounded_x))))(
      rounded)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.float32  # Gradients of the float32 parameters.
    np.testing.assert_allclose(g, w, rtol=0.05, atol=0.05 * np.abs(w).max())


def test_bf16_per_head_projections_match_float32():
  """ViT's HeadsDense (q/k/v: [D, heads, head_dim]; out: two axes in)."""
  from mic_jax.models import vit  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  for features, contract, x_shape in (((4, 8), 1, (2, 5, 32)),
                                      ((32,), 2, (2, 5, 4, 8))):
    axes = (None,) * (contract + len(features))
    kw = dict(features=features, contract=contract, kernel_axes=axes,
              bias_axes=(None,) * len(features))
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    params = vit.HeadsDense(**kw).init(jax.random.key(0), x)
    params = jax.tree.map(lambda t: t + 0.1, params)  # Non-zero bias.
    low = vit.HeadsDense(**kw, dtype=jnp.bfloat16)
    want = vit.HeadsDense(**kw).apply(params, x)

    def loss(p, module):
      return jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))

    got = low.apply(params, x)
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), want,
                               rtol=0.02, atol=0.02 * np.abs(want).max())
    grads = jax.grad(loss)(params, low)
    want_grads = jax.grad(loss)(params, vit.HeadsDense(**kw))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=0.1, atol=0.05 * np.abs(w).max())
