"""Experts: who labels the student's states, behind one interface.

  oracle  the task's own program: the right continuation from any state, as top-k targets (host side)
  http    an OpenAI-compatible completions endpoint (vLLM, SGLang) that scores the student's response under the
          feedback prompt and returns top-k log-probs per position (host side)
  self    the student itself, re-prompted with the feedback (live parameters or an EMA copy, as SDPO does)
  model   a separate teacher with the same vocabulary, loaded from a Hugging Face checkpoint
For `self` and `model` the teacher's logits never leave the device: `label` only writes the re-prompt tokens, and the
train step runs the teacher forward and the fused loss together (`HiddenTeacher`).

The re-prompt carries a successful sibling response when the group has one, the environment's feedback otherwise;
a sample with neither is masked out of the loss. Siblings come from the *other half* of the group only: the loss's
leave-one-out baseline for a row is taken within its own half (`losses.leave_one_out(parts=2)`), so no row's
baseline can depend on the row's own response through the feedback it gave a sibling.

`label(rollouts)` returns (arrays for the buffer, figures for the metrics).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import time
import urllib.error
import urllib.request

import numpy as np

from distil_jax.tasks.base import Problem, Verdict
from distil_jax.tokenizer import Tokenizer

SIBLING = "A correct solution: "  # how a successful sibling response is put in the re-prompt


class ExpertError(RuntimeError):
  """An expert could not label a batch; the message names the expert and the cause."""


@dataclasses.dataclass
class Rollouts:
  """One iteration's samples, host side: Bp prompts x G responses of up to N tokens."""

  problems: list[Problem]
  prompt_tokens: np.ndarray  # [Bp,P] int32, left-padded
  prompt_mask: np.ndarray  # [Bp,P]
  tokens: np.ndarray  # [Bp,G,N] int32, pad after EOS
  mask: np.ndarray  # [Bp,G,N] 1 on response tokens (EOS included)
  logprobs: np.ndarray  # [Bp,G,N] behaviour log-probs
  texts: list[list[str]]
  verdicts: list[list[Verdict]]


def left_pad_rows(rows: list[list[int]], width: int, pad_id: int):
  """(tokens, mask) [len(rows), width], each row flush right. A row longer than `width` is an error: cutting its
  beginning would train on a prompt other than the one sampled (callers that can drop a row check first)."""
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if len(r) > width:
      raise ValueError(f"a prompt row of {len(r)} tokens does not fit the {width} reserved for it")
    if r:
      tokens[i, width - len(r) :] = r
      mask[i, width - len(r) :] = 1
  return tokens, mask


def sibling_half(i: int, group_size: int) -> range:
  """The rows whose responses row i may be shown: the other half of its group (see the module docstring)."""
  half = group_size // 2
  return range(half, group_size) if i < half else range(half)


def reprompt_texts(rollouts: Rollouts, template: str, sibling_only: bool = False):
  """(the feedback prompt of every response, [Bp,G] which responses the expert labels).

  The feedback is a correct response from the other half of the group when there is one, else the verifier's own
  feedback. With `sibling_only`, responses without such a sibling go unlabelled: a small student re-prompted with a
  verdict alone can be a worse policy than the student (experiments/teacher_quality.py), and distilling it then does
  harm. Whether row i is labelled, and what it is shown, never depends on the other rows of its own half.
  """
  texts, valid = [], np.zeros(rollouts.tokens.shape[:2], np.int32)
  for g, (problem, verdicts) in enumerate(zip(rollouts.problems, rollouts.verdicts, strict=True)):
    row = []
    for i, verdict in enumerate(verdicts):
      others = sibling_half(i, len(verdicts))
      sibling = next((rollouts.texts[g][j] for j in others if verdicts[j].correct), None)
      feedback = SIBLING + sibling if sibling is not None else verdict.feedback
      valid[g, i] = bool(feedback) and (sibling is not None or not sibling_only)
      row.append(template.format(prompt=problem.prompt, feedback=feedback))
    texts.append(row)
  return texts, valid


class OracleExpert:
  """Top-k targets from the task's oracle: mass 1 - smoothing on the token that starts the oracle's continuation
  (the longest vocabulary piece that is a prefix of it, or EOS when the oracle says stop), the rest in the tail."""

  on_device = False
  reads_siblings = False

  def __init__(self, oracle, tokenizer: Tokenizer, top_k: int, smoothing: float):
    if oracle is None:
      raise ExpertError("expert.kind='oracle' needs a task with an oracle (built-in tasks; not data files)")
    if not 0 < smoothing < 1:
      raise ExpertError(f"expert.smoothing={smoothing} must be in (0, 1): reverse KL needs full support")
    self.oracle, self.tok, self.top_k = oracle, tokenizer, top_k
    self.logq = math.log1p(-smoothing)
    self.piece = {}
    for i, s in enumerate(tokenizer.surfaces):
      if s and i != tokenizer.eos_id:
        self.piece.setdefault(s, i)
    self.longest = max(len(s) for s in self.piece)

  def next_token(self, problem: Problem, prefix: str) -> int:
    cont = self.oracle.continuation(problem, prefix)
    if not cont:
      return self.tok.eos_id
    for n in range(min(self.longest, len(cont)), 0, -1):
      if cont[:n] in self.piece:
        return self.piece[cont[:n]]
    raise ExpertError(f"oracle continuation {cont[:20]!r} starts with a character the tokenizer cannot write")

  def label(self, r: Rollouts) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    bp, g, n = r.tokens.shape
    ids = np.zeros((bp, g, n, self.top_k), np.int32)
    logq = np.full((bp, g, n, self.top_k), -np.inf, np.float32)
    surfaces = self.tok.surfaces
    for b in range(bp):
      for j in range(g):
        prefix = ""
        for t in range(int(r.mask[b, j].sum())):
          ids[b, j, t, 0] = self.next_token(r.problems[b], prefix)
          logq[b, j, t, 0] = self.logq
          prefix += surfaces[r.tokens[b, j, t]]
    return {"target_ids": ids, "target_logprobs": logq}, {}


class DeviceExpert:
  """`self` and `model`: only the re-prompt tokens are stored; the teacher runs inside the train step.

  A re-prompt longer than `max_prompt_tokens` is not cut (that would hide the question from the teacher): the
  response goes unlabelled and is counted in `rollout/teacher_truncated`.
  """

  on_device = True
  reads_siblings = True

  def __init__(self, tokenizer: Tokenizer, template: str, max_prompt_tokens: int, sibling_only=False, add_bos=False):
    self.tok, self.template, self.width, self.sibling_only = tokenizer, template, max_prompt_tokens, sibling_only
    self.add_bos = add_bos

  def label(self, r: Rollouts) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    texts, valid = reprompt_texts(r, self.template, self.sibling_only)
    bp, g = valid.shape
    flat = [self.tok.prompt_ids(t, self.add_bos) for row in texts for t in row]
    fits = np.array([len(ids) <= self.width for ids in flat]).reshape(bp, g)
    tokens, mask = left_pad_rows([ids if ok else [] for ids, ok in zip(flat, fits.flat, strict=True)], self.width, 0)
    tokens[mask == 0] = self.tok.pad_id
    labels = {
      "teacher_tokens": tokens.reshape(bp, g, -1),
      "teacher_mask": mask.reshape(bp, g, -1),
      "teacher_valid": (valid * fits).astype(np.int32),
    }
    return labels, {"rollout/teacher_truncated": float(np.mean(~fits))}


class HttpExpert:
  """An OpenAI-compatible /v1/completions endpoint scoring prompt + response with `echo` and top-k `logprobs`.

  Requests send token ids (vLLM accepts them as the prompt) and ask for `return_tokens_as_token_ids`, so no text
  round trip can shift positions. At start, `/tokenize` on a probe text must give our tokenizer's ids.
  """

  on_device = False
  reads_siblings = True

  def __init__(self, tokenizer: Tokenizer, cfg, add_bos: bool = False):
    self.tok, self.cfg, self.add_bos = tokenizer, cfg, add_bos
    self.url = cfg.url.rstrip("/")
    self.top_k = cfg.top_k
    self._check_tokenizer()

  def _post(self, path: str, payload: dict) -> dict:
    url = self.url + path
    body = json.dumps(payload).encode()
    last = None
    for attempt in range(self.cfg.max_retries + 1):
      if attempt:
        time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
      try:
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
          raw = resp.read()
      except urllib.error.HTTPError as e:
        if e.code < 500:
          raise ExpertError(f"expert {url}: HTTP {e.code}: {e.read()[:200]!r}") from None
        last = f"HTTP {e.code}"
        continue
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        continue
      try:
        return json.loads(raw)
      except json.JSONDecodeError as e:
        raise ExpertError(f"expert {url}: reply is not valid JSON ({e.msg}): {raw[:200]!r}") from None
    raise ExpertError(f"expert {url}: no answer after {self.cfg.max_retries + 1} tries ({last})")

  def _check_tokenizer(self):
    probe = self.cfg.tokenizer_probe
    reply = self._post("/tokenize", {"model": self.cfg.model_name, "prompt": probe, "add_special_tokens": False})
    theirs = reply.get("tokens") if isinstance(reply, dict) else None
    ours = self.tok.encode(probe)
    if theirs != ours:
      raise ExpertError(
        f"expert {self.url} tokenizes differently from the student: {probe!r} -> {theirs} there, {ours} here "
        f"(student vocabulary {self.tok.vocab_size}); the expert must share the student's tokenizer"
      )

  def _score(self, teacher_ids: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray]:
    payload = {
      "model": self.cfg.model_name,
      "prompt": teacher_ids + response,
      "max_tokens": 1,
      "echo": True,
      "logprobs": self.top_k,
      "temperature": 1.0,
      "return_tokens_as_token_ids": True,
    }
    reply = self._post("/v1/completions", payload)
    try:
      top = reply["choices"][0]["logprobs"]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
      raise ExpertError(
        f"expert {self.url}: reply has no choices[0].logprobs.top_logprobs: {json.dumps(reply)[:200]}"
      ) from None
    n = len(response)
    ids = np.zeros((n, self.top_k), np.int32)
    logq = np.full((n, self.top_k), -np.inf, np.float32)
    start = len(teacher_ids)
    if len(top) < start + n:
      raise ExpertError(f"expert {self.url}: {len(top)} positions scored, expected at least {start + n}")
    for t in range(n):
      entries = sorted((top[start + t] or {}).items(), key=lambda kv: -kv[1])[: self.top_k]
      for k, (token, lp) in enumerate(entries):
        if not token.startswith("token_id:"):
          raise ExpertError(
            f"expert {self.url}: top_logprobs key {token!r} is not 'token_id:N'; "
            "the server must support return_tokens_as_token_ids"
          )
        tid = int(token.split(":", 1)[1])
        if not 0 <= tid < self.tok.vocab_size:
          raise ExpertError(
            f"expert {self.url}: token id {tid} outside the student's vocabulary ({self.tok.vocab_size})"
          )
        ids[t, k], logq[t, k] = tid, lp
    return ids, logq

  def label(self, r: Rollouts) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    texts, _ = reprompt_texts(r, self.cfg.reprompt)
    bp, g, n = r.tokens.shape
    ids = np.zeros((bp, g, n, self.top_k), np.int32)
    logq = np.full((bp, g, n, self.top_k), -np.inf, np.float32)
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(self.cfg.concurrency) as pool:
      for b in range(bp):
        for j in range(g):
          length = int(r.mask[b, j].sum())
          teacher = self.tok.prompt_ids(texts[b][j], self.add_bos)
          jobs[pool.submit(self._score, teacher, r.tokens[b, j, :length].tolist())] = (b, j, length)
      for fut in concurrent.futures.as_completed(jobs):
        b, j, length = jobs[fut]
        ids[b, j, :length], logq[b, j, :length] = fut.result()
    return {"target_ids": ids, "target_logprobs": logq}, {}


def make_expert(cfg, task, tokenizer: Tokenizer, add_bos: bool = False):
  """The host-side labeller for `cfg.kind` (the config's `expert` section); `add_bos` as the student's prompts."""
  if cfg.kind == "oracle":
    return OracleExpert(task.oracle, tokenizer, cfg.top_k, cfg.smoothing)
  if cfg.feedback not in ("any", "sibling"):
    raise ValueError(f"expert.feedback={cfg.feedback!r}; expected 'any' or 'sibling'")
  if cfg.kind in ("self", "model"):
    return DeviceExpert(tokenizer, cfg.reprompt, cfg.max_prompt_tokens, cfg.feedback == "sibling", add_bos)
  if cfg.feedback == "sibling":
    raise ValueError(f"expert.feedback='sibling' needs a device expert (self or model), not {cfg.kind!r}")
  if cfg.kind == "http":
    return HttpExpert(tokenizer, cfg, add_bos)
  raise ValueError(f"expert.kind={cfg.kind!r}; expected one of oracle, self, model, http")
