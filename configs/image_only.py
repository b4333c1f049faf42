"""Image-only ViT-L/16 (Table 2, Image-ViT), or BiT with the option image=bit (Table 1).

  python -m mic_jax.main --config=configs/image_only.py:demo --workdir=/tmp/image_only
  python -m mic_jax.main --config=configs/image_only.py:small \\
      --config.data.dir=PREPARED_DIR --workdir=runs/image_only

Without an argument this is the paper's setting (BERT-base Japanese +
ViT-L/16 at 224px); see configs/common.py for every field.
"""

from configs import common


def get_config(arg: str | None = None):
  return common.make_config("image_only", arg)
