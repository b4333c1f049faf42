"""Turning product titles into BERT inputs.

``load_tokenizer(path_or_hub_id).encode_batch(titles, max_length=64)`` gives
fixed-shape int32 ``input_ids`` / ``attention_mask`` / ``token_type_ids``.
"""

from mic_jax.text.normalize import normalize_title, title_group_key
from mic_jax.text.tokenizer import (FastTokenizer, MecabTokenizer,
                                    SentencePieceTokenizer, TitleTokenizer,
                                    load_tokenizer)

__all__ = [
    "FastTokenizer", "MecabTokenizer", "SentencePieceTokenizer",
    "TitleTokenizer", "load_tokenizer", "normalize_title", "title_group_key",
]
