"""Tokenizers: SentencePiece trained here and a Hugging Face tokenizer.json, both round-trip text."""

import json

import numpy as np
import pytest

from distil_jax import tokenizer as tok_lib


def _corpus(n=300, seed=0):
  rng = np.random.default_rng(seed)
  words = ["apples", "Ann", "has", "gets", "more", "eats", "How", "many?", "Answer:", "then", "triples"]
  out = []
  for _ in range(n):
    a, b = rng.integers(0, 100, 2)
    out.append(f"{rng.choice(words)} {a}+{b}={a + b} {' '.join(rng.choice(words, 3))}.\n#{a + b}")
  return out


@pytest.mark.parametrize("model_type,size", [("char", 256), ("unigram", 120), ("bpe", 120)])
def test_sentencepiece_roundtrip(model_type, size, tmp_path):
  texts = _corpus()
  tok = tok_lib.train_sentencepiece(texts, vocab_size=size, model_type=model_type)
  assert tok.eos_id == 3 and tok.pad_id == 0
  for text in texts[:50] + ["Ann has 12 apples.\n#12"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.text_of(ids + [tok.eos_id, 7, 7]) == text  # surfaces concatenate to the text, EOS ends it
  tok.save(str(tmp_path / "t.model"))
  again = tok_lib.load_tokenizer(str(tmp_path / "t.model"))
  assert again.fingerprint == tok.fingerprint and again.encode(texts[0]) == tok.encode(texts[0])
  if model_type == "char":
    assert all(len(s) <= 1 for s in tok.surfaces)


def test_fingerprints_differ_between_vocabularies():
  a = tok_lib.train_sentencepiece(_corpus(seed=0), vocab_size=120, model_type="unigram")
  b = tok_lib.train_sentencepiece(_corpus(seed=0), vocab_size=120, model_type="bpe")
  c = tok_lib.train_sentencepiece(_corpus(seed=0), vocab_size=120, model_type="unigram")
  assert a.fingerprint != b.fingerprint and a.fingerprint == c.fingerprint


def test_hf_tokenizer_json_roundtrip(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  hf = Tokenizer(models.BPE(unk_token=None))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(
    _corpus(),
    trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ),
  )
  hf.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))
  tok = tok_lib.load_tokenizer(str(tmp_path))
  assert tok.eos_id == hf.token_to_id("<|endoftext|>") and tok.pad_id == hf.token_to_id("<|pad|>")
  for text in _corpus(20, seed=1) + ["naïve café 3×4"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_a_damaged_tokenizer_file_is_named(tmp_path):
  good = tok_lib.train_sentencepiece(_corpus(60), 64, "char")
  path = tmp_path / "tokenizer.model"
  good.save(str(path))
  path.write_bytes(path.read_bytes()[:40] + b"\xff\x00garbage" * 8)
  with pytest.raises(tok_lib.InputError, match=rf"^{path}: not a SentencePiece model, the file is damaged \("):
    tok_lib.load_tokenizer(str(path))
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
  with pytest.raises(tok_lib.InputError, match=r"tokenizer\.json: not a Hugging Face tokenizer\.json, the file is dam"):
    tok_lib.load_tokenizer(str(tmp_path))
