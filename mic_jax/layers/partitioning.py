"""Logical axis names shared by every model in mic_jax.

Every weight is created with a tuple of *logical* axis names (``"embed"``,
``"mlp"``, ...) and the main activations are constrained with logical names
too. A config maps logical names onto mesh axes (``data``, ``fsdp``,
``tensor``), so data parallelism, FSDP and tensor parallelism are all a
matter of configuration, never of model code.

The names are fixed here, in one place, so that the sharding rules in the
config can be checked against them: an unknown logical name in a rule is a
typo and is rejected.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

# Weight axes (convolution kernel height and width stay unnamed: never sharded).
VOCAB = "vocab"          # token-embedding rows
EMBED = "embed"          # model width (BERT hidden, ViT width)
MLP = "mlp"              # feed-forward inner width
HEADS = "heads"          # attention projections, heads * head_dim flattened
POSITIONS = "positions"  # position-embedding rows
TYPES = "types"          # token-type rows
CLASSES = "classes"      # classifier outputs
CONV_IN = "conv_in"      # convolution input channels (BiT, patch embedding)
CONV_OUT = "conv_out"    # convolution output channels
NORM = "norm"            # norm scales and biases
LAYERS = "layers"        # the leading layer axis of a scanned layer stack
# Activation axes.
BATCH = "batch"
LENGTH = "length"        # text or image token sequence
ACT_EMBED = "act_embed"  # activation feature axis
ACT_MLP = "act_mlp"
ACT_HEADS = "act_heads"

WEIGHT_AXES = (VOCAB, EMBED, MLP, HEADS, POSITIONS, TYPES, CLASSES, CONV_IN,
               CONV_OUT, NORM, LAYERS)
ACTIVATION_AXES = (BATCH, LENGTH, ACT_EMBED, ACT_MLP, ACT_HEADS)
ALL_AXES = WEIGHT_AXES + ACTIVATION_AXES

Initializer = Callable[..., Any]


def logical(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """Wraps an initializer so the created weight carries logical axis names."""
  for name in names:
    if name is not None and name not in ALL_AXES:
      raise ValueError(f"unknown logical axis name {name!r}; known: {ALL_AXES}")
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jnp.ndarray, names: Sequence[str | None]) -> jnp.ndarray:
  """Applies a logical sharding constraint to an activation.

  Outside a mesh context with rules this is a no-op, so single-device use
  needs no set-up.
  """
  return nn.with_logical_constraint(x, tuple(names))


def scan_layers(block: type[nn.Module], *, length: int, num_broadcast: int
                ) -> type[nn.Module]:
  """``block`` repeated ``length`` times under ``nn.scan``, weights stacked.

  XLA then compiles one block instead of ``length`` copies, which is what
  makes a 24-layer tower compile in seconds rather than minutes. Every
  weight gains a leading axis of size ``length`` named :data:`LAYERS`
  (unsharded by the default rules), each layer draws its own init and
  dropout keys, and the block's scope holds the stacked weights under the
  scan's own name (``layer``, ``encoderblock``). The block must return
  ``(carry, None)``; its ``num_broadcast`` arguments after the carry (the
  attention mask, ``train``) are the same for every layer.
  """
  return nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * num_broadcast,
      length=length,
      metadata_params={nn.PARTITION_NAME: LAYERS})
