"""The multimodal classifier: towers + fusion + head, built from a config.

One module covers the four end-to-end systems of the paper's Table 2 (late
fusion is two separately trained ``text_only`` / ``image_only`` models whose
probabilities are mixed afterwards, see :func:`mic_jax.evaluation.metrics.
choose_alpha`):

  kind          towers      fusion                      head input
  text_only     txt         -                           text [CLS]
  image_only    img         -                           image token 0
  early         txt, img    EarlyFusion (concat + MLP)  fusion output
  cross_modal   txt, img    CrossModalAttention         Σ_i h'_i

Sub-modules have stable names, ``txt`` (BERT), ``img`` (ViT or BiT),
``fusion`` and ``head``, so a regex over parameter paths can freeze a
tower, re-initialise the head or give a tower its own learning rate
(:func:`tower_patterns`). A tower a kind does not use is not built at all,
so it has no parameters, no optimizer state and no checkpoint entry.

"Text [CLS]" is BERT's pooled output (the tanh ``pooler`` over the [CLS]
state, what Hugging Face's sequence classifier fine-tunes) unless
``config.model.text_repr`` asks for the raw ``seq[:, 0]`` (``"cls"``) or the
mean of the real (unpadded) token states (``"mean"``). The paper uses [CLS];
``"mean"`` matters for checkpoints trained as sentence encoders with mean
pooling (all-MiniLM-L6-v2 is one), whose [CLS] state carries less.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mic_jax.layers import attention as attention_lib
from mic_jax.layers import packing as packing_lib
from mic_jax.models import bert as bert_lib
from mic_jax.models import fusion as fusion_lib

Batch = Mapping[str, jnp.ndarray]
KINDS = ("text_only", "image_only", "early", "cross_modal")
TOWERS = ("txt", "img", "fusion", "head")
TEXT_REPRS = ("pooler", "cls", "mean")
# The parameters of the auxiliary per-modality heads (``aux_heads``): trained,
# never served.
AUX_HEADS = ("aux_text_head", "aux_image_head")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}


def uses_text(kind: str) -> bool:
  return kind in ("text_only", "early", "cross_modal")


def uses_image(kind: str) -> bool:
  return kind in ("image_only", "early", "cross_modal")


def towers_of(kind: str) -> tuple[str, ...]:
  """The sub-module names a kind builds, e.g. ``("txt", "head")``."""
  _check_kind(kind)
  names = []
  if uses_text(kind):
    names.append("txt")
  if uses_image(kind):
    names.append("img")
  if kind in ("early", "cross_modal"):
    names.append("fusion")
  names.append("head")
  return tuple(names)


def tower_patterns(kind: str) -> dict[str, str]:
  """``{tower: regex}`` over ``/``-joined parameter paths, per built tower.

  E.g. ``{"txt": "txt/.*", "img": "img/.*", "head": "head/.*"}``; use them
  for ``optim.freeze`` or ``optim.lr_multipliers``, or to decide what a
  pretrained checkpoint must not overwrite.
  """
  return {name: f"{name}/.*" for name in towers_of(kind)}


def _check_kind(kind: str) -> None:
  if kind == "late":
    raise ValueError("late fusion is not one model: train a 'text_only' and "
                     "an 'image_only' model and mix their probabilities "
                     "(mic_jax.evaluation.metrics.choose_alpha)")
  if kind not in KINDS:
    raise ValueError(f"unknown model kind {kind!r}; known: {KINDS} (and "
                     "'late', built from two of them)")


class MultimodalClassifier(nn.Module):
  """Title + photo -> category logits, for every kind of :data:`KINDS`.

  Build it with :func:`build_model`; the towers are passed in as unbound
  modules and adopted under the names ``txt`` and ``img``.

  Attributes:
    kind: which system (see the module docstring).
    num_classes: number of categories.
    txt: the BERT text tower (``None`` for image_only).
    img: the image tower (``None`` for text_only); returns tokens
      ``[B, 1+N, D]`` with the global representation at index 0.
    fusion_heads, fusion_gate, fusion_dropout, fusion_pool: the
      cross-modal options (see :class:`fusion.CrossModalAttention`).
    mlp_dim: hidden width of the early-fusion MLP.
    head_dropout: dropout on the head's input.
    head_bias: bias on the output layer; eq. (4) has none, so
      :func:`build_model` turns it off for cross_modal.
    text_repr: "pooler", "cls" or "mean" (see the module docstring).
    image_to_head: cross_modal only, a documented deviation from eq. (4):
      the head reads ``[Σ_i h'_i, LayerNorm(v_0)]`` (the photo's global
      token next to the fused text state; zeros for a product without a
      photo) instead of ``Σ_i h'_i`` alone. In eq. (4) the photo reaches
      the classifier only through the gated cross-attention of the title
      tokens; a title that says little then lets little of the photo
      through (:class:`fusion.CrossModalAttention`, ``image_to_output``).
    aux_heads: fused kinds only: a title-only and a photo-only classifier
      on the towers' own vectors (``text_cls``, ``image_cls``), whose
      logits go to ``aux`` (``text_logits``, ``image_logits``) for the
      auxiliary losses of ``model.aux_loss_weight``
      (:func:`mic_jax.train.steps.make_train_step`): each tower is then
      also trained to classify on its own, so neither is left idle when
      the other is easier to fit (the remedy of gradient blending and of
      per-modality losses in the multimodal literature). The served model
      drops them (:data:`AUX_HEADS`; ``mic_jax.exporter``).
    image_start_block: the ViT block that a batch's ``image_hidden``
      tokens enter (cached below the top blocks that
      ``image.train_top_blocks`` trains;
      :mod:`mic_jax.features.image_features`); 0 when the tower only ever
      sees pixels or its whole output.
    attention_impl: how the fusion's attention runs ("einsum", "xla",
      "cudnn"; :mod:`mic_jax.layers.attention`); the towers carry their own
      in their configs.
    title_length: the width packed titles are unpacked to after the text
      tower (``text.max_length``; :mod:`mic_jax.layers.packing`). Only
      packed batches read it; they need it set.
    dtype: compute dtype; parameters keep their own ``param_dtype``.
  """
  kind: str
  num_classes: int
  txt: nn.Module | None = None
  img: nn.Module | None = None
  fusion_heads: int = 1
  fusion_gate: bool = True
  fusion_dropout: float = 0.0
  fusion_pool: str = "sum"
  mlp_dim: int = 512
  head_dropout: float = 0.0
  head_bias: bool = True
  text_repr: str = "pooler"
  image_to_head: bool = False
  aux_heads: bool = False
  image_start_block: int = 0
  attention_impl: str = "einsum"
  title_length: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    _check_kind(self.kind)
    for tower, needed, what in ((self.txt, uses_text(self.kind), "text"),
                                (self.img, uses_image(self.kind), "image")):
      if (tower is not None) != needed:
        raise ValueError(f"kind {self.kind!r} "
                         f"{'needs' if needed else 'must not have'} "
                         f"a {what} tower")
    if self.text_repr not in TEXT_REPRS:
      raise ValueError(f"text_repr must be one of {TEXT_REPRS}, got "
                       f"{self.text_repr!r}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == "cross_modal":
      self.fusion = fusion_lib.CrossModalAttention(
          heads=self.fusion_heads, gate=self.fusion_gate,
          dropout=self.fusion_dropout, pool=self.fusion_pool,
          image_to_output=self.image_to_head, return_stats=True,
          attention_impl=self.attention_impl, **kw)
    elif self.image_to_head:
      raise ValueError("fusion.image_to_head is a cross_modal option "
                       f"(kind is {self.kind!r})")
    elif self.kind == "early":
      self.fusion = fusion_lib.EarlyFusion(
          mlp_dim=self.mlp_dim, dropout=self.fusion_dropout, **kw)
    self.head = fusion_lib.ClassifierHead(
        self.num_classes, dropout=self.head_dropout, use_bias=self.head_bias,
        **kw)
    if self.aux_heads:
      if not (uses_text(self.kind) and uses_image(self.kind)):
        raise ValueError("model.aux_loss_weight adds a title-only and a "
                         "photo-only head to a fused model (kind is "
                         f"{self.kind!r})")
      # The names are AUX_HEADS.
      self.aux_text_head = fusion_lib.ClassifierHead(
          self.num_classes, dropout=self.head_dropout, **kw)
      self.aux_image_head = fusion_lib.ClassifierHead(
          self.num_classes, dropout=self.head_dropout, **kw)

  def __call__(self, batch: Batch, *, train: bool = False
               ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Classifies a batch of the data pipeline.

    Args:
      batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` ``[B, L]``,
        ``image`` ``[B, H, W, 3]`` in [-1, 1] (or ``image_tokens`` ``[B, T,
        D]``, the image tower's precomputed output, or ``image_hidden``,
        its hidden tokens at ``image_start_block``), ``image_present``
        ``[B]``; a
        kind reads only the keys of the towers it has (other keys such as
        ``label`` and ``mask`` are ignored).
      train: enables dropout (needs a ``dropout`` RNG).

    A packed batch (``segment_ids``, :mod:`mic_jax.layers.packing`) has
    token arrays ``[R, P]`` and per-slot ``image*`` / ``image_present``
    ``[R, S, ...]``: the text tower runs packed, its output is unpacked to
    ``[R * S, title_length]`` per product, and everything after it runs as
    on the padded batch of those ``R * S`` products in slot order.

    Returns:
      ``(logits [B, C] float32, aux)``; ``aux`` holds the features the head
      saw (``features``), the towers' global vectors (``text_cls``,
      ``image_cls``) and, for cross_modal, ``gate_mean`` (a float32 scalar,
      the visual gate averaged over real tokens of products with a photo).
      Packed, the logits (and ``text_logits``, ``image_logits``) are ``[R,
      S, C]``, the shape of the batch's per-slot ``label`` and ``mask``, so
      the loss reads them as it reads a padded batch; the other ``aux``
      arrays are per product, ``[R * S, ...]``.
    """
    packed = None
    if packing_lib.is_packed(batch):
      if not self.title_length:
        raise ValueError("a packed batch needs the model's title_length "
                         "(build_model sets it from text.max_length)")
      packed = packing_lib.PackedIndex.from_batch(batch, self.title_length)
      slot_keys = ("image", "image_tokens", "image_hidden", "image_present")
      batch = {**batch, **{k: packing_lib.flatten_slots(batch[k])
                           for k in slot_keys if k in batch}}
    logits, aux = self._classify(batch, train, packed)
    if packed is not None:
      rows, slots = packed.slot_start.shape
      unflatten = lambda x: x.reshape(rows, slots, *x.shape[1:])
      logits = unflatten(logits)
      for name in ("text_logits", "image_logits"):
        if name in aux:
          aux[name] = unflatten(aux[name])
    return logits, aux

  def _classify(self, batch: Batch, train: bool,
                packed: packing_lib.PackedIndex | None
                ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """:meth:`__call__` on per-product image inputs (text may be packed)."""
    aux: dict[str, jnp.ndarray] = {}
    if self.txt is not None:
      text_mask = batch["attention_mask"]
      seq, pooled = self.txt(batch["input_ids"], text_mask,
                             batch.get("token_type_ids"), train=train,
                             packed=packed)
      if packed is not None:
        # The slot's own tokens, where the batch's mask keeps them (a
        # withheld title keeps only its [CLS]).
        values, own = packing_lib.unpack(text_mask[..., None], packed)
        text_mask = values[..., 0] * own
      text_cls = text_vector(seq, pooled, text_mask, self.text_repr)
      aux["text_cls"] = text_cls
    if self.img is not None:
      # A frozen tower's outputs may come precomputed
      # (mic_jax.features.image_features); the tower then does not run at all.
      if "image_tokens" in batch:
        tokens = batch["image_tokens"]
      elif "image_hidden" in batch:  # Only the top blocks train and run.
        if not self.image_start_block:
          raise ValueError("a batch of image_hidden tokens needs "
                           "image_start_block (image.train_top_blocks)")
        tokens = self.img(batch["image_hidden"], train=train,
                          start_block=self.image_start_block)
      else:
        tokens = self.img(batch["image"], train=train)
      image_cls = tokens[:, 0]
      aux["image_cls"] = image_cls

    if self.kind == "text_only":
      features = text_cls
    elif self.kind == "image_only":
      features = image_cls
    elif self.kind == "early":
      features = self.fusion(text_cls, image_cls, batch["image_present"],
                             train=train)
    else:
      features, stats = self.fusion(seq, tokens, text_mask,
                                    batch["image_present"], train=train)
      aux.update(stats)
    aux["features"] = features
    if self.aux_heads:
      aux["text_logits"] = self.aux_text_head(text_cls, train=train)
      aux["image_logits"] = self.aux_image_head(image_cls, train=train)
    return self.head(features, train=train), aux


def text_vector(seq: jnp.ndarray, pooled: jnp.ndarray, mask: jnp.ndarray,
                repr_name: str) -> jnp.ndarray:
  """The one text vector ``[B, H]`` a head or early fusion reads."""
  if repr_name == "pooler":
    return pooled
  if repr_name == "cls":
    return seq[:, 0]
  weights = mask.astype(seq.dtype)[..., None]
  total = jnp.sum(seq * weights, axis=1)
  return total / jnp.maximum(jnp.sum(weights, axis=1), 1).astype(seq.dtype)


# ------------------------------------------------------------ building --


def compute_dtype(name: str) -> Any:
  """``"bfloat16"`` -> ``jnp.bfloat16``; unknown names raise."""
  if name not in _DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


def attention_impl(config: ml_collections.ConfigDict) -> str:
  """``config.model.attention_impl`` (default "einsum"), checked."""
  model_cfg = config.get("model") or {}
  return attention_lib.check_implementation(
      model_cfg.get("attention_impl", "einsum"))


def text_config(config: ml_collections.ConfigDict) -> bert_lib.BertConfig:
  """The BERT architecture of ``config.text``.

  In order: an explicit ``config.text.bert`` (a :class:`BertConfig`, or a
  dict of its fields; :func:`mic_jax.checkpoints.architecture.resolve` puts
  a checkpoint's own architecture there); else the named size
  ``config.text.size``. ``config.text.dropout`` (when present) sets both
  BERT dropout rates and ``config.text.vocab_size`` (when positive) the
  vocabulary size. This module reads no checkpoint file: a config naming a
  ``text.checkpoint`` must be resolved first, or it is refused.
  """
  text = config.text
  explicit = text.get("bert")
  overrides: dict[str, Any] = {}
  if text.get("dropout") is not None:
    overrides.update(hidden_dropout_prob=float(text.dropout),
                     attention_probs_dropout_prob=float(text.dropout))
  if text.get("vocab_size"):
    overrides["vocab_size"] = int(text.vocab_size)
  overrides["attention_impl"] = attention_impl(config)
  if isinstance(explicit, bert_lib.BertConfig):
    return dataclasses.replace(explicit, **overrides)
  if explicit:
    values = dict(explicit.to_dict() if hasattr(explicit, "to_dict")
                  else explicit)
    return bert_lib.BertConfig(**{**values, **overrides})
  if text.get("checkpoint"):
    raise ValueError(
        f"config.text.checkpoint={text.checkpoint!r}: the text tower's "
        "architecture is the checkpoint's own; pass the config through "
        "mic_jax.checkpoints.architecture.resolve(config) first")
  return bert_lib.get_bert_config(text.get("size", "base"), **overrides)


_PUBLISHED_VIT = re.compile(r"(Ti|S|B|L|H)/\d+")


def vit_architecture_from_checkpoint(image: ml_collections.ConfigDict) -> bool:
  """Whether the ViT's architecture is read from ``image.checkpoint``.

  Always for a Hugging Face directory or hub id (its ``config.json`` says
  what it is); for a Google ``.npz`` only when ``image.variant`` is not a
  published ``SIZE/PATCH`` name (e.g. the ``small`` preset's own scratch
  size), so the paper config still builds without reading its file.
  """
  checkpoint = str(image.get("checkpoint") or "")
  if not checkpoint:
    return False
  if checkpoint.endswith(".npz"):
    return not _PUBLISHED_VIT.fullmatch(str(image.get("variant", "")))
  return True


def build_image_tower(config: ml_collections.ConfigDict, dtype: Any,
                      param_dtype: Any = jnp.float32) -> nn.Module:
  """The ViT or BiT tower of ``config.image``.

  A ViT's architecture is the checkpoint's own when
  :func:`vit_architecture_from_checkpoint` says so (sizes, patch, LayerScale,
  pixel normalization, activation; ``config.image.vit``, filled in by
  :func:`mic_jax.checkpoints.architecture.resolve`), otherwise the named
  ``variant``.
  """
  image = config.image
  kind = image.get("kind", "vit")
  overrides: dict[str, Any] = {}
  if image.get("remat"):
    overrides["remat"] = True
  if kind == "vit":
    overrides["attention_impl"] = attention_impl(config)
    if (config.get("model") or {}).get("scan_layers"):
      overrides["scan_layers"] = True
    from mic_jax.models import vit  # pylint: disable=g-import-not-at-top
    if image.get("dropout"):
      overrides["dropout"] = float(image.dropout)
    if vit_architecture_from_checkpoint(image):
      arch = image.get("vit")
      if arch is None:
        raise ValueError(
            f"config.image.checkpoint={image.checkpoint!r}: the ViT's "
            "architecture is the checkpoint's own; pass the config through "
            "mic_jax.checkpoints.architecture.resolve(config) first")
      return vit.VisionTransformer(dataclasses.replace(arch, **overrides),
                                   dtype=dtype, param_dtype=param_dtype)
    return vit.get_vit(image.variant, dtype=dtype, param_dtype=param_dtype,
                       **overrides)
  if kind == "bit":
    from mic_jax.models import bit  # pylint: disable=g-import-not-at-top
    return bit.get_bit(image.variant, dtype=dtype, param_dtype=param_dtype,
                       **overrides)
  raise ValueError(f"config.image.kind must be 'vit' or 'bit', got {kind!r}")


def build_model(config: ml_collections.ConfigDict,
                num_classes: int | None = None) -> MultimodalClassifier:
  """The classifier of ``config`` (the one place models are constructed).

  :func:`build` adds the input spec and the abstract parameters; callers
  that need shapes use it. Reads ``config.model.kind``, ``num_classes`` (or,
  when not given, ``config.num_classes``, which must then be filled in),
  ``config.dtype`` (compute; parameters stay float32), ``config.text`` (see
  :func:`text_config`; plus ``remat``), ``config.image.{kind, variant,
  dropout, remat}`` and ``config.fusion.{heads, gate, dropout, pool,
  mlp_dim}``. Optional: ``config.model.text_repr`` ("pooler"/"cls"/"mean"),
  ``config.model.attention_impl`` (every attention layer; "einsum") and
  ``config.fusion.head_bias`` (default: off for cross_modal, as in eq. 4,
  on otherwise).
  """
  kind = config.model.kind
  _check_kind(kind)
  num_classes = int(config.num_classes if num_classes is None
                    else num_classes)
  if num_classes < 1:
    raise ValueError(f"config.num_classes must be set (got {num_classes}); "
                     "the trainer fills it in from the data's labels.txt")
  dtype = compute_dtype(config.get("dtype", "float32"))
  txt = img = None
  if uses_text(kind):
    txt = bert_lib.BertEncoder(text_config(config), dtype=dtype,
                               param_dtype=jnp.float32,
                               remat=bool(config.text.get("remat", False)),
                               scan_layers=bool((config.get("model") or {}).get(
                                   "scan_layers", False)))
  image_start_block = 0
  aux_heads = float((config.get("model") or {}).get(
      "aux_loss_weight", 0.0) or 0.0) > 0
  if uses_image(kind):
    img = build_image_tower(config, dtype)
    top = int(config.image.get("train_top_blocks", 0) or 0)
    if top and hasattr(img, "config") and hasattr(img.config, "depth"):
      image_start_block = int(img.config.depth) - top
  fusion_cfg = config.get("fusion") or ml_collections.ConfigDict()
  head_bias = fusion_cfg.get("head_bias")
  if head_bias is None:
    head_bias = kind != "cross_modal"
  # Dropout on the head's input: the tower's rate for a single modality (as
  # Hugging Face's classifiers do), the fusion rate for cross_modal; early
  # fusion already drops out its hidden layer, the head's only input.
  if kind == "text_only":
    head_dropout = config.text.get("dropout", 0.0)
  elif kind == "image_only":
    head_dropout = config.image.get("dropout", 0.0)
  elif kind == "cross_modal":
    head_dropout = fusion_cfg.get("dropout", 0.0)
  else:
    head_dropout = 0.0
  model_cfg = config.get("model") or {}
  return MultimodalClassifier(
      kind=kind, num_classes=num_classes, txt=txt, img=img,
      fusion_heads=int(fusion_cfg.get("heads", 1)),
      fusion_gate=bool(fusion_cfg.get("gate", True)),
      fusion_dropout=float(fusion_cfg.get("dropout", 0.0)),
      fusion_pool=fusion_cfg.get("pool", "sum"),
      mlp_dim=int(fusion_cfg.get("mlp_dim", 512)),
      head_dropout=float(head_dropout or 0.0),
      head_bias=bool(head_bias),
      text_repr=model_cfg.get("text_repr", "pooler"),
      image_to_head=bool(fusion_cfg.get("image_to_head", False)),
      aux_heads=aux_heads,
      image_start_block=image_start_block,
      attention_impl=attention_impl(config),
      title_length=int(config.text.get("max_length", 0) or 0),
      dtype=dtype, param_dtype=jnp.float32)


def example_batch(config: ml_collections.ConfigDict, batch_size: int = 1
                  ) -> dict[str, jnp.ndarray]:
  """The model's input spec: a zero batch shaped as the data pipeline's
  (``config.text.max_length`` tokens, ``config.image.size`` pixels)."""
  length, size = int(config.text.max_length), int(config.image.size)
  if size <= 0:
    raise ValueError(f"config.image.size={size}: a preset left the image size "
                     "to the photo tower; resolve the config first "
                     "(configs.common.resolve_auto)")
  return {
      "input_ids": jnp.zeros((batch_size, length), jnp.int32),
      "attention_mask": jnp.ones((batch_size, length), jnp.int32),
      "token_type_ids": jnp.zeros((batch_size, length), jnp.int32),
      "image": jnp.zeros((batch_size, size, size, 3), jnp.float32),
      "image_present": jnp.ones((batch_size,), jnp.int32),
      "label": jnp.zeros((batch_size,), jnp.int32),
      "mask": jnp.ones((batch_size,), jnp.float32),
  }


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A built model with its input spec and abstract parameters.

  Attributes:
    model: the unbound :class:`MultimodalClassifier`.
    example_batch: a zero batch of the input shapes (what ``init`` takes).
    boxed_params: ``jax.eval_shape`` of the parameters, still carrying
      their logical-axis metadata (what shardings are derived from).
  """
  model: MultimodalClassifier
  example_batch: dict[str, jnp.ndarray]
  boxed_params: Any

  @property
  def abstract_params(self) -> Any:
    """The parameters' ``ShapeDtypeStruct`` tree, metadata removed."""
    return nn.meta.unbox(self.boxed_params)

  def init_params(self, seed: int) -> Any:
    """Fresh parameters (unboxed) from ``seed``: what ``model.init`` gives
    with the ``params`` key ``seed`` and the ``dropout`` key ``seed + 1``."""
    return nn.meta.unbox(self.model.init(
        {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)},
        self.example_batch, train=False)["params"])


def build(config: ml_collections.ConfigDict, num_classes: int | None = None,
          *, batch_size: int = 1) -> ModelSpec:
  """The one way to build a model: ``(model, input spec, abstract params)``.

  ``config`` must be plain (a checkpoint's architecture already resolved
  into it, see :func:`mic_jax.checkpoints.architecture.resolve`);
  ``num_classes`` defaults to ``config.num_classes``. Nothing is allocated:
  the parameters come from ``jax.eval_shape`` of ``init``.
  """
  model = build_model(config, num_classes)
  batch = example_batch(config, batch_size)
  boxed = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, batch,
      train=False))["params"]
  return ModelSpec(model, batch, boxed)
