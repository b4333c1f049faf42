"""Title normalization, applied identically at data preparation and serving.

Product titles arrive with full-width characters (common in Japanese
catalogues), stray control characters and uneven spacing. A model trained on
one spelling and served another silently loses accuracy, so every code path
that turns a title into ids goes through :func:`normalize_title`.
"""

from __future__ import annotations

import unicodedata

# Control and format characters other than whitespace carry no meaning in a
# title and break some tokenizers (e.g. a zero-width space inside a word).
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def normalize_title(title: str) -> str:
  """NFKC, drops control/format characters, collapses whitespace, strips.

  ``"ＡＢＣ　 525ｍｌ\\t×24本 "`` -> ``"ABC 525ml ×24本"``.
  """
  if not isinstance(title, str):
    raise TypeError(f"title must be str, got {type(title).__name__}")
  if title.isascii() and title.isprintable():
    return " ".join(title.split())  # Fast path: NFKC is the identity here.
  text = unicodedata.normalize("NFKC", title)
  text = "".join(" " if ch.isspace() else ch for ch in text
                 if ch.isspace() or unicodedata.category(ch) not in
                 _DROP_CATEGORIES)
  return " ".join(text.split())


def title_group_key(title: str) -> str:
  """The key under which duplicate titles are grouped for splitting."""
  return normalize_title(title).casefold()
