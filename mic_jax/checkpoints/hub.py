"""Resolving "a local directory or a Hugging Face hub id" to a directory.

Checkpoints and tokenizers are named the same way everywhere in mic_jax: a
local path is used as it is; anything else that looks like ``org/name`` is
fetched with ``huggingface_hub`` into its cache. Offline machines get an
error that names the id and says how to provide the files instead of a long
network traceback.
"""

from __future__ import annotations

import os
import pathlib
import re

from mic_jax.checkpoints.common import CheckpointError

# Everything a BERT or ViT checkpoint or tokenizer may need (the image
# processor's config holds a ViT's pixel statistics); weights of other
# frameworks (tf_model.h5, onnx, ...) are not downloaded.
HUB_FILES = (
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "flax_model.msgpack",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.model",
    "preprocessor_config.json",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_dir(path_or_hub_id: str | os.PathLike[str], *,
                what: str = "checkpoint") -> pathlib.Path:
  """Returns a local directory holding ``path_or_hub_id``'s files.

  Args:
    path_or_hub_id: a local directory, a file inside one (its directory is
      used), or a hub id such as ``cl-tohoku/bert-base-japanese-whole-word-masking``.
    what: used in error messages ("checkpoint", "tokenizer").

  Raises:
    CheckpointError: the path does not exist and is not a hub id, or the
      download failed (offline, unknown id, no permission).
  """
  text = os.fspath(path_or_hub_id)
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    return path
  if path.is_file():
    return path.parent
  if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
    raise CheckpointError(f"{what} not found: {text!r} is neither an existing "
                          "directory nor a hub id like 'org/name'")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    local = huggingface_hub.snapshot_download(
        repo_id=text, allow_patterns=list(HUB_FILES))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"{what} {text!r} is not a local directory and could not be "
        f"downloaded from the Hugging Face hub ({type(e).__name__}: {e}). On "
        "an offline machine, download it elsewhere (e.g. `huggingface-cli "
        f"download {text} --local-dir DIR`), copy DIR here and pass its "
        "path instead.") from e
  return pathlib.Path(local)
