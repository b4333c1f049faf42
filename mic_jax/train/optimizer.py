"""AdamW with warmup + decay, per-tower learning rates and frozen towers.

Parameter paths look like ``txt/encoder/layer_3/output/dense/kernel``; the
towers' stable top-level names (``txt``, ``img``, ``fusion``, ``head``) make
regexes such as ``txt`` or ``img/Transformer/encoderblock_(0|1)/`` enough to
freeze a tower or give it its own learning rate; ``optim.unfreeze`` keeps
some of what ``optim.freeze`` matches training (the top blocks of a frozen
photo tower, ``image.train_top_blocks``).

The chain is: zero the gradients of frozen parameters (so they do not count
in the global norm) -> clip by global norm -> one AdamW per learning-rate
group. Weight decay skips norms and biases (every parameter with fewer than
two dimensions, not counting the leading layer axis of a scanned layer
stack). Frozen parameters get no optimizer state at all.

With ``config.model.scan_layers`` the layers of a tower are one parameter
(``txt/encoder/layer/...``, ``img/Transformer/encoderblock/...``), so a
pattern can address all layers but not single ones.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import ml_collections
import optax

from mic_jax.checkpoints import layer_stacks

FROZEN = "frozen"


def path_of(key_path: tuple[Any, ...]) -> str:
  """``(DictKey('txt'), DictKey('pooler'), ...)`` -> ``"txt/pooler/..."``."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k)))
                  for k in key_path)


def tree_paths(params: Any) -> Any:
  """A tree like ``params`` whose leaves are their slash-joined paths."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_of(p), params)


def parse_multipliers(spec: str) -> list[tuple[re.Pattern[str], float]]:
  """``"txt=0.25,img/Transformer=0.5"`` -> ``[(regex, factor), ...]``."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    if "=" not in item:
      raise ValueError(f"optim.lr_multipliers: {item!r} is not PATTERN=FACTOR")
    pattern, factor = item.rsplit("=", 1)
    try:
      out.append((re.compile(pattern), float(factor)))
    except (re.error, ValueError) as e:
      raise ValueError(f"optim.lr_multipliers: bad entry {item!r} ({e})"
                       ) from e
  return out


def make_schedule(optim: ml_collections.ConfigDict,
                  total_steps: int) -> optax.Schedule:
  """Linear warmup to ``optim.lr``, then cosine / linear / constant decay."""
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  end = optim.lr * optim.end_lr_factor
  decay_steps = max(total_steps - warmup, 1)
  if optim.decay == "cosine":
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps,
                                        alpha=optim.end_lr_factor)
  elif optim.decay == "linear":
    decay = optax.linear_schedule(optim.lr, end, decay_steps)
  elif optim.decay == "constant":
    decay = optax.constant_schedule(optim.lr)
  else:
    raise ValueError(f"optim.decay must be cosine, linear or constant, got "
                     f"{optim.decay!r}")
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def group_labels(params: Any, optim: ml_collections.ConfigDict
                 ) -> tuple[Any, dict[str, float]]:
  """Labels each parameter with its learning-rate group (or ``frozen``).

  Returns:
    ``(labels tree, {label: lr multiplier})``.
  """
  freeze = re.compile(optim.freeze) if optim.freeze else None
  unfreeze = (re.compile(optim.unfreeze) if optim.get("unfreeze") else None)
  multipliers = parse_multipliers(optim.lr_multipliers)
  groups: dict[str, float] = {}

  def label(path: str) -> str:
    if (freeze is not None and freeze.match(path) and
        not (unfreeze is not None and unfreeze.match(path))):
      return FROZEN
    factor = next((f for r, f in multipliers if r.match(path)), 1.0)
    name = f"lr_x{factor:g}"
    groups[name] = factor
    return name

  labels = jax.tree.map(label, tree_paths(params))
  return labels, groups


def _layer_axes(path: tuple[Any, ...]) -> int:
  """1 for a weight of a scanned layer stack (its leading layer axis)."""
  keys = {getattr(entry, "key", None) for entry in path}
  return 1 if keys & set(layer_stacks.STACK_NAMES) else 0


def make_optimizer(optim: ml_collections.ConfigDict, params: Any,
                   total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for ``params`` (concrete or abstract) and its schedule."""
  schedule = make_schedule(optim, total_steps)
  labels, groups = group_labels(params, optim)
  frozen_mask = jax.tree.map(lambda l: l == FROZEN, labels)
  if all(jax.tree.leaves(frozen_mask)):
    raise ValueError(f"optim.freeze={optim.freeze!r} freezes every parameter")

  def decay_mask(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim - _layer_axes(path) > 1, tree)

  def adamw(factor: float) -> optax.GradientTransformation:
    scaled: Callable[[Any], Any] = lambda step: schedule(step) * factor
    return optax.adamw(scaled, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=decay_mask)

  transforms = {name: adamw(f) for name, f in groups.items()}
  transforms[FROZEN] = optax.set_to_zero()
  chain = [optax.masked(optax.set_to_zero(), frozen_mask)]
  if optim.clip_norm and optim.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim.clip_norm))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain), schedule
