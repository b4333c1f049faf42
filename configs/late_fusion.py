"""Late fusion: p = alpha p_text + (1 - alpha) p_image, alpha chosen on validation by macro-F1 (Table 2, Fusion-late).

  python -m mic_jax.main --config=configs/late_fusion.py:demo --workdir=/tmp/late_fusion
  python -m mic_jax.main --config=configs/late_fusion.py:small \\
      --config.data.dir=PREPARED_DIR --workdir=runs/late_fusion

Without an argument this is the paper's setting (BERT-base Japanese +
ViT-L/16 at 224px); see configs/common.py for every field.
"""

from configs import common


def get_config(arg: str | None = None):
  return common.make_config("late", arg)
