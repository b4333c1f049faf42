"""Title tokenizers: Hugging Face WordPiece, Japanese MeCab + WordPiece, SentencePiece.

All three expose one contract, :class:`TitleTokenizer`:
``encode_batch(titles, max_length)`` returns fixed-shape int32 arrays
(``input_ids``, ``attention_mask``, ``token_type_ids``), ``[CLS] ... [SEP]``,
truncated and padded, after :func:`normalize_title`.

Speed: WordPiece runs in the Rust ``tokenizers`` library for whole batches.
For Japanese, MeCab (through fugashi, in C) segments each title into words,
and the words go to the same Rust WordPiece in one batch, so the Python cost
per title is one MeCab call.

Which tokenizer a directory gets follows its own files, like Hugging Face:
``tokenizer_config.json`` with ``word_tokenizer_type: mecab`` (or
``tokenizer_class: BertJapaneseTokenizer``) -> MeCab + WordPiece with the
dictionary it names (default ipadic, as MeCab's own default);
``tokenizer.json`` -> that fast tokenizer; ``vocab.txt`` -> BERT WordPiece
with the config's lower-casing; a ``*.model`` file -> SentencePiece.
"""

from __future__ import annotations

import abc
import json
import os
import pathlib
import shutil
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from mic_jax.checkpoints.common import CheckpointError
from mic_jax.checkpoints.hub import resolve_dir
from mic_jax.text.normalize import normalize_title

Batch = dict[str, np.ndarray]


class TitleTokenizer(abc.ABC):
  """Turns product titles into fixed-length BERT inputs."""

  #: Files (absolute paths) needed to rebuild this tokenizer, for export.
  files: list[pathlib.Path]
  pad_id: int

  @abc.abstractmethod
  def _encode_ids(self, titles: list[str], max_length: int) -> list[list[int]]:
    """Ids with special tokens, each at most ``max_length`` long."""

  @abc.abstractmethod
  def tokenize(self, title: str) -> list[str]:
    """The pieces of one normalized title, without special tokens."""

  @abc.abstractmethod
  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    """Vocabulary strings of ``ids`` (special tokens included)."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids; must not exceed the text model's ``vocab_size``."""

  def encode_batch(self, titles: Sequence[str], max_length: int = 64) -> Batch:
    """Normalizes, tokenizes, truncates and pads a batch of titles.

    Args:
      titles: product titles (``str``); empty titles give ``[CLS] [SEP]``.
      max_length: output length including ``[CLS]`` and ``[SEP]``.

    Returns:
      ``input_ids``, ``attention_mask``, ``token_type_ids``: int32
      ``[len(titles), max_length]``.
    """
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2, got {max_length}")
    if isinstance(titles, str):
      raise TypeError("encode_batch takes a list of titles, not one string")
    normalized = [normalize_title(t) for t in titles]
    rows = self._encode_ids(normalized, max_length)
    ids = np.full((len(rows), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(rows), max_length), np.int32)
    for i, row in enumerate(rows):
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": np.zeros_like(ids)}

  def save(self, directory: str | os.PathLike[str]) -> None:
    """Copies the files this tokenizer is built from into ``directory``."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for f in self.files:
      shutil.copy2(f, out / f.name)


class FastTokenizer(TitleTokenizer):
  """A Rust ``tokenizers.Tokenizer`` with a ``[CLS] $A [SEP]`` template.

  Also the WordPiece stage of :class:`MecabTokenizer`, whose input is
  already split into words (``presplit=True``).
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, files: list[pathlib.Path],
               *, cls_token: str = "[CLS]", sep_token: str = "[SEP]",
               pad_token: str = "[PAD]"):
    self._tok = tokenizer
    self._tok.no_padding()
    self._tok.no_truncation()
    self.files = files
    ids = {t: tokenizer.token_to_id(t) for t in (cls_token, sep_token)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise CheckpointError(f"{files[0]}: vocabulary lacks {missing}")
    pad = tokenizer.token_to_id(pad_token)
    self.pad_id = 0 if pad is None else pad
    self._cls, self._sep = ids[cls_token], ids[sep_token]

  def _encode_ids(self, titles, max_length):
    encodings = self._tok.encode_batch(titles, add_special_tokens=False)
    keep = max_length - 2
    return [[self._cls, *e.ids[:keep], self._sep] for e in encodings]

  def tokenize(self, title):
    return self._tok.encode(normalize_title(title),
                            add_special_tokens=False).tokens

  def convert_ids_to_tokens(self, ids):
    return [self._tok.id_to_token(int(i)) for i in ids]

  @property
  def vocab_size(self):
    return self._tok.get_vocab_size(with_added_tokens=True)


def _wordpiece(vocab_file: pathlib.Path, *, lowercase: bool,
               strip_accents: bool | None, chinese_chars: bool,
               basic_split: bool, unk_token: str = "[UNK]"
               ) -> tokenizers.Tokenizer:
  """A BERT WordPiece tokenizer built from ``vocab.txt``.

  ``basic_split=False`` splits on whitespace only (input already segmented
  into words by MeCab) and leaves the text as it is, as Hugging Face's
  Japanese tokenizer does after MeCab.
  """
  vocab: dict[str, int] = {}
  with open(vocab_file, encoding="utf-8") as f:
    for line in f:
      token = line.rstrip("\n")
      if token and token not in vocab:
        vocab[token] = len(vocab)
  if unk_token not in vocab:
    raise CheckpointError(f"{vocab_file}: no {unk_token} token in vocabulary")
  tok = tokenizers.Tokenizer(models.WordPiece(
      vocab, unk_token=unk_token, max_input_chars_per_word=100))
  if basic_split:
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars,
        strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  else:
    if lowercase:
      tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece()
  return tok


def _mecab_tagger(dictionary: str, user_args: str = ""):
  """A fugashi tagger for ``ipadic``, ``unidic_lite`` or ``unidic``."""
  import fugashi  # pylint: disable=g-import-not-at-top
  if dictionary == "ipadic":
    import ipadic  # pylint: disable=g-import-not-at-top
    args = ipadic.MECAB_ARGS
  elif dictionary in ("unidic_lite", "unidic"):
    mod = __import__(dictionary)
    args = f'-d "{mod.DICDIR}" -r "{os.path.join(mod.DICDIR, "mecabrc")}"'
  else:
    raise CheckpointError(f"unknown MeCab dictionary {dictionary!r}; use "
                          "ipadic, unidic_lite or unidic")
  return fugashi.GenericTagger(f"{args} {user_args}".strip())


class MecabTokenizer(TitleTokenizer):
  """MeCab word segmentation then WordPiece (or characters), as in the paper.

  Mirrors Hugging Face's ``BertJapaneseTokenizer`` configuration:
  ``mecab_kwargs.mecab_dic`` picks the dictionary (MeCab's default, ipadic,
  when absent), ``do_lower_case`` lower-cases words, and
  ``subword_tokenizer_type`` is ``wordpiece`` or ``character``.
  """

  def __init__(self, vocab_file: pathlib.Path, files: list[pathlib.Path], *,
               dictionary: str = "ipadic", lowercase: bool = False,
               subword: str = "wordpiece", mecab_option: str = ""):
    if subword not in ("wordpiece", "character"):
      raise CheckpointError(f"{vocab_file.parent}: unsupported "
                            f"subword_tokenizer_type {subword!r}")
    self.dictionary = dictionary
    self.subword = subword
    self._tagger = _mecab_tagger(dictionary, mecab_option)
    self._lowercase = lowercase
    wordpiece = _wordpiece(vocab_file, lowercase=False, strip_accents=None,
                           chinese_chars=False, basic_split=False)
    if subword == "character":
      # Every character is its own word: no "##" continuation pieces.
      wordpiece.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.WhitespaceSplit(),
          pre_tokenizers.Split(tokenizers.Regex("."), "isolated")])
    self._pieces = FastTokenizer(wordpiece, files)
    self.files = files
    self.pad_id = self._pieces.pad_id

  def words(self, title: str) -> list[str]:
    """MeCab's segmentation of a normalized title."""
    words = [node.surface for node in self._tagger(title)]
    return [w.lower() for w in words] if self._lowercase else words

  def _encode_ids(self, titles, max_length):
    segmented = [" ".join(self.words(t)) for t in titles]
    return self._pieces._encode_ids(segmented, max_length)  # pylint: disable=protected-access

  def tokenize(self, title):
    return self._pieces.tokenize(" ".join(self.words(normalize_title(title))))

  def convert_ids_to_tokens(self, ids):
    return self._pieces.convert_ids_to_tokens(ids)

  @property
  def vocab_size(self):
    return self._pieces.vocab_size


class SentencePieceTokenizer(TitleTokenizer):
  """A SentencePiece model with BERT-style ``[CLS]``/``[SEP]`` framing.

  Uses ``[CLS]``/``[SEP]``/``[PAD]`` pieces when the model has them, else
  ``<s>``/``</s>``/``<pad>``, else its BOS/EOS ids.
  """

  def __init__(self, model_file: pathlib.Path):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
      raise CheckpointError(f"{model_file}: not a SentencePiece model ({e})"
                            ) from e
    self.files = [model_file]

    def piece(*candidates: str) -> int:
      for c in candidates:
        i = self._sp.piece_to_id(c)
        if i != self._sp.unk_id() or c == "<unk>":
          return i
      return -1

    self._cls = piece("[CLS]", "<s>")
    self._sep = piece("[SEP]", "</s>")
    self._cls = self._sp.bos_id() if self._cls < 0 else self._cls
    self._sep = self._sp.eos_id() if self._sep < 0 else self._sep
    if self._cls < 0 or self._sep < 0:
      raise CheckpointError(f"{model_file}: has neither [CLS]/[SEP] pieces "
                            "nor BOS/EOS ids to frame a title")
    pad = piece("[PAD]", "<pad>")
    self.pad_id = pad if pad >= 0 else max(self._sp.pad_id(), 0)

  def _encode_ids(self, titles, max_length):
    keep = max_length - 2
    return [[self._cls, *ids[:keep], self._sep]
            for ids in self._sp.encode(titles)]

  def tokenize(self, title):
    return self._sp.encode(normalize_title(title), out_type=str)

  def convert_ids_to_tokens(self, ids):
    return [self._sp.id_to_piece(int(i)) for i in ids]

  @property
  def vocab_size(self):
    return self._sp.get_piece_size()


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.exists():
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def load_tokenizer(path_or_hub_id: str | os.PathLike[str]) -> TitleTokenizer:
  """Builds the tokenizer a checkpoint directory (or hub id) describes.

  Args:
    path_or_hub_id: a tokenizer/checkpoint directory, a ``.model``
      SentencePiece file, a ``tokenizer.json`` file, or a hub id.

  Raises:
    CheckpointError: nothing usable in the directory, or a setting that is
      not supported; the message names the file.
  """
  path = pathlib.Path(os.fspath(path_or_hub_id)).expanduser()
  if path.is_file() and path.suffix == ".model":
    return SentencePieceTokenizer(path)
  if path.is_file() and path.name == "tokenizer.json":
    return FastTokenizer(tokenizers.Tokenizer.from_file(str(path)), [path])
  directory = resolve_dir(path_or_hub_id, what="tokenizer")
  config_file = directory / "tokenizer_config.json"
  config = _read_json(config_file)
  vocab = directory / "vocab.txt"
  files = [f for f in (config_file, vocab, directory / "special_tokens_map.json")
           if f.exists()]
  lowercase = bool(config.get("do_lower_case", True))

  japanese = (config.get("word_tokenizer_type") == "mecab" or
              config.get("tokenizer_class") == "BertJapaneseTokenizer")
  if japanese:
    word_type = config.get("word_tokenizer_type", "mecab")
    if word_type != "mecab":
      raise CheckpointError(f"{config_file}: word_tokenizer_type "
                            f"{word_type!r} is not supported (only mecab)")
    if not vocab.exists():
      raise CheckpointError(f"{vocab}: missing; a MeCab tokenizer needs it")
    mecab = config.get("mecab_kwargs") or {}
    return MecabTokenizer(
        vocab, files, dictionary=mecab.get("mecab_dic") or "ipadic",
        lowercase=bool(config.get("do_lower_case", False)),
        subword=config.get("subword_tokenizer_type", "wordpiece"),
        mecab_option=mecab.get("mecab_option") or "")

  fast = directory / "tokenizer.json"
  if fast.exists():
    try:
      tok = tokenizers.Tokenizer.from_file(str(fast))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{fast}: cannot be read ({e})") from e
    return FastTokenizer(tok, [fast, *files])
  if vocab.exists():
    strip = config.get("strip_accents")
    return FastTokenizer(_wordpiece(
        vocab, lowercase=lowercase, strip_accents=strip,
        chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        basic_split=True), files)
  spm_files = sorted(directory.glob("*.model"))
  if spm_files:
    return SentencePieceTokenizer(spm_files[0])
  raise CheckpointError(
      f"{directory}: no tokenizer found (expected tokenizer.json, vocab.txt, "
      "a SentencePiece *.model, or a tokenizer_config.json for MeCab)")
