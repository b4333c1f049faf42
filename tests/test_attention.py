"""jax.nn.dot_product_attention ("xla") against the written-out einsum path.

Same parameters, same inputs, float32 on the CPU: BERT with padding, ViT,
and the cross-modal fusion with a withheld photo (an all-masked cross
attention row). Forward values agree within 1e-5 (relative where a value
exceeds 1); gradients within 1e-4 (the kernels sum in another order: the
largest gradient difference measured was 1.5e-5 relative, ViT).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mic_jax.layers import attention
from mic_jax.models import bert
from mic_jax.models import classifier
from mic_jax.models import fusion
from mic_jax.models import vit

TOL = 1e-5
GRAD_TOL = 1e-4


def _max_diff(a, b):
  """Largest difference, relative where values exceed 1 in magnitude."""
  return max(float(jnp.max(jnp.abs(x - y) / jnp.maximum(1.0, jnp.abs(x))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_bert_with_padding_same_as_einsum():
  cfg = bert.get_bert_config("tiny", vocab_size=100)
  ids = jax.random.randint(jax.random.key(0), (3, 12), 1, 100)
  mask = jnp.array([[1] * 12, [1] * 7 + [0] * 5, [1] * 2 + [0] * 10])
  ref = bert.BertEncoder(cfg)
  fused = bert.BertEncoder(dataclasses.replace(cfg, attention_impl="xla"))
  params = ref.init(jax.random.key(1), ids, mask)

  def loss(model, p):
    seq, pooled = model.apply(p, ids, mask)
    return jnp.sum(seq * mask[..., None] * jnp.sin(seq)) + jnp.sum(pooled)

  seq_a, pooled_a = ref.apply(params, ids, mask)
  seq_b, pooled_b = fused.apply(params, ids, mask)
  assert _max_diff((seq_a, pooled_a), (seq_b, pooled_b)) < TOL
  grads = [jax.grad(lambda p, m=m: loss(m, p))(params) for m in (ref, fused)]
  assert _max_diff(*grads) < GRAD_TOL
  # Training with attention dropout (tiny BERT's 0.1): the fused kernels have
  # none, so the einsum path runs, bit for bit the same model.
  rngs = {"dropout": jax.random.key(3)}
  train_a = ref.apply(params, ids, mask, train=True, rngs=rngs)
  train_b = fused.apply(params, ids, mask, train=True, rngs=rngs)
  assert cfg.attention_probs_dropout_prob > 0
  assert _max_diff(train_a, train_b) == 0


def test_vit_same_as_einsum():
  cfg = vit.vit_config("tiny")
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.)
  ref = vit.VisionTransformer(cfg)
  fused = vit.VisionTransformer(dataclasses.replace(cfg, attention_impl="xla"))
  params = ref.init(jax.random.key(1), images)
  assert _max_diff(ref.apply(params, images),
                   fused.apply(params, images)) < TOL
  grads = [jax.grad(lambda p, m=m: jnp.sum(jnp.tanh(m.apply(p, images))))(
      params) for m in (ref, fused)]
  assert _max_diff(*grads) < GRAD_TOL


def test_fusion_with_withheld_photo_same_as_einsum():
  """Eqs. (1)-(4) with 2 heads, text padding and a photo-less product: the
  all-masked cross-attention row is exact zeros on both paths, so that
  product's h' is the text-only SA(h, h, h)."""
  h = jax.random.normal(jax.random.key(0), (3, 6, 16))
  v = jax.random.normal(jax.random.key(1), (3, 5, 24))
  text_mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3])
  present = jnp.array([1, 0, 1])
  ref = fusion.CrossModalAttention(heads=2)
  fused = fusion.CrossModalAttention(heads=2, attention_impl="xla")
  params = ref.init(jax.random.key(2), h, v, text_mask, present)

  def run(model, p, hh, vv):
    out, inter = model.apply(p, hh, vv, text_mask, present,
                             mutable="intermediates")
    return out, inter["intermediates"]["h_prime"][0]

  out_a, hp_a = run(ref, params, h, v)
  out_b, hp_b = run(fused, params, h, v)
  assert _max_diff((out_a, hp_a), (out_b, hp_b)) < TOL
  # The photo-less row is the self-attention term alone, on both paths.
  self_only = fusion.Attention(out_features=16, heads=2,
                               attention_impl="xla").apply(
                                   {"params": params["params"]["self_attn"]},
                                   h, h, text_mask)
  np.testing.assert_allclose(hp_b[1], self_only[1], atol=TOL)
  grads = [jax.grad(lambda p, hh, vv, m=m: jnp.sum(
      jnp.tanh(run(m, p, hh, vv)[0])), argnums=(0, 1, 2))(params, h, v)
           for m in (ref, fused)]
  assert _max_diff(*grads) < GRAD_TOL
  # No gradient reaches the withheld photo's tokens.
  assert float(jnp.max(jnp.abs(grads[1][2][1]))) == 0.0


def test_cross_modal_classifier_follows_the_config():
  def build(impl):
    config = common.make_config("cross_modal", "demo")
    with config.unlocked():
      config.num_classes = 5
      config.model.attention_impl = impl
    return classifier.build_model(config)

  ref, fused = build("einsum"), build("xla")
  assert fused.txt.config.attention_impl == "xla"
  assert fused.img.config.attention_impl == "xla"
  assert fused.attention_impl == "xla"
  batch = {
      "input_ids": jax.random.randint(jax.random.key(0), (2, 16), 1, 50),
      "attention_mask": jnp.array([[1] * 16, [1] * 5 + [0] * 11]),
      "token_type_ids": jnp.zeros((2, 16), jnp.int32),
      "image": jax.random.uniform(jax.random.key(1), (2, 32, 32, 3)),
      "image_present": jnp.array([1, 0]),
  }
  params = ref.init(jax.random.key(2), batch)
  assert _max_diff(ref.apply(params, batch)[0],
                   fused.apply(params, batch)[0]) < TOL
  # Training: BERT's and the fusion's attention dropout (0.1) keep them on
  # the einsum path, ViT's (0.0) does not; same dropout masks elsewhere.
  rngs = {"dropout": jax.random.key(3)}
  assert _max_diff(ref.apply(params, batch, train=True, rngs=rngs)[0],
                   fused.apply(params, batch, train=True, rngs=rngs)[0]) < TOL


def test_unknown_implementation_is_rejected_by_name():
  config = common.make_config("text_only", "demo")
  with config.unlocked():
    config.num_classes = 3
    config.model.attention_impl = "flash"
  with pytest.raises(ValueError, match="config.model.attention_impl"):
    classifier.build_model(config)
  with pytest.raises(ValueError, match="attention_impl"):
    attention.check_implementation("cuda")
