"""Title tokenizers against Hugging Face's reference tokenizers."""

import json
import pathlib
import unicodedata

import numpy as np
import pytest

from mic_jax.checkpoints import CheckpointError
from mic_jax.text import load_tokenizer, normalize_title, title_group_key

transformers = pytest.importorskip("transformers")

JAPANESE_TITLES = [
    "伊藤園 お〜いお茶 緑茶 525ml×24本",
    "【送料無料】サントリー 天然水 ２Ｌ×９本",
    "キリン 午後の紅茶 ミルクティー 500ml ペットボトル",
    "アサヒ スーパードライ 350ml 缶 24本入 ケース販売 まとめ買い お買い得 ビール",
    "",
]


def _japanese_vocab(tmp_path: pathlib.Path, dictionary: str) -> list[str]:
  """A vocabulary built from MeCab's words: whole words for half of them,
  the others only as characters and ``##`` pieces, so WordPiece must split."""
  import fugashi  # pylint: disable=g-import-not-at-top
  if dictionary == "ipadic":
    import ipadic  # pylint: disable=g-import-not-at-top
    tagger = fugashi.GenericTagger(ipadic.MECAB_ARGS)
  else:
    import unidic_lite  # pylint: disable=g-import-not-at-top
    tagger = fugashi.GenericTagger(
        f'-d "{unidic_lite.DICDIR}" -r "{unidic_lite.DICDIR}/mecabrc"')
  words = sorted({n.surface for t in JAPANESE_TITLES
                  for n in tagger(unicodedata.normalize("NFKC", t))})
  chars = sorted({c for w in words for c in w})
  vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[::2] +
           chars + ["##" + c for c in chars])
  vocab = list(dict.fromkeys(vocab))
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  return vocab


@pytest.mark.parametrize("dictionary", ["ipadic", "unidic_lite"])
def test_japanese_mecab_wordpiece_matches_hf(tmp_path, dictionary):
  _japanese_vocab(tmp_path, dictionary)
  config = {"tokenizer_class": "BertJapaneseTokenizer", "do_lower_case": False,
            "word_tokenizer_type": "mecab",
            "subword_tokenizer_type": "wordpiece"}
  if dictionary != "ipadic":
    config["mecab_kwargs"] = {"mecab_dic": dictionary}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

  tok = load_tokenizer(tmp_path)
  assert tok.dictionary == dictionary  # The hub-style config is honoured.
  batch = tok.encode_batch(JAPANESE_TITLES, max_length=16)

  ref = transformers.BertJapaneseTokenizer(
      vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=False,
      word_tokenizer_type="mecab", subword_tokenizer_type="wordpiece",
      mecab_kwargs={"mecab_dic": dictionary})
  expected = ref(JAPANESE_TITLES, max_length=16, padding="max_length",
                 truncation=True)
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    assert batch[key].dtype == np.int32 and batch[key].shape == (5, 16)
  for key in ("input_ids", "attention_mask"):
    np.testing.assert_array_equal(batch[key], np.array(expected[key]), key)
  assert (batch["token_type_ids"] == 0).all()

  # MeCab segmentation happened: 午後の紅茶 is several words, and pieces
  # continue with ##.
  pieces = tok.tokenize(JAPANESE_TITLES[2])
  assert "午後" in pieces or "午" in pieces
  assert any(p.startswith("##") for p in tok.tokenize(JAPANESE_TITLES[0]))
  # Ids round-trip to the tokens.
  row = batch["input_ids"][1][batch["attention_mask"][1] == 1]
  assert tok.convert_ids_to_tokens(row) == (
      ["[CLS]"] + tok.tokenize(JAPANESE_TITLES[1])[:14] + ["[SEP]"])
  # Truncation keeps [SEP]; padding is [PAD] with mask 0; empty -> [CLS][SEP].
  assert batch["attention_mask"][3].sum() == 16
  assert tok.convert_ids_to_tokens(batch["input_ids"][3][-1:]) == ["[SEP]"]
  assert batch["attention_mask"][4].sum() == 2
  assert (batch["input_ids"][4][2:] == 0).all()


def test_dictionaries_segment_differently(tmp_path):
  """ipadic and unidic-lite give different words: the choice is real."""
  _japanese_vocab(tmp_path, "ipadic")
  words = {}
  for dic in ("ipadic", "unidic_lite"):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "word_tokenizer_type": "mecab", "mecab_kwargs": {"mecab_dic": dic}}))
    tok = load_tokenizer(tmp_path)
    words[dic] = [tok.words(normalize_title(t)) for t in JAPANESE_TITLES]
  assert words["ipadic"] != words["unidic_lite"]


def test_wordpiece_minilm_matches_hf_fast_tokenizer(minilm_dir):
  titles = ["Nike Men Blue Casual T-shirt", "", "Puma Women's Running Shoes "
            "with an extremely long name that goes on and on and on",
            "Fabindia  Kurta\twith  spaces", "ADIDAS Originals TRACK-PANTS"]
  tok = load_tokenizer(minilm_dir)
  batch = tok.encode_batch(titles, max_length=12)
  ref = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  expected = ref(titles, max_length=12, padding="max_length", truncation=True)
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(batch[key], np.array(expected[key]), key)


def test_vocab_only_directory_builds_bert_wordpiece(tmp_path, minilm_dir):
  """vocab.txt + tokenizer_config.json (no tokenizer.json) gives the same ids."""
  for name in ("vocab.txt", "tokenizer_config.json"):
    (tmp_path / name).write_bytes((minilm_dir / name).read_bytes())
  titles = ["Nike Men Blue Casual T-shirt", "Café crème BRÛLÉE"]
  ours = load_tokenizer(tmp_path).encode_batch(titles, max_length=16)
  ref = load_tokenizer(minilm_dir).encode_batch(titles, max_length=16)
  np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])


def test_sentencepiece_model(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["blue cotton shirt for men", "red silk dress",
                               "running shoes black", "leather wallet brown"]
                              * 50))
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=30,
      user_defined_symbols=["[CLS]", "[SEP]"], pad_id=3, pad_piece="[PAD]",
      bos_id=-1, eos_id=-1)
  tok = load_tokenizer(tmp_path / "sp.model")
  batch = tok.encode_batch(["blue silk shirt"], max_length=24)
  pieces = tok.convert_ids_to_tokens(batch["input_ids"][0])
  n = batch["attention_mask"][0].sum()
  assert pieces[:n] == ["[CLS]", *tok.tokenize("blue silk shirt"), "[SEP]"]
  assert set(pieces[n:]) == {"[PAD]"} and n < 24
  long = tok.encode_batch(["a" * 100], max_length=8)
  assert long["attention_mask"][0].sum() == 8
  assert tok.convert_ids_to_tokens(long["input_ids"][0][-1:]) == ["[SEP]"]


def test_normalization_is_nfkc_and_whitespace():
  assert normalize_title("ＡＢＣ　 525ｍｌ\t×24本 ") == "ABC 525ml ×24本"
  assert normalize_title("zero\u200bwidth\x00 ctrl") == "zerowidth ctrl"
  assert normalize_title("  plain  ascii ") == "plain ascii"
  assert title_group_key("Nike  SHIRT") == title_group_key("nike shirt")


def test_full_width_titles_tokenize_like_half_width(minilm_dir):
  tok = load_tokenizer(minilm_dir)
  a = tok.encode_batch(["ＮＩＫＥ　Ｔ－ｓｈｉｒｔ"], 16)["input_ids"]
  b = tok.encode_batch(["NIKE T-shirt"], 16)["input_ids"]
  np.testing.assert_array_equal(a, b)


def test_bad_tokenizer_inputs(tmp_path):
  with pytest.raises(CheckpointError, match="no tokenizer found"):
    load_tokenizer(tmp_path)
  with pytest.raises(CheckpointError, match="missing-dir"):
    load_tokenizer(tmp_path / "missing-dir")
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="tokenizer_config.json"):
    load_tokenizer(tmp_path)


def test_encode_batch_argument_errors(minilm_dir):
  tok = load_tokenizer(minilm_dir)
  with pytest.raises(TypeError, match="list of titles"):
    tok.encode_batch("one title", 8)
  with pytest.raises(ValueError, match="max_length"):
    tok.encode_batch(["x"], 1)
  with pytest.raises(TypeError, match="title must be str"):
    tok.encode_batch([None], 8)
