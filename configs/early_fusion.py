"""Early "shallow" fusion: the two [CLS] vectors concatenated into an MLP head (Table 2, Fusion-early).

  python -m mic_jax.main --config=configs/early_fusion.py:demo --workdir=/tmp/early_fusion
  python -m mic_jax.main --config=configs/early_fusion.py:small \\
      --config.data.dir=PREPARED_DIR --workdir=runs/early_fusion

Without an argument this is the paper's setting (BERT-base Japanese +
ViT-L/16 at 224px); see configs/common.py for every field.
"""

from configs import common


def get_config(arg: str | None = None):
  return common.make_config("early", arg)
