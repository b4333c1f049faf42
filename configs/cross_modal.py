"""Gated cross-modal attention fusion, eqs. (1)-(4): the paper's best system (Table 2, last row).

  python -m mic_jax.main --config=configs/cross_modal.py:demo --workdir=/tmp/cross_modal
  python -m mic_jax.main --config=configs/cross_modal.py:small \\
      --config.data.dir=PREPARED_DIR --workdir=runs/cross_modal

Without an argument this is the paper's setting (BERT-base Japanese +
ViT-L/16 at 224px); see configs/common.py for every field.
"""

from configs import common


def get_config(arg: str | None = None):
  return common.make_config("cross_modal", arg)
