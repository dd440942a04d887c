"""Chat templates: the conversation an instruct checkpoint was tuned on, rendered as Hugging Face renders it.

An instruct model prompted with raw text writes a few tokens and stops; prompted through its template it answers.
The template is the checkpoint's own Jinja text (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`), rendered in the environment `transformers.apply_chat_template` uses (a sandbox, blocks
trimmed, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, the special tokens as variables),
so a prompt's ids equal `apply_chat_template([...], add_generation_prompt=True)`'s; the tests compare the two.

The student's prompt and every teacher's re-prompt are one user turn each, followed by the same assistant header
(`add_generation_prompt`): the feedback goes into the *user's* turn, never into the assistant's, so the teacher
scores exactly the tokens the student wrote, after exactly the header the student saw.
"""

from __future__ import annotations

import datetime
import functools
import json
import os

import jinja2
import jinja2.ext
import jinja2.sandbox

from distil_jax.errors import InputError

CHOICES = ("auto", "none")  # tokenizer.chat_template, besides a path to a .jinja file
_MARK = "\x00distil-jax-assistant\x00"  # stands for an assistant turn's text, to find what the template writes after it


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (templates that mark assistant text for training masks): rendered as
  its body, as transformers does when it is not asked for the mask."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


class ChatTemplate:
  """A compiled template with the variables the checkpoint's tokenizer gives it (`bos_token`, `eos_token`, ...)."""

  def __init__(self, source: str, special_tokens: dict[str, str], system_prompt: str = "", where: str = ""):
    self.source, self.special_tokens, self.system_prompt = source, dict(special_tokens), system_prompt
    try:
      self._template = _compile(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise InputError(f"{where or 'chat template'}:{e.lineno}: not a valid Jinja template ({e.message})") from None
    self.where = where

  def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    try:
      return self._template.render(
        messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
      )
    except jinja2.exceptions.TemplateError as e:
      raise InputError(f"{self.where or 'chat template'}: cannot render a conversation ({e})") from None

  def messages(self, user_text: str) -> list[dict]:
    system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
    return [*system, {"role": "user", "content": user_text}]

  def prompt(self, user_text: str) -> str:
    """The text the model reads before its answer: the conversation of one user turn, then the assistant header."""
    return self.render(self.messages(user_text), add_generation_prompt=True)

  def end_of_turn(self) -> str:
    """What the template writes right after an assistant's text ('<|im_end|>\\n', '<|eot_id|>', ...): its first
    special token ends a response, whatever the tokenizer calls EOS."""
    text = self.render([*self.messages("x"), {"role": "assistant", "content": _MARK}], add_generation_prompt=False)
    at = text.rfind(_MARK)
    return text[at + len(_MARK) :] if at >= 0 else ""


def _special_tokens(tokenizer_config: dict) -> dict[str, str]:
  out = {}
  for key, value in tokenizer_config.items():
    if key.endswith("_token"):
      value = value.get("content") if isinstance(value, dict) else value
      if isinstance(value, str):
        out[key] = value
  return out


def load(choice: str, folder: str | None, system_prompt: str = "") -> ChatTemplate | None:
  """The template `tokenizer.chat_template` names: "auto" (the checkpoint's own, or none when it has none), "none",
  or a path to a Jinja file (for any tokenizer)."""
  config = {}
  if folder and os.path.exists(os.path.join(folder, "tokenizer_config.json")):
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
      config = json.load(f)
  special = _special_tokens(config)
  if choice == "none":
    return None
  if choice != "auto":
    if not os.path.isfile(choice):
      raise InputError(f"tokenizer.chat_template={choice!r}: expected 'auto', 'none' or a path to a Jinja file")
    with open(choice) as f:
      return ChatTemplate(f.read(), special, system_prompt, where=choice)
  jinja_file = os.path.join(folder, "chat_template.jinja") if folder else ""
  if jinja_file and os.path.exists(jinja_file):
    with open(jinja_file) as f:
      return ChatTemplate(f.read(), special, system_prompt, where=jinja_file)
  source = config.get("chat_template")
  if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
    source = next((t.get("template") for t in source if t.get("name") == "default"), None)
  if isinstance(source, str):
    return ChatTemplate(source, special, system_prompt, where=os.path.join(folder, "tokenizer_config.json"))
  return None
