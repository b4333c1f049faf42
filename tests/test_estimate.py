"""The estimator against published parameter counts and XLA's FLOP count."""

import pytest

from configs import common
from mic_jax.tools import estimate


def _config(kind, arg=None, **fields):
  config = common.make_config(kind, arg)
  with config.unlocked():
    config.num_classes = 1000
    for key, value in fields.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = getattr(node, p)
      setattr(node, leaf, value)
  return config


def test_paper_towers_have_the_published_sizes():
  """BERT-base (30522 vocab) 109,482,240; ViT-L/16 304,326,632 with a
  1000-class head, i.e. 303,301,632 without it. Nothing is allocated."""
  est = estimate.estimate(_config("cross_modal", **{"text.checkpoint": ""}),
                          num_devices=16)
  assert est.params["txt"] == 109_482_240
  assert est.params["img"] == 304_326_632 - (1024 * 1000 + 1000)
  assert est.mesh == (16, 1, 1)
  # Data parallel: every device holds all f32 parameters, and 2x in AdamW.
  assert est.param_bytes == pytest.approx(4 * est.params["total"])
  assert est.optimizer_bytes == 2 * est.param_bytes


def test_fsdp_and_remat_shrink_the_estimate():
  base = _config("cross_modal", **{"text.checkpoint": ""})
  dp = estimate.estimate(base, num_devices=8)
  fsdp = estimate.estimate(_config("cross_modal", **{
      "text.checkpoint": "", "mesh.data": 1, "mesh.fsdp": 8,
      "text.remat": True, "image.remat": True}), num_devices=8)
  assert fsdp.param_bytes < dp.param_bytes / 6
  assert fsdp.activation_bytes < dp.activation_bytes / 4


def test_analytic_flops_match_xla_cost_analysis():
  """Compiled on this CPU: the analytic count is within 3% of XLA's for a
  transformer of realistic width (tiny widths are dominated by the
  element-wise ops the analytic count leaves out)."""
  config = _config("image_only", "small", batch_size=4)
  est = estimate.estimate(config, num_devices=1)
  xla = estimate.xla_train_step_flops(config)
  assert est.train_flops / xla == pytest.approx(1.0, abs=0.03)
  text = estimate.report(est, config, "v4", 0.4, xla)
  assert "analytic / XLA" in text and "ms/step" in text
