"""Chat templates against transformers' `apply_chat_template` (the reference), on four families' templates kept here
as text, and the teacher's re-prompt: the same conversation with the feedback in the user's turn."""

import json

import numpy as np
import pytest
import transformers

from distil_jax import experts
from distil_jax import tokenizer as tok_lib
from distil_jax.tasks.base import Problem, Verdict

SMOLLM2 = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
  "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN3 = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning_content %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') }}
            {{- '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be user or assistant') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
TEMPLATES = {
  # name: (template, bos, eos, the id list generation_config.json gives)
  "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>", None),
  "qwen2": (QWEN2, None, "<|im_end|>", None),
  "qwen3": (QWEN3, None, "<|im_end|>", None),
  "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", ["<|end_of_text|>", "<|eom_id|>"]),
}
SPECIAL = [
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|begin_of_text|>",
  "<|end_of_text|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eot_id|>",
  "<|eom_id|>",
]
QUESTION = "Fay has 9 coins, triples them, loses 2. How many coins?\nPut the final answer in \\boxed{}."


def _checkpoint_folder(path, name):
  """A tokenizer.json (byte-level BPE with the families' special tokens) + tokenizer_config.json with `name`'s
  template, as a checkpoint brings them."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  template, bos, eos, gen_eos = TEMPLATES[name]
  hf = Tokenizer(models.BPE(unk_token=None))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  corpus = [QUESTION, "You are a helpful assistant. Cutting Knowledge Date: Today", "system user assistant"] * 20
  trainer = trainers.BpeTrainer(
    vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  hf.train_from_iterator(corpus, trainer)
  hf.save(str(path / "tokenizer.json"))
  config = {"eos_token": eos, "pad_token": "<|endoftext|>", "chat_template": template}
  if bos:
    config["bos_token"] = bos
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  if gen_eos:
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [hf.token_to_id(t) for t in gen_eos]}))
  return path, hf


@pytest.mark.parametrize("system", ["", "You are terse."])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompt_ids_equal_apply_chat_template(name, system, tmp_path):
  folder, _ = _checkpoint_folder(tmp_path, name)
  ours = tok_lib.load_tokenizer(str(folder), "auto", system)
  ref = transformers.AutoTokenizer.from_pretrained(str(folder))
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": QUESTION}]
  text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  ids = ref(text, add_special_tokens=False)["input_ids"]
  assert ours.prompt_text(QUESTION, add_bos=True) == text
  assert ours.prompt_ids(QUESTION, add_bos=True) == ids  # the template owns BOS: none is added on top
  assert ours.prompt_ids(QUESTION, add_bos=False) == ids


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_stop_id_ends_a_response(name, tmp_path):
  folder, hf = _checkpoint_folder(tmp_path, name)
  tok = tok_lib.load_tokenizer(str(folder))
  end_of_turn = {"llama3": "<|eot_id|>"}.get(name, "<|im_end|>")
  expected = {hf.token_to_id(TEMPLATES[name][2]), hf.token_to_id(end_of_turn)}
  expected |= {hf.token_to_id(t) for t in TEMPLATES[name][3] or []}
  assert set(tok.stop_ids) == expected
  words = tok.encode("Answer: 25")
  for stop in expected:
    assert tok.text_of(words + [stop] + words) == "Answer: 25"


def test_no_template_keeps_raw_prompts_and_bos(tmp_path):
  folder, hf = _checkpoint_folder(tmp_path, "smollm2")
  tok = tok_lib.load_tokenizer(str(folder), "none")
  assert tok.chat is None and tok.stop_ids == (hf.token_to_id("<|im_end|>"),)
  assert tok.prompt_ids("hi", add_bos=True) == [hf.token_to_id("<|im_start|>"), *tok.encode("hi")]
  assert tok.prompt_text("hi", add_bos=True) == "<|im_start|>hi"


def test_a_template_file_applies_to_any_tokenizer(tmp_path):
  folder, _ = _checkpoint_folder(tmp_path, "qwen2")
  (tmp_path / "mine.jinja").write_text(SMOLLM2)
  tok = tok_lib.load_tokenizer(str(folder), str(tmp_path / "mine.jinja"))
  assert tok.prompt_text("hi", False).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_teacher_reprompt_is_the_same_conversation_with_feedback_in_the_user_turn(tmp_path):
  """The re-prompt row differs from the student's only inside the user's turn: both end with the same assistant
  header, so the teacher scores the student's response tokens in exactly the student's context format."""
  folder, hf = _checkpoint_folder(tmp_path, "qwen2")
  tok = tok_lib.load_tokenizer(str(folder))
  problem = Problem(QUESTION, "25", "9*3=27 27-2=25 \\boxed{25}")
  texts = [["\\boxed{25}", "\\boxed{24}"], ["\\boxed{24}", "\\boxed{25}"]]
  verdicts = [[Verdict(t == "\\boxed{25}", "x") for t in row] for row in texts]
  tokens = np.zeros((1, 2, 4), np.int32)
  rollouts = experts.Rollouts([problem], None, None, tokens, np.ones_like(tokens), None, texts[:1], verdicts[:1])
  expert = experts.DeviceExpert(tok, "{prompt}\n\nFeedback: {feedback}", 256, feedback="sibling")
  labels, _ = expert.label(rollouts)
  assert labels["teacher_valid"].tolist() == [[0, 1]]  # row 1 is shown row 0's correct response
  row = labels["teacher_tokens"][0, 1][labels["teacher_mask"][0, 1] == 1].tolist()
  student = tok.prompt_ids(QUESTION, add_bos=False)
  header = hf.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
  assert row[-len(header) :] == header and student[-len(header) :] == header
  user = hf.encode("<|im_start|>user\n", add_special_tokens=False).ids
  start = next(i for i in range(len(row)) if row[i : i + len(user)] == user) + len(user)
  assert row[:start] == student[:start]  # the same system turn and user header
  text = hf.decode(row[start : -len(header)], skip_special_tokens=False)
  assert text == f"{QUESTION}\n\nFeedback: {experts.SIBLING}\\boxed{{25}}"
  reference = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
  )
  assert row == hf.encode(reference, add_special_tokens=False).ids
