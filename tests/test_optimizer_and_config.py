"""Optimizer groups, schedules, config parsing and sharding rules."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from mic_jax import sharding as shd
from mic_jax.models import classifier
from mic_jax.train import optimizer, steps


def _params():
  return {
      "txt": {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
              "LayerNorm": {"scale": jnp.ones((4,))}},
      "img": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}},
      "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones((2,))},
  }


def _optim(**kw):
  config = common.make_config("cross_modal", "demo")
  with config.unlocked():
    for k, v in kw.items():
      setattr(config.optim, k, v)
  return config.optim


def _one_update(optim, params, grads):
  tx, _ = optimizer.make_optimizer(optim, params, total_steps=10)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  return updates


def test_frozen_tower_gets_no_update_and_no_state():
  params = _params()
  optim = _optim(freeze="img", warmup_steps=0, decay="constant",
                 clip_norm=0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  updates = _one_update(optim, params, grads)
  assert all((u == 0).all() for u in jax.tree.leaves(updates["img"]))
  assert all((u != 0).any() for u in jax.tree.leaves(updates["txt"]))
  tx, _ = optimizer.make_optimizer(optim, params, 10)
  n_state = sum(x.size for x in jax.tree.leaves(tx.init(params)))
  n_trainable = sum(x.size for k, v in params.items() if k != "img"
                    for x in jax.tree.leaves(v))
  # Adam keeps two moments per trainable parameter, none for frozen ones.
  assert n_state - 2 * n_trainable < 10


def test_lr_multiplier_scales_the_update():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  base = _optim(warmup_steps=0, decay="constant", weight_decay=0.0,
                clip_norm=0.0)
  scaled = _optim(warmup_steps=0, decay="constant", weight_decay=0.0,
                  clip_norm=0.0, lr_multipliers="txt=0.25")
  u1, u2 = _one_update(base, params, grads), _one_update(scaled, params, grads)
  np.testing.assert_allclose(u2["txt"]["dense"]["kernel"],
                             0.25 * u1["txt"]["dense"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(u2["head"]["kernel"], u1["head"]["kernel"])


def test_no_weight_decay_on_norms_and_biases():
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  optim = _optim(warmup_steps=0, decay="constant", weight_decay=0.1,
                 clip_norm=0.0)
  updates = _one_update(optim, params, zero)
  assert (updates["txt"]["dense"]["kernel"] < 0).all()   # Decayed.
  assert (updates["txt"]["dense"]["bias"] == 0).all()    # Not decayed.
  assert (updates["txt"]["LayerNorm"]["scale"] == 0).all()


def test_schedule_warmup_then_decay():
  schedule = optimizer.make_schedule(_optim(lr=1.0, warmup_steps=10,
                                            decay="linear"), 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.5)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_bad_optimizer_settings_are_rejected():
  with pytest.raises(ValueError, match="lr_multipliers"):
    optimizer.parse_multipliers("txt:0.5")
  with pytest.raises(ValueError, match="decay"):
    optimizer.make_schedule(_optim(decay="exp"), 10)
  with pytest.raises(ValueError, match="freezes every parameter"):
    optimizer.make_optimizer(_optim(freeze=".*"), _params(), 10)


def test_class_weights_mean_one_and_zero_for_absent():
  w = steps.class_weights(np.array([100, 25, 0, 1]), "inverse_sqrt")
  assert w[2] == 0 and w[0] < w[1] < w[3]
  np.testing.assert_allclose(w[[0, 1, 3]].mean(), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="class_weighting"):
    steps.class_weights(np.ones(3), "balanced")


def test_label_smoothing_loss_matches_optax():
  logits = jax.random.normal(jax.random.key(0), (5, 7))
  labels = jnp.array([0, 3, 6, 2, 2])
  ours = steps.weighted_xent(logits, labels, jnp.ones(5), 0.1) / 5
  smoothed = optax.smooth_labels(jax.nn.one_hot(labels, 7), 0.1)
  ref = optax.softmax_cross_entropy(logits, smoothed).mean()
  np.testing.assert_allclose(ours, ref, rtol=1e-6)


# --- Configs. ---


@pytest.mark.parametrize("module", ["cross_modal", "early_fusion",
                                    "late_fusion", "text_only", "image_only"])
@pytest.mark.parametrize("arg", [None, "small", "demo", "small,image=bit"])
def test_every_config_builds(module, arg):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  assert config.model.kind in common.KINDS
  if arg and "bit" in arg:
    assert config.image.kind == "bit"


def test_config_arg_typos_are_errors():
  with pytest.raises(ValueError, match="unknown config preset 'smal'"):
    common.make_config("cross_modal", "smal")
  with pytest.raises(ValueError, match="unknown config option 'imgae'"):
    common.make_config("cross_modal", "imgae=bit")
  with pytest.raises(ValueError, match="expected one of"):
    common.make_config("cross_modal", "image=resnet")
  config = common.make_config("cross_modal", "demo")
  with pytest.raises(AttributeError):
    config.totl_steps = 5  # Locked: no new fields by accident.


def test_command_line_override_typo_is_a_clear_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "mic_jax.main",
       "--config=configs/cross_modal.py:demo", "--config.totl_steps=5",
       f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "totl_steps" in proc.stderr


def test_missing_data_stops_at_once_with_instructions(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "mic_jax.main",
       "--config=configs/cross_modal.py:small", f"--workdir={tmp_path}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "config.data.dir is empty" in proc.stderr
  assert "python -m data_prep.prepare" in proc.stderr


# --- Sharding rules and meshes. ---


def test_mesh_shape_resolution():
  assert shd.mesh_shape(-1, 1, 1, 8) == (8, 1, 1)
  assert shd.mesh_shape(2, -1, 2, 8) == (2, 2, 2)
  assert shd.mesh_shape(1, 1, 1, 8) == (1, 1, 1)  # Uses the first device.
  with pytest.raises(ValueError, match="needs 16 devices"):
    shd.mesh_shape(4, 4, 1, 8)
  with pytest.raises(ValueError, match="at most one"):
    shd.mesh_shape(-1, -1, 1, 8)


def test_rules_reject_unknown_and_conflicting_names():
  assert shd.validate_rules(shd.DEFAULT_RULES)
  with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
    shd.validate_rules([("embd", "fsdp")])
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    shd.validate_rules([("embed", "model")])
  with pytest.raises(ValueError, match="conflicting"):
    shd.validate_rules([("embed", "fsdp"), ("embed", "tensor")])


def test_dotted_override_sets_fields_and_rejects_typos():
  config = common.make_config("cross_modal", "demo")
  common.override(config, "optim.lr", 0.5)
  common.override(config, "seed", 3)
  assert config.optim.lr == 0.5 and common.get_field(config, "seed") == 3
  with pytest.raises(AttributeError, match="lrr"):
    common.override(config, "optim.lrr", 1.0)
  with config.unlocked():  # Not even an unlocked config grows a typo.
    with pytest.raises(AttributeError, match="batchsize"):
      common.override(config, "batchsize", 4)


def test_auto_fields_follow_the_photo_tower():
  """``image.size = 0`` and ``image.freeze_pretrained`` resolve from whether
  the photo tower is loaded from a checkpoint; explicit values win, and
  resolving twice changes nothing."""
  config = common.make_config("cross_modal", "small")
  with config.unlocked():
    config.image.size = 0
    config.image.freeze_pretrained = True
  scratch = common.resolve_auto(config)
  assert (scratch.image.size, scratch.optim.freeze) == (
      common.SCRATCH_IMAGE_SIZE, "")
  with config.unlocked():
    config.image.checkpoint = "ckpt/dinov2"
    config.optim.freeze = "txt/embeddings"
  pretrained = common.resolve_auto(config)
  assert pretrained.image.size == common.PRETRAINED_IMAGE_SIZE
  assert pretrained.optim.freeze == "txt/embeddings|img"
  assert common.resolve_auto(pretrained).to_dict() == pretrained.to_dict()
  assert config.image.size == 0  # The input is not changed.
  with config.unlocked():
    config.image.size = 112
    config.image.freeze_pretrained = False
  explicit = common.resolve_auto(config)
  assert (explicit.image.size, explicit.optim.freeze) == (112,
                                                          "txt/embeddings")
  text = common.make_config("text_only", "small")
  with text.unlocked():
    text.image.checkpoint, text.image.freeze_pretrained = "ckpt", True
  assert common.resolve_auto(text).optim.freeze == ""  # No photo tower.
  unresolved = config.copy_and_resolve_references()
  with unresolved.unlocked():
    unresolved.image.size = 0
  with pytest.raises(ValueError, match="resolve the config first"):
    classifier.example_batch(unresolved)


def test_auto_top_blocks_train_only_over_a_frozen_pretrained_vit():
  """``image.train_top_blocks = -1`` trains the top of a frozen pretrained
  ViT (:data:`common.PRETRAINED_TOP_BLOCKS`) and is 0 for a scratch tower, a
  pretrained tower left training, BiT and a model without photos; an
  explicit value wins; resolving twice changes nothing."""
  def resolved(kind="cross_modal", arg="small", **fields):
    config = common.make_config(kind, arg)
    with config.unlocked():
      config.image.train_top_blocks = -1
      config.image.size = 112
      for key, value in fields.items():
        common.override(config, key.replace("__", "."), value)
    return common.resolve_auto(config)

  frozen = resolved(image__checkpoint="ckpt", image__freeze_pretrained=True)
  assert frozen.image.train_top_blocks == common.PRETRAINED_TOP_BLOCKS > 0
  assert common.resolve_auto(frozen).to_dict() == frozen.to_dict()
  assert resolved(image__checkpoint="ckpt", image__freeze_pretrained=False,
                  optim__freeze="img").image.train_top_blocks == (
                      common.PRETRAINED_TOP_BLOCKS)
  assert resolved().image.train_top_blocks == 0  # Scratch tower.
  assert resolved(image__checkpoint="ckpt", image__freeze_pretrained=False,
                  optim__freeze="").image.train_top_blocks == 0
  assert resolved(arg="small,image=bit", image__checkpoint="ckpt",
                  image__freeze_pretrained=True).image.train_top_blocks == 0
  assert resolved("text_only", image__checkpoint="ckpt",
                  image__freeze_pretrained=True).image.train_top_blocks == 0
  explicit = common.make_config("cross_modal", "small")
  with explicit.unlocked():
    explicit.image.checkpoint, explicit.image.train_top_blocks = "ckpt", 2
  assert common.resolve_auto(explicit).image.train_top_blocks == 2
  # The top blocks learn at PRETRAINED_TOP_LR_MULTIPLIER unless the user
  # gave the image tower a multiplier of their own.
  assert frozen.optim.lr_multipliers == (
      f"txt=0.25,img={common.PRETRAINED_TOP_LR_MULTIPLIER}")
  assert resolved().optim.lr_multipliers == "txt=0.25"  # Nothing to train.
  own = resolved(image__checkpoint="ckpt", image__freeze_pretrained=True,
                 optim__lr_multipliers="img/Transformer=0.5,txt=0.1")
  assert own.optim.lr_multipliers == "img/Transformer=0.5,txt=0.1"


def test_small_preset_with_a_photo_checkpoint_is_the_chosen_recipe():
  """``:small`` plus ``image.checkpoint`` alone gives issue 31's recipe (no
  other override): frozen, cached tower at the catalogue's size, top block
  trained at a quarter step, the photo token in the cross-modal head, the
  title as the mean of its token states; without a checkpoint, a scratch
  tower at 64 px trained whole at the full step."""
  config = common.make_config("cross_modal", "small")
  with config.unlocked():
    config.image.checkpoint = "ckpt/dinov2"
  chosen = common.resolve_auto(config)
  assert (chosen.image.size, chosen.optim.freeze,
          chosen.image.train_top_blocks, chosen.optim.lr_multipliers,
          chosen.fusion.image_to_head, chosen.model.text_repr) == (
              common.PRETRAINED_IMAGE_SIZE, "img", 1, "txt=0.25,img=0.25",
              True, "mean")
  scratch = common.resolve_auto(common.make_config("cross_modal", "small"))
  assert (scratch.image.size, scratch.optim.freeze,
          scratch.image.train_top_blocks, scratch.optim.lr_multipliers) == (
              common.SCRATCH_IMAGE_SIZE, "", 0, "txt=0.25")
  for kind in ("text_only", "image_only", "early", "late"):
    assert not common.make_config(kind, "small").fusion.image_to_head


@pytest.mark.parametrize("histogram, size", [
    ({"<=128": 35346, "<=64": 4}, common.SMALL_PHOTO_IMAGE_SIZE),  # fashion
    ({"<=512": 9345}, common.PRETRAINED_IMAGE_SIZE),                # H&M
    ({"<=128": 4, "<=256": 5}, common.PRETRAINED_IMAGE_SIZE),
    ({"<=64": 5, ">2048": 5}, common.SMALL_PHOTO_IMAGE_SIZE),
    (None, common.PRETRAINED_IMAGE_SIZE),                           # no record
])
def test_auto_image_size_follows_the_prepared_photos(tmp_path, histogram,
                                                     size):
  """A pretrained tower's ``image.size = 0`` reads the photo sizes data_prep
  recorded: small photos (most at most 128 px long) get 112 px, not 224."""
  if histogram is not None:
    (tmp_path / "stats.json").write_text(
        json.dumps({"image_size_histogram": histogram}))
  config = common.make_config("cross_modal", "small")
  with config.unlocked():
    config.image.size = 0
    config.image.checkpoint = "ckpt/dinov2"
    config.data.dir = str(tmp_path)
  assert common.resolve_auto(config).image.size == size
  with config.unlocked():
    config.image.checkpoint = ""
  assert common.resolve_auto(config).image.size == common.SCRATCH_IMAGE_SIZE
