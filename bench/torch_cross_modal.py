"""The cross-modal model as a PyTorch user would write it (bench only).

`bench_train.py` times our cross-modal train step against this: Hugging
Face ``BertModel`` and ``ViTModel`` towers at the ``:small`` sizes, the
gated cross-modal attention of the paper's eqs. (1)-(4) as a
``torch.nn.Module``, a linear head without bias (eq. 4), cross-entropy,
``torch.optim.AdamW`` and gradient clipping, like our trainer. It is not
part of mic_jax: nothing imports it but the benchmark.

The fusion follows the paper, not our code: one head, no biases on
``W_Q, W_K, W_V``, no output projection, an element-wise visual gate
``VG_i = sigmoid(W_1 h_i + W_2 v_0 + b)``, padding keys masked, and the
sum of ``h'`` over the real title tokens.

``image_tower=False`` is the frozen-tower recipe on cached photo tokens:
no ``ViTModel`` is built, and ``forward`` takes the tower's output tokens
``image_tokens [B, T, D]`` (class token first) in place of
``pixel_values``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# Our ViT activation names -> Hugging Face's.
_HF_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu_exact": "gelu"}


class SelfAttention(nn.Module):
  """``SA(q, k, v) = softmax((W_Q q)(W_K k)^T / sqrt(d_k)) W_V v`` (eq. 2)."""

  def __init__(self, query_dim: int, key_dim: int, dropout: float):
    super().__init__()
    self.query = nn.Linear(query_dim, query_dim, bias=False)
    self.key = nn.Linear(key_dim, query_dim, bias=False)
    self.value = nn.Linear(key_dim, query_dim, bias=False)
    self.dropout = nn.Dropout(dropout)

  def forward(self, q: torch.Tensor, kv: torch.Tensor,
              key_mask: torch.Tensor) -> torch.Tensor:
    logits = self.query(q) @ self.key(kv).transpose(1, 2)
    logits = logits / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return self.dropout(torch.softmax(logits, dim=-1)) @ self.value(kv)


class GatedCrossModalFusion(nn.Module):
  """Eqs. (1), (3) and the sum of (4): ``Σ_i SA(h,h,h)_i + VG_i ⊙ SA(h,v,v)_i``."""

  def __init__(self, text_dim: int, image_dim: int, dropout: float):
    super().__init__()
    self.self_attn = SelfAttention(text_dim, text_dim, dropout)
    self.cross_attn = SelfAttention(text_dim, image_dim, dropout)
    self.gate_text = nn.Linear(text_dim, text_dim, bias=True)
    self.gate_image = nn.Linear(image_dim, text_dim, bias=False)

  def forward(self, h: torch.Tensor, v: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
    image_mask = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)
    gate = torch.sigmoid(self.gate_text(h) + self.gate_image(v[:, 0])[:, None])
    fused = (self.self_attn(h, h, text_mask)
             + gate * self.cross_attn(h, v, image_mask))
    return (fused * text_mask[..., None]).sum(1)


class CrossModalClassifier(nn.Module):
  """BERT + ViT towers, gated cross-modal fusion, linear head (eq. 4)."""

  def __init__(self, text_dir: str, image: dict[str, Any], num_classes: int,
               fusion_dropout: float, head_dropout: float,
               image_tower: bool = True):
    super().__init__()
    import transformers  # pylint: disable=g-import-not-at-top
    self.text = transformers.BertModel.from_pretrained(
        text_dir, add_pooling_layer=False)
    self.image = None if not image_tower else transformers.ViTModel(transformers.ViTConfig(
        hidden_size=image["width"], num_hidden_layers=image["depth"],
        num_attention_heads=image["num_heads"],
        intermediate_size=image["mlp_dim"], image_size=image["size"],
        patch_size=image["patch_size"], layer_norm_eps=1e-6,
        hidden_act=_HF_ACTIVATIONS[image["activation"]], qkv_bias=True),
        add_pooling_layer=False)
    text_dim = self.text.config.hidden_size
    self.fusion = GatedCrossModalFusion(text_dim, image["width"],
                                        fusion_dropout)
    self.dropout = nn.Dropout(head_dropout)
    self.head = nn.Linear(text_dim, num_classes, bias=False)

  def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor,
              pixel_values: torch.Tensor | None = None,
              image_tokens: torch.Tensor | None = None) -> torch.Tensor:
    h = self.text(input_ids=input_ids, attention_mask=attention_mask,
                  token_type_ids=token_type_ids).last_hidden_state
    if image_tokens is not None:  # Cached: the tower does not run.
      v = image_tokens
    else:
      v = self.image(pixel_values=pixel_values).last_hidden_state
    fused = self.fusion(h, v, attention_mask.bool())
    return self.head(self.dropout(fused))
