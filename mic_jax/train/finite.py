"""Is a train state finite, and if not, where: the guard before every save.

The train step reports :func:`all_finite` of the *updated* parameters and
optimizer state as a metric (one fused reduction, no host sync), so the
loop can refuse to save or evaluate a state an update has broken (a NaN
learning rate, an inf gradient through clipping) even when the loss, which
is computed before the update, is still finite. :func:`nonfinite_paths`
runs only after a failure, to say which leaves went wrong.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mic_jax.train import optimizer


def all_finite(tree: Any) -> jnp.ndarray:
  """A scalar bool: every element of every floating leaf is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def nonfinite_paths(tree: Any) -> list[str]:
  """Slash-joined paths of the floating leaves holding a NaN or an inf."""
  flags = jax.jit(lambda t: jax.tree.map(
      lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(
          x.dtype, jnp.inexact) else jnp.bool_(True), t))(tree)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(flags))[0]
  return [optimizer.path_of(path) for path, ok in flat if not np.all(ok)]


def describe(state: Any, limit: int = 5) -> str:
  """Which trees of a TrainState went non-finite and their first paths."""
  parts = []
  for name in ("params", "opt_state"):
    bad = nonfinite_paths(getattr(state, name))
    if bad:
      shown = ", ".join(bad[:limit]) + (f", ... ({len(bad)} leaves)"
                                        if len(bad) > limit else "")
      parts.append(f"{name}: {shown}")
  return "; ".join(parts) or "no non-finite leaf found in the current state"
