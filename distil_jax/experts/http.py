"""The `http` expert: an OpenAI-compatible completions endpoint (vLLM, SGLang) scores the student's response under
the re-prompt and returns top-k log-probs per position; every reply is checked for content before it is used.
The transport (deadline, size cap, retries) is `distil_jax/http_client/`."""

from __future__ import annotations

import concurrent.futures
import json
import math

import numpy as np

from distil_jax import http_client
from distil_jax.errors import ExpertError
from distil_jax.experts.base import Rollouts
from distil_jax.experts.feedback import reprompts
from distil_jax.tokenizer import Tokenizer


class HttpExpert:
  """An OpenAI-compatible /v1/completions endpoint scoring prompt + response with `echo` and top-k `logprobs`.

  Requests send token ids (vLLM accepts them as the prompt) and ask for `return_tokens_as_token_ids`, so no text
  round trip can shift positions. At start, `/tokenize` on a probe text must give our tokenizer's ids.

  Every reply is checked for content, not only form, before anything reaches the buffer: the echoed tokens must be
  the ones sent (a server that adds its own BOS shifts every label by one position, silently), and each position's
  log-probs must be finite, <= 0 and their probabilities sum to at most 1 + `SUM_TOL` (NaN or positive log-probs
  from a broken server otherwise train the student on garbage: loss 0.0 or 753). The transport (`http_client/`)
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
