"""Text-only BERT on product titles (Table 2, Text-BERT).

  python -m mic_jax.main --config=configs/text_only.py:demo --workdir=/tmp/text_only
  python -m mic_jax.main --config=configs/text_only.py:small \\
      --config.data.dir=PREPARED_DIR --workdir=runs/text_only

Without an argument this is the paper's setting (BERT-base Japanese +
ViT-L/16 at 224px); see configs/common.py for every field.
"""

from configs import common


def get_config(arg: str | None = None):
  return common.make_config("text_only", arg)
