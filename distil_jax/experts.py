"""Experts: who labels the student's states, behind one interface.

  oracle  the task's own program: the right continuation from any state, as top-k targets (host side)
  http    an OpenAI-compatible completions endpoint (vLLM, SGLang) that scores the student's response under the
          feedback prompt and returns top-k log-probs per position (host side)
  self    the student itself, re-prompted with the feedback (live parameters or an EMA copy, as SDPO does)
  model   a separate teacher with the same vocabulary, loaded from a Hugging Face checkpoint
For `self` and `model` the teacher's logits never leave the device: `label` only writes the re-prompt tokens, and the
train step runs the teacher forward and the fused loss together (`HiddenTeacher`).

What the re-prompt carries (`expert.feedback`):
  any        a successful sibling response when the group has one, the environment's feedback otherwise; a sample
             with neither is masked out of the loss
  sibling    the same, but only responses shown a successful sibling are labelled
  reference  the task's reference solution and the verifier's verdict on this response (privileged information,
             OPSD's setting); no sibling is read
Siblings come from the *other half* of the group only: the loss's leave-one-out baseline for a row is taken within
its own half (`surrogate.leave_one_out(parts=2)`), so no row's baseline can depend on the row's own response through the
feedback it gave a sibling. With `reference` feedback no row reads another, and the baseline uses the whole group.

`label(rollouts)` returns (arrays for the buffer, figures for the metrics).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math

import numpy as np

from distil_jax import http_client
from distil_jax.errors import ExpertError  # noqa: F401  (re-exported: experts.ExpertError)
from distil_jax.tasks.base import Problem, Verdict
from distil_jax.tokenizer import Tokenizer

SIBLING = "A correct solution: "  # how a successful sibling response (or a reference solution) is put in the re-prompt
FEEDBACK = ("any", "sibling", "reference")  # expert.feedback


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


def reads_siblings(cfg) -> bool:
  """Whether the expert of one response reads other responses of its group (the config's `expert` section): then the
  loss's leave-one-out baseline must be split in halves (`build.loss_config`)."""
  return cfg.kind != "oracle" and cfg.feedback != "reference"


def reference_feedback(problem: Problem, verdict: Verdict) -> str:
  """The privileged feedback of `expert.feedback="reference"`: the reference solution, then the verdict."""
  return f"{SIBLING}{problem.reference}; {verdict.feedback}"


@dataclasses.dataclass
class Reprompts:
  """What the expert of each response is shown: texts [Bp][G], and [Bp,G] int32 masks of the responses it labels
  (`valid`) and of those whose feedback reads the response itself (`own`: its verdict; `losses` then credits every
  token with the whole response's cost, since the expert's targets depend on tokens after each state)."""

  texts: list[list[str]]
  valid: np.ndarray
  own: np.ndarray


def reprompts(rollouts: Rollouts, template: str, sibling_only: bool = False, feedback: str = "any") -> Reprompts:
  """The feedback prompt of every response, which responses the expert labels, and which it shows their own verdict.

  The feedback is a correct response from the other half of the group when there is one, else the verifier's own
  feedback on this response. With `sibling_only`, responses without such a sibling go unlabelled: a small student
  re-prompted with a verdict alone can be a worse policy than the student (experiments/teacher_quality.py), and
  distilling it then does harm. Whether row i is labelled, and what it is shown, never depends on the other rows of
  its own half. With `feedback="reference"` every response is shown the task's reference solution and its own
  verdict (a problem without a reference leaves its responses unlabelled), and no sibling is read.
  """
  if feedback not in FEEDBACK:
    raise ValueError(f"expert.feedback={feedback!r}; expected one of {FEEDBACK}")
  texts = []
  valid, own = np.zeros(rollouts.tokens.shape[:2], np.int32), np.zeros(rollouts.tokens.shape[:2], np.int32)
  for g, (problem, verdicts) in enumerate(zip(rollouts.problems, rollouts.verdicts, strict=True)):
    row = []
    for i, verdict in enumerate(verdicts):
      if feedback == "reference":
        valid[g, i] = own[g, i] = bool(problem.reference)
        row.append(template.format(prompt=problem.prompt, feedback=reference_feedback(problem, verdict)))
        continue
      others = sibling_half(i, len(verdicts))
      sibling = next((rollouts.texts[g][j] for j in others if verdicts[j].correct), None)
      shown = SIBLING + sibling if sibling is not None else verdict.feedback
      valid[g, i] = bool(shown) and (sibling is not None or not sibling_only)
      own[g, i] = valid[g, i] and sibling is None
      row.append(template.format(prompt=problem.prompt, feedback=shown))
    texts.append(row)
  return Reprompts(texts, valid, own)


def reprompt_texts(rollouts: Rollouts, template: str, sibling_only: bool = False, feedback: str = "any"):
  """(the feedback prompt of every response, [Bp,G] which responses the expert labels); see `reprompts`."""
  shown = reprompts(rollouts, template, sibling_only, feedback)
  return shown.texts, shown.valid


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
    own = np.zeros((bp, g), np.int32)  # the oracle's targets depend on the prefix only
    return {"target_ids": ids, "target_logprobs": logq, "whole_response_credit": own}, {}


class DeviceExpert:
  """`self` and `model`: only the re-prompt tokens are stored; the teacher runs inside the train step.

  A re-prompt longer than `max_prompt_tokens` is not cut (that would hide the question from the teacher): the
  response goes unlabelled and is counted in `rollout/teacher_truncated`, the fraction of responses the expert would
  otherwise label (a response that feedback="sibling" leaves unlabelled anyway is not a truncation).
  """

  on_device = True

  def __init__(self, tokenizer: Tokenizer, template: str, max_prompt_tokens: int, feedback="any", add_bos=False):
    self.tok, self.template, self.width, self.feedback = tokenizer, template, max_prompt_tokens, feedback
    self.add_bos = add_bos
    self.reads_siblings = feedback != "reference"

  def label(self, r: Rollouts) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    shown = reprompts(r, self.template, self.feedback == "sibling", self.feedback)
    bp, g = shown.valid.shape
    flat = [self.tok.prompt_ids(t, self.add_bos) for row in shown.texts for t in row]
    fits = np.array([len(ids) <= self.width for ids in flat]).reshape(bp, g)
    tokens, mask = left_pad_rows([ids if ok else [] for ids, ok in zip(flat, fits.flat, strict=True)], self.width, 0)
    tokens[mask == 0] = self.tok.pad_id
    labels = {
      "teacher_tokens": tokens.reshape(bp, g, -1),
      "teacher_mask": mask.reshape(bp, g, -1),
      "teacher_valid": (shown.valid * fits).astype(np.int32),
      "whole_response_credit": (shown.own * fits).astype(np.int32),
    }
    wanted = shown.valid > 0
    truncated = float(np.sum(wanted & ~fits) / max(np.sum(wanted), 1))
    return labels, {"rollout/teacher_truncated": truncated}


class HttpExpert:
  """An OpenAI-compatible /v1/completions endpoint scoring prompt + response with `echo` and top-k `logprobs`.

  Requests send token ids (vLLM accepts them as the prompt) and ask for `return_tokens_as_token_ids`, so no text
  round trip can shift positions. At start, `/tokenize` on a probe text must give our tokenizer's ids.

  Every reply is checked for content, not only form, before anything reaches the buffer: the echoed tokens must be
  the ones sent (a server that adds its own BOS shifts every label by one position, silently), and each position's
  log-probs must be finite, <= 0 and their probabilities sum to at most 1 + `SUM_TOL` (NaN or positive log-probs
  from a broken server otherwise train the student on garbage: loss 0.0 or 753). The transport (`http_client.py`)
  bounds each request in time and size and retries what a retry can fix. A response the re-prompt has no feedback
  for is not sent: it keeps empty lists and stays out of the loss.
  """

  on_device = False
  reads_siblings = True
  SUM_TOL = 1e-3  # top-k probabilities of one position may exceed 1 by this much (float rounding on the server)
  LOGPROB_TOL = 1e-6  # a log-prob up to this much above 0 is rounding, not a probability above 1

  def __init__(self, tokenizer: Tokenizer, cfg, add_bos: bool = False):
    self.tok, self.cfg, self.add_bos = tokenizer, cfg, add_bos
    self.url = cfg.url.rstrip("/")
    self.top_k = cfg.top_k
    self.policy = http_client.Policy.from_config(cfg)
    self._check_tokenizer()

  def _post(self, path: str, payload: dict):
    return http_client.post_json(self.url + path, payload, self.policy)

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
      "add_special_tokens": False,  # vLLM: no BOS of its own in front of ours
    }
    reply = self._post("/v1/completions", payload)
    try:
      logprobs = reply["choices"][0]["logprobs"]
      top, echoed = logprobs["top_logprobs"], logprobs["tokens"]
    except (KeyError, IndexError, TypeError):
      raise ExpertError(
        f"expert {self.url}: reply has no choices[0].logprobs.top_logprobs and .tokens: {json.dumps(reply)[:200]}"
      ) from None
    sent = teacher_ids + response
    self._check_echo(sent, echoed)
    n, start = len(response), len(teacher_ids)
    if not isinstance(top, list):
      raise ExpertError(f"expert {self.url}: top_logprobs is {type(top).__name__}, not a list of positions")
    if len(top) < start + n:
      raise ExpertError(f"expert {self.url}: {len(top)} positions scored, expected at least {start + n}")
    ids = np.zeros((n, self.top_k), np.int32)
    logq = np.full((n, self.top_k), -np.inf, np.float32)
    for t in range(n):
      entries = self._entries(top[start + t], t)
      if not entries:
        raise ExpertError(f"expert {self.url}: no log-probs for response position {t}")
      # vLLM adds the scored token when it is outside the top K (K + 1 entries): the K most likely are kept
      entries = sorted(entries, key=lambda e: -e[1])[: self.top_k]
      for k, (tid, lp) in enumerate(entries):
        ids[t, k], logq[t, k] = tid, lp
      mass = float(np.sum(np.exp(logq[t].astype(np.float64))))
      if mass > 1 + self.SUM_TOL:
        raise ExpertError(
          f"expert {self.url}: the top-{len(entries)} probabilities of response position {t} sum to {mass:.6g} > 1 "
          f"(log-probs {[round(float(v), 4) for v in logq[t, : len(entries)]]}): not a distribution"
        )
    return ids, logq

  def _entries(self, listed, t: int) -> list[tuple[int, float]]:
    """(token id, log-prob) of one position's top log-probs, in either form servers write: {"token_id:N": lp}
    (completions) or [{"token": "token_id:N", "logprob": lp}, ...] (chat completions); each id at most once."""
    if listed is None:
      return []
    if isinstance(listed, dict):
      pairs = list(listed.items())
    elif isinstance(listed, list) and all(isinstance(e, dict) and {"token", "logprob"} <= e.keys() for e in listed):
      pairs = [(e["token"], e["logprob"]) for e in listed]
    else:
      raise ExpertError(
        f"expert {self.url}: top_logprobs of response position {t} is {json.dumps(listed)[:80]}, neither "
        '{"token_id:N": logprob} nor [{"token": "token_id:N", "logprob": logprob}, ...]'
      )
    out, seen = [], set()
    for token, lp in pairs:
      tid = self._token_id(token)
      if tid in seen:
        raise ExpertError(f"expert {self.url}: token id {tid} listed twice at response position {t}")
      seen.add(tid)
      out.append((tid, self._logprob(lp, t, token)))
    return out

  def _token_id(self, token) -> int:
    if not isinstance(token, str) or not token.startswith("token_id:"):
      raise ExpertError(
        f"expert {self.url}: token {token!r} is not 'token_id:N'; the server must support return_tokens_as_token_ids"
      )
    try:
      tid = int(token.split(":", 1)[1])
    except ValueError:
      raise ExpertError(f"expert {self.url}: token {token!r} is not 'token_id:N'") from None
    if not 0 <= tid < self.tok.vocab_size:
      raise ExpertError(f"expert {self.url}: token id {tid} outside the student's vocabulary ({self.tok.vocab_size})")
    return tid

  def _logprob(self, lp, t: int, token: str) -> float:
    ok = isinstance(lp, int | float) and not isinstance(lp, bool) and math.isfinite(lp) and lp <= self.LOGPROB_TOL
    if not ok:
      raise ExpertError(
        f"expert {self.url}: log-prob {lp!r} of {token} at response position {t} is not a finite number <= 0"
      )
    return min(float(lp), 0.0)

  def _check_echo(self, sent: list[int], echoed) -> None:
    """The server scored exactly the tokens sent, at the same positions (else every label would be shifted)."""
    got = [self._token_id(t) for t in echoed[: len(sent) + 1]] if isinstance(echoed, list) else None
    if got is None or got[: len(sent)] != sent:
      if got is None:
        where = f"reply's tokens are {type(echoed).__name__}, not a list"
      else:
        k = next((i for i, (a, b) in enumerate(zip(sent, got, strict=False)) if a != b), min(len(sent), len(got)))
        seen = got[k] if k < len(got) else "nothing"
        where = f"first difference at position {k}: sent {sent[k] if k < len(sent) else 'nothing'}, echoed {seen}"
      raise ExpertError(
        f"expert {self.url}: the echoed tokens differ from the {len(sent)} sent ({where}); a server that adds "
        "tokens of its own (e.g. a BOS) shifts every label"
      )

  def label(self, r: Rollouts) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    shown = reprompts(r, self.cfg.reprompt)
    texts, valid = shown.texts, shown.valid
    bp, g, n = r.tokens.shape
    # An unlabelled response keeps empty lists (-inf everywhere): the update masks it out of the loss
    # (update.topk_teacher), as teacher_valid does for the device experts.
    ids = np.zeros((bp, g, n, self.top_k), np.int32)
    logq = np.full((bp, g, n, self.top_k), -np.inf, np.float32)
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(self.cfg.concurrency) as pool:
      for b in range(bp):
        for j in range(g):
          length = int(r.mask[b, j].sum())
          if not valid[b, j]:
            continue
          teacher = self.tok.prompt_ids(texts[b][j], self.add_bos)
          jobs[pool.submit(self._score, teacher, r.tokens[b, j, :length].tolist())] = (b, j, length)
      try:
        for fut in concurrent.futures.as_completed(jobs):
          b, j, length = jobs[fut]
          ids[b, j, :length], logq[b, j, :length] = fut.result()
      except ExpertError:  # the first bad reply ends the batch: nothing of it reaches the buffer
        pool.shutdown(cancel_futures=True)
        raise
    return {"target_ids": ids, "target_logprobs": logq, "whole_response_credit": shown.own}, {}


def make_expert(cfg, task, tokenizer: Tokenizer, add_bos: bool = False):
  """The host-side labeller for `cfg.kind` (the config's `expert` section); `add_bos` as the student's prompts."""
  if cfg.kind == "oracle":
    return OracleExpert(task.oracle, tokenizer, cfg.top_k, cfg.smoothing)
  if cfg.feedback not in FEEDBACK:
    raise ValueError(f"expert.feedback={cfg.feedback!r}; expected one of {FEEDBACK}")
  if cfg.kind in ("self", "model"):
    return DeviceExpert(tokenizer, cfg.reprompt, cfg.max_prompt_tokens, cfg.feedback, add_bos)
  if cfg.feedback != "any":
    raise ValueError(f"expert.feedback={cfg.feedback!r} needs a device expert (self or model), not {cfg.kind!r}")
  if cfg.kind == "http":
    return HttpExpert(tokenizer, cfg, add_bos)
  raise ValueError(f"expert.kind={cfg.kind!r}; expected one of oracle, self, model, http")
