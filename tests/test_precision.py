"""f32-accumulating dense matmuls (mic_jax.layers.precision).

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

from mic_jax.layers import precision


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



def _eqns(jaxpr):
  """Every equation of ``jaxpr``, those of nested jaxprs included."""
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, core.Jaxpr):
          yield from _eqns(sub)


def _traced_train_step(dtype: str):
  """(jaxpr of the demo cross-modal model's gradient, its parameters)."""
  # pylint: disable=g-import-not-at-top
  from configs import common
  from mic_jax.checkpoints import architecture
  from mic_jax.models import classifier
  # pylint: enable=g-import-not-at-top
  config = common.make_config("cross_modal", "demo")
  with config.unlocked():
    config.num_classes = 5
    config.dtype = dtype
  spec = classifier.build(architecture.resolve(config))

  def loss(params):
    logits, _ = spec.model.apply({"params": params}, spec.example_batch,
                                 train=True,
                                 rngs={"dropout": jax.random.key(0)})
    return logits.sum()

  params = spec.abstract_params
  return jax.make_jaxpr(jax.grad(loss))(params).jaxpr, params


def test_bf16_models_accumulate_every_dense_matmul_in_float32():
  """BERT, ViT, fusion and head: each dense kernel's forward matmul and its
  two gradient matmuls take bf16 operands and accumulate in float32."""
  jaxpr, params = _traced_train_step("bfloat16")
  dots = [e for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]
  accumulated = [e for e in dots
                 if e.params.get("preferred_element_type") == jnp.float32
                 and all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  dense_kernels = [
      leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
      if jax.tree_util.keystr(path).endswith("['kernel']")
      and leaf.ndim in (2, 3)]  # Not the 4-D patch convolution.
  assert len(dense_kernels) > 20
  assert len(accumulated) >= 3 * len(dense_kernels), (
      len(accumulated), len(dense_kernels))


def test_float32_models_keep_plain_dots():
  jaxpr, _ = _traced_train_step("float32")
  dots = [e for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]
  assert dots and all(v.aval.dtype == jnp.float32
                      for e in dots for v in e.invars)
