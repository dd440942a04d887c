"""One small tokenizer interface over SentencePiece and Hugging Face `tokenizer.json`.

Built-in tasks train a SentencePiece model on their own text (no hub needed). It is trained with identity
normalisation and no dummy prefix, so that the concatenated surface strings of a token sequence are exactly its
text: the oracle experts work on text and map continuations back to tokens through `surfaces`.
Real checkpoints (Qwen, Llama-3) bring a `tokenizer.json`, read with the `tokenizers` package.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence

from distil_jax import chat as chat_lib
from distil_jax.errors import InputError


class Tokenizer:
  """What the rest of the library needs from a tokenizer, and how a prompt becomes ids (`chat`: the checkpoint's
  chat template, or None for raw text)."""

  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: int | None
  chat: chat_lib.ChatTemplate | None = None
  extra_stop_ids: tuple[int, ...] = ()  # generation_config.json's other EOS ids

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def _surface(self, i: int) -> str:
    raise NotImplementedError

  @functools.cached_property
  def surfaces(self) -> list[str]:
    """The text each token id stands for on its own ('' for control tokens)."""
    return [self._surface(i) for i in range(self.vocab_size)]

  @functools.cached_property
  def fingerprint(self) -> str:
    """A short hash of the vocabulary, to tell two tokenizers apart without comparing them piece by piece."""
    digest = hashlib.sha256("\x00".join(self.surfaces).encode()).hexdigest()[:16]
    return f"{self.vocab_size}:{digest}"

  def prompt_text(self, text: str, add_bos: bool) -> str:
    """The text a prompt row holds, special tokens included: the chat template's one user turn and assistant header,
    else `text` after the BOS piece (config `tokenizer.add_bos`)."""
    if self.chat is not None:
      return self.chat.prompt(text)
    return (self._bos_piece() if add_bos and self.bos_id is not None else "") + text

  def prompt_ids(self, text: str, add_bos: bool) -> list[int]:
    """The ids of a prompt row, the student's or a teacher's re-prompt: the one place the template is applied and
    BOS added, so that the expert reads the same format as the student. A template owns its special tokens: no
    BOS is added to it."""
    if self.chat is not None:
      return self.encode(self.chat.prompt(text))
    return ([self.bos_id] if add_bos and self.bos_id is not None else []) + self.encode(text)

  def _bos_piece(self) -> str:
    return ""

  @functools.cached_property
  def stop_ids(self) -> tuple[int, ...]:
    """Every id that ends a response: EOS, generation_config.json's other EOS ids, and the special token the chat
    template writes after an assistant's text (Llama-3 Instruct: <|eot_id|> beside <|end_of_text|>)."""
    ids = {self.eos_id, *self.extra_stop_ids}
    if self.chat is not None:
      end = self.encode(self.chat.end_of_turn())
      if end and self._surface(end[0]) == "":  # a special token, not text such as a newline
        ids.add(end[0])
    return tuple(sorted(i for i in ids if 0 <= i < self.vocab_size))

  def text_of(self, ids: Sequence[int]) -> str:
    """Text of a sampled response: the surfaces concatenated, stopping at the first stop id."""
    stops, out = set(self.stop_ids), []
    for i in ids:
      if i in stops:
        break
      out.append(self.surfaces[i])
    return "".join(out)


class SentencePieceTokenizer(Tokenizer):
  def __init__(self, model_proto: bytes):
    import sentencepiece as spm

    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = max(self._sp.pad_id(), 0)
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    if self.eos_id < 0:
      raise InputError("SentencePiece model has no EOS piece; train it with eos_id >= 0")

  @classmethod
  def from_file(cls, path: str) -> SentencePieceTokenizer:
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return cls(proto)
    except RuntimeError as e:  # sentencepiece's "INTERNAL: ... ParseFromArray" for a damaged file
      why = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
      raise InputError(f"{path}: not a SentencePiece model, the file is damaged ({why})") from None

  def save(self, path: str) -> None:
    with open(path, "wb") as f:
      f.write(self.model_proto)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def _bos_piece(self) -> str:
    return self._sp.id_to_piece(self.bos_id)

  def _surface(self, i: int) -> str:
    if self._sp.is_control(i) or self._sp.is_unknown(i):
      return ""
    return self._sp.decode([i])


def train_sentencepiece(
  texts: Iterable[str], vocab_size: int = 256, model_type: str = "char", split_digits: bool = True
):
  """Train a SentencePiece model in memory. `char` gives one token per character; `unigram` with `split_digits`
  gives word pieces for prose but one token per digit, so arithmetic stays character-level while prompts shrink."""
  import sentencepiece as spm

  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=writer,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=1.0,
    hard_vocab_limit=False,  # a small corpus caps the vocabulary
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    allow_whitespace_only_pieces=True,
    split_digits=split_digits,
    user_defined_symbols=["\n"],  # the trainer reads line by line and would drop newlines otherwise
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    minloglevel=2,
  )
  return SentencePieceTokenizer(writer.getvalue())


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (via `tokenizers`), with EOS / pad from the files beside it."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _Tok

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    try:
      self._tok = _Tok.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
      why = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
      raise InputError(f"{file}: not a Hugging Face tokenizer.json, the file is damaged ({why})") from None
    folder = os.path.dirname(file)
    special = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      if os.path.exists(os.path.join(folder, name)):
        with open(os.path.join(folder, name)) as f:
          special.update({k: v for k, v in json.load(f).items() if k.endswith("_token")})

    def token_id(key):
      tok = special.get(key)
      tok = tok.get("content") if isinstance(tok, dict) else tok
      return None if tok is None else self._tok.token_to_id(tok)

    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    eos = token_id("eos_token")
    if eos is None:
      raise InputError(f"{folder}: no eos_token in tokenizer_config.json / special_tokens_map.json")
    self.eos_id = eos
    self.bos_id = token_id("bos_token")
    pad = token_id("pad_token")
    self.pad_id = eos if pad is None else pad
    self.extra_stop_ids = _config_eos_ids(folder)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def _bos_piece(self) -> str:
    return self._tok.id_to_token(self.bos_id)

  def _surface(self, i: int) -> str:
    return self._tok.decode([i], skip_special_tokens=True)


def _config_eos_ids(folder: str) -> tuple[int, ...]:
  """The EOS ids of generation_config.json and config.json (an int or a list: Llama-3 Instruct lists three)."""
  ids = []
  for name in ("generation_config.json", "config.json"):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      with open(path) as f:
        eos = json.load(f).get("eos_token_id")
      ids += [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
  return tuple(ids)


def load_tokenizer(path: str, chat_template: str = "auto", system_prompt: str = "") -> Tokenizer:
  """A `.model` file (SentencePiece) or a folder / file with `tokenizer.json` (Hugging Face), with the chat
  template `chat_template` names (`chat.load`: "auto" is the checkpoint's own, if it has one)."""
  tok = _load(path)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  return with_chat(tok, chat_template, folder, system_prompt)


def with_chat(tok: Tokenizer, chat_template: str, folder: str | None, system_prompt: str = "") -> Tokenizer:
  """`tok` with the chat template that config `tokenizer.chat_template` names (tokenizers trained here have none
  of their own; a path applies to any tokenizer)."""
  tok.chat = chat_lib.load(chat_template, folder, system_prompt)
  if tok.chat is None and system_prompt:
    raise InputError("tokenizer.system_prompt is set but there is no chat template to put it in")
  tok.__dict__.pop("stop_ids", None)  # the template's end-of-turn token is one
  return tok


def _load(path: str) -> Tokenizer:
  if path.endswith(".model"):
    return SentencePieceTokenizer.from_file(path)
  if (
    os.path.isdir(path)
    and os.path.exists(os.path.join(path, "tokenizer.model"))
    and not os.path.exists(os.path.join(path, "tokenizer.json"))
  ):
    return SentencePieceTokenizer.from_file(os.path.join(path, "tokenizer.model"))
  return HFTokenizer(path)
