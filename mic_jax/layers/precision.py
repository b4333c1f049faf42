"""Dense-layer matmuls that accumulate in float32 at a low compute dtype.

Why: a ``bf16 x bf16 -> bf16`` dot runs on XLA:CPU at the float32 rate (the
operands are widened first), while ``bf16 x bf16 -> f32`` uses the CPU's
bf16 dot-product instructions (AVX512_BF16, AMX) where it has them: on the
AMD EPYC of ``bench/README.md`` 383-430 GFLOP/s at the ``small`` preset's
shapes against ~200 for either of the others. TPUs and GPUs accumulate bf16
products in float32 anyway, so asking for it explicitly changes only where
the result is rounded to bf16 (once, after the sum).

Autodiff of ``dot_general(..., preferred_element_type=f32)`` would not keep
the gain: the cotangent of the f32 product is f32, and the backward matmuls
become ``f32 x bf16`` dots at the float32 rate. :func:`_matmul` has its own
VJP whose three matmuls (forward, input and kernel gradients) are all
``bf16 x bf16 -> f32``, rounded back to the compute dtype.

At float32 compute nothing changes: :func:`dense_dot_general` returns None,
Flax's own ``lax.dot_general``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp

DotGeneral = Callable[..., jnp.ndarray]


@jax.custom_vjp
def _matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """``x [..., K] @ w [K, N]`` accumulated in float32, in ``x.dtype``."""
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _matmul_fwd(x, w):
  return _matmul(x, w), (x, w)


def _matmul_bwd(residuals, grad):
  x, w = residuals
  grad = grad.astype(x.dtype)
  dx = jnp.dot(grad, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, grad.reshape(-1, grad.shape[-1]),
               preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def f32_accumulating_dot_general(lhs: jnp.ndarray, rhs: jnp.ndarray,
                                 dimension_numbers: Any,
                                 precision: Any = None,
                                 preferred_element_type: Any = None
                                 ) -> jnp.ndarray:
  """A ``lax.dot_general`` for ``nn.Dense``'s ``dot_general`` field.

  ``nn.Dense`` contracts the last input axis with the kernel's first, which
  goes through :func:`_matmul`; any other contraction is accumulated in f32
  in the forward pass only (autodiff then as usual).
  """
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  is_dense = (tuple(lhs_contract) == (lhs.ndim - 1,)
              and tuple(rhs_contract) == (0,) and not tuple(lhs_batch)
              and not tuple(rhs_batch) and rhs.ndim == 2)
  if is_dense and lhs.dtype == rhs.dtype and precision is None:
    return _matmul(lhs, rhs).astype(out_dtype)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=jnp.float32).astype(out_dtype)


def dense_dot_general(dtype: Any) -> DotGeneral | None:
  """``nn.Dense(dot_general=...)`` for compute ``dtype``: None at float32."""
  if jnp.dtype(dtype) == jnp.float32:
    return None
  return f32_accumulating_dot_general
