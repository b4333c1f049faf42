"""The jitted train and eval steps, and the state they update.

The loss is a weighted softmax cross-entropy, or the focal loss
(``config.loss.kind``): per-example weights are the batch ``mask`` (0 for
padding) times an optional class weight. Gradient accumulation splits the
global batch into ``grad_accum_steps`` micro-batches and normalises by the
*whole* batch's weight, so accumulating is exactly a larger batch (up to
float summation order).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = dict[str, jnp.ndarray]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to resume bit for bit."""
  step: jnp.ndarray
  params: Any
  opt_state: Any


def class_weights(counts: np.ndarray, mode: str) -> np.ndarray:
  """Per-class loss weights from training counts, mean 1 over the classes.

  ``inverse`` weighs a class by 1/count, ``inverse_sqrt`` by 1/sqrt(count);
  classes with no training examples get weight 0.
  """
  counts = np.asarray(counts, np.float64)
  if mode == "none":
    return np.ones_like(counts, np.float32)
  power = {"inverse": 1.0, "inverse_sqrt": 0.5}.get(mode)
  if power is None:
    raise ValueError(f"loss.class_weighting must be none, inverse or "
                     f"inverse_sqrt, got {mode!r}")
  w = np.where(counts > 0, 1.0 / np.maximum(counts, 1) ** power, 0.0)
  present = counts > 0
  w[present] /= w[present].mean()
  return w.astype(np.float32)


def weighted_xent(logits: jnp.ndarray, labels: jnp.ndarray,
                  weights: jnp.ndarray, label_smoothing: float
                  ) -> jnp.ndarray:
  """Sum over the batch of weight * smoothed cross-entropy (float32)."""
  num_classes = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  target = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    target = target * (1 - label_smoothing) + label_smoothing / num_classes
  return jnp.sum(-jnp.sum(target * logp, axis=-1) * weights)


LOSS_KINDS = ("xent", "focal")


def weighted_focal(logits: jnp.ndarray, labels: jnp.ndarray,
                   weights: jnp.ndarray, label_smoothing: float, gamma: float
                   ) -> jnp.ndarray:
  """Sum over the batch of weight * focal loss (Lin et al., 2017; float32).

  ``FL = -sum_c q_c (1 - p_c)^gamma log p_c`` with ``q`` the (smoothed)
  target of :func:`weighted_xent`: without smoothing it is the usual
  ``-(1 - p_y)^gamma log p_y``; with smoothing each class's share of the
  target is down-weighted by how well that class is already predicted.
  ``gamma = 0`` is exactly the cross-entropy; class weights multiply the
  per-example loss as they do for the cross-entropy.
  """
  num_classes = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  target = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    target = target * (1 - label_smoothing) + label_smoothing / num_classes
  # 1 - p as -expm1(log p): exact for p near 1; floored so that the power's
  # gradient stays finite for gamma < 1 when p rounds to exactly 1.
  one_minus_p = jnp.maximum(-jnp.expm1(logp), jnp.finfo(jnp.float32).tiny)
  modulation = one_minus_p ** gamma if gamma else 1.0
  return jnp.sum(-jnp.sum(target * modulation * logp, axis=-1) * weights)


def weighted_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                  weights: jnp.ndarray, label_smoothing: float,
                  kind: str = "xent", focal_gamma: float = 2.0
                  ) -> jnp.ndarray:
  """``config.loss.kind``: "xent" (:func:`weighted_xent`) or "focal"."""
  if kind == "xent":
    return weighted_xent(logits, labels, weights, label_smoothing)
  if kind == "focal":
    return weighted_focal(logits, labels, weights, label_smoothing,
                          focal_gamma)
  raise ValueError(f"config.loss.kind must be one of {LOSS_KINDS}, got "
                   f"{kind!r}")


# Streams of random bits for image and title dropout, separate from model
# dropout's (which uses the step key itself) and from each other, so turning
# one on changes nothing else.
_PHOTO_DROP = 0x5EED
_TITLE_DROP = 0x717E


def withhold_photos(batch: Batch, key: jax.Array, rate: float) -> Batch:
  """``batch`` with each photo withheld (``image_present = 0``) w.p. ``rate``."""
  present = batch["image_present"]
  # Drawn flat: a packed batch's [R, S] slots get the draws of the padded
  # batch of the same products in slot order.
  keep = jax.random.bernoulli(key, 1.0 - rate, (present.size,)).reshape(
      present.shape)
  return {**batch, "image_present": jnp.where(keep, present,
                                              jnp.zeros_like(present))}


def withhold_titles(batch: Batch, key: jax.Array, rate: float) -> Batch:
  """``batch`` with the title withheld w.p. ``rate`` where a photo is present.

  A withheld title keeps only its first token (BERT's ``[CLS]``): the text
  tower then reads an empty title, and the fused model must classify from
  the photo. Only examples that still have a photo lose their title, so no
  example is left with neither.
  """
  mask = batch["attention_mask"]
  present = batch["image_present"]
  drop = jax.random.bernoulli(key, rate, (present.size,)).reshape(
      present.shape) & (present > 0)
  if "segment_ids" in batch:
    # Packed: products are slots [R, S]; each token reads its slot's draw
    # and a withheld title keeps its own first token.
    seg = batch["segment_ids"]
    slot = jnp.take_along_axis(drop, jnp.maximum(seg - 1, 0), axis=1)
    cut = slot & (seg > 0) & (batch["positions"] > 0)
    return {**batch, "attention_mask": jnp.where(cut, 0, mask).astype(
        mask.dtype)}
  first = (jnp.arange(mask.shape[1]) == 0)[None, :]
  return {**batch, "attention_mask": jnp.where(
      drop[:, None], first.astype(mask.dtype), mask)}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, seed: int,
                    grad_accum_steps: int, label_smoothing: float,
                    loss_class_weights: np.ndarray, loss_kind: str = "xent",
                    focal_gamma: float = 2.0, image_dropout: float = 0.0,
                    title_dropout: float = 0.0, aux_loss_weight: float = 0.0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Builds ``train_step(state, batch) -> (state, metrics)`` (not yet jitted).

  ``image_dropout`` withholds each training example's photo with that
  probability (``image_present`` set to 0, as for a product without one);
  ``title_dropout`` then withholds the title of each example that still has
  its photo with that probability (:func:`withhold_titles`). The draws are a
  pure function of (seed, step), so resume stays exact.

  ``aux_loss_weight`` adds that weight times the losses of the model's
  title-only and photo-only heads (``aux["text_logits"]``,
  ``aux["image_logits"]``; :class:`~mic_jax.models.classifier.
  MultimodalClassifier` ``aux_heads``) to the loss; the photo head's loss
  counts only products that still have their photo in the step.
  """
  if loss_kind not in LOSS_KINDS:
    raise ValueError(f"config.loss.kind must be one of {LOSS_KINDS}, got "
                     f"{loss_kind!r}")
  if not focal_gamma >= 0:
    raise ValueError(f"config.loss.focal_gamma must be >= 0, got "
                     f"{focal_gamma}")
  if not aux_loss_weight >= 0:
    raise ValueError(f"model.aux_loss_weight must be >= 0, got "
                     f"{aux_loss_weight}")
  for name, rate in (("image_dropout", image_dropout),
                     ("title_dropout", title_dropout)):
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f"model.{name} must be in [0, 1], got {rate}")
  weights_table = jnp.asarray(loss_class_weights)
  base_key = jax.random.key(seed)

  def train_step(state: TrainState, batch: Batch):
    step_key = jax.random.fold_in(base_key, state.step)
    if image_dropout > 0 and "image_present" in batch:
      batch = withhold_photos(batch, jax.random.fold_in(step_key, _PHOTO_DROP),
                              image_dropout)
    if title_dropout > 0 and "image_present" in batch:
      batch = withhold_titles(batch, jax.random.fold_in(step_key, _TITLE_DROP),
                              title_dropout)
    weights = batch["mask"] * weights_table[batch["label"]]
    total_weight = jnp.maximum(weights.sum(), 1e-9)

    def micro_loss(params, micro, key):
      logits, aux = model.apply({"params": params}, micro, train=True,
                                rngs={"dropout": key})
      w = micro["mask"] * weights_table[micro["label"]]
      loss = weighted_loss(logits, micro["label"], w, label_smoothing,
                           loss_kind, focal_gamma)
      if aux_loss_weight:
        with_photo = w * (micro["image_present"] > 0).astype(w.dtype)
        for name, weights in (("text_logits", w), ("image_logits",
                                                   with_photo)):
          loss += aux_loss_weight * weighted_loss(
              aux[name], micro["label"], weights, label_smoothing,
              loss_kind, focal_gamma)
      return loss / total_weight

    grad_fn = jax.value_and_grad(micro_loss)
    if grad_accum_steps == 1:
      loss, grads = grad_fn(state.params, batch, step_key)
    else:
      # Micro-batch j takes rows j, j + k, j + 2k, ... (k = grad_accum_steps),
      # so each device's contiguous block of the data-sharded batch feeds
      # every micro-batch equally and no rows move between devices.
      micro_batches = jax.tree.map(
          lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(
              0, 1), batch)

      def body(carry, inputs):
        loss_sum, grad_sum = carry
        micro, i = inputs
        loss, grads = grad_fn(state.params, micro,
                              jax.random.fold_in(step_key, i))
        return (loss_sum + loss,
                jax.tree.map(jnp.add, grad_sum, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), zeros),
          (micro_batches, jnp.arange(grad_accum_steps)))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss,
        "train/grad_norm": optax.tree.norm(grads),
        "train/learning_rate": schedule(state.step),
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module, *, log_probs: bool = False
                   ) -> Callable[[Any, Batch], jnp.ndarray]:
  """``eval_step(params, batch) -> probabilities [B, C]`` (float32).

  With ``log_probs`` it returns ``log_softmax`` instead: exact where a
  probability underflows to 0, and what temperature scaling needs.
  """

  def eval_step(params, batch):
    logits, _ = model.apply({"params": params}, batch, train=False)
    if log_probs:
      return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return eval_step
