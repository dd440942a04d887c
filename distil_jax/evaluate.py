"""Pass@k on held-out prompts, with the unbiased estimator of Chen et al. (2021).

With n samples of which c are correct, pass@k = 1 - C(n - c, k) / C(n, k): the probability that k samples drawn
without replacement from the n contain a correct one. Averaging it over prompts estimates pass@k of the policy with
lower variance than drawing exactly k samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from distil_jax import rollout as rollout_lib


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k for one prompt (the product form avoids huge binomials)."""
  if k > n:
    raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
  """Mean pass@k over prompts; `correct[p]` holds the verdicts of prompt p's n samples."""
  out = {}
  for k in ks:
    out[f"pass@{k}"] = float(np.mean([pass_at_k(len(c), int(sum(c)), k) for c in correct]))
  return out


SPLITS = ("eval", "validation", "test")  # eval.split


def in_test_split(prompt: str) -> bool:
  """Whether a held-out prompt belongs to the test half: a fixed function of the prompt's text (not Python's salted
  `hash`), so a prompt is in exactly one of validation and test, whatever the order or size of the held-out list."""
  return hashlib.sha256(prompt.encode()).digest()[0] % 2 == 1


def held_out(task, split: str) -> list:
  """The task's held-out problems of `split` (config `eval.split`): "eval" all of them; "validation" and "test" the
  two halves by prompt identity (`in_test_split`), so hyper-parameters chosen on one are reported on a disjoint
  other. Training never sees a held-out prompt (each task keeps its eval set out of its training stream)."""
  if split not in SPLITS:
    raise ValueError(f"eval.split={split!r}; expected one of {SPLITS}")
  problems = list(task.problems("eval"))
  if split == "eval":
    return problems
  return [p for p in problems if in_test_split(p.prompt) == (split == "test")]


def sample_rows(r, per_prompt: int, *, tok, add_bos: bool, first: int = 0, stride: int = 1) -> list[dict]:
  """The first `per_prompt` responses to each prompt as a user reads them: the question, the rendered prompt the
  model saw (special tokens included), the response, the expected answer and the verdict; and its length in tokens
  and whether it stopped (ended with a stop id) or was cut at `sampling.max_new_tokens`, which its text cannot tell.
  `prompt_index` is the prompt's position in the evaluated list (`first + stride * b` for the rollout's b-th prompt,
  where a process evaluates every stride-th from `first`): held-out prompts repeat, so a prompt's text does not say
  which of the Pass@k average's entries its responses make."""
  rows = []
  stopped_BpxG = rollout_lib.stopped(r.tokens, r.mask, tok.stop_ids)
  for b, (problem, texts, verdicts, stopped_G, mask_GxN) in enumerate(
    zip(r.problems, r.texts, r.verdicts, stopped_BpxG, r.mask, strict=True)
  ):
    responses = zip(texts, verdicts, stopped_G, mask_GxN.sum(-1), strict=True)
    for text, verdict, stopped, length in list(responses)[:per_prompt]:
      rows.append(
        {
          "prompt_index": first + stride * b,
          "question": problem.prompt,
          "prompt": tok.prompt_text(problem.prompt, add_bos),
          "response": text,
          "answer": problem.answer,
          "correct": verdict.correct,
          "feedback": verdict.feedback,
          "tokens": int(length),
          "stopped": bool(stopped),
        }
      )
  return rows


def evaluate_policy(
  graphdef, params, rng, *, config, tok, task, mesh, samples=None, samples_per_prompt=None
) -> dict[str, float]:
  """Pass@k on the held-out prompts (this process's share), and greedy accuracy. `samples`, a list, receives
  `samples_per_prompt` rows per prompt of this process (`sample_rows`; default `eval.log_samples`)."""
  e = config.eval
  prompts = held_out(task, e.split)
  if e.split != "eval" and len(prompts) < e.num_prompts:  # a protocol's split must be the size it says
    raise ValueError(
      f"eval.num_prompts={e.num_prompts} but eval.split={e.split!r} holds {len(prompts)} prompts (raise task.eval_size)"
    )
  prompts = prompts[: e.num_prompts]
  mine = prompts[jax.process_index() :: jax.process_count()]
  base = rollout_lib.sampling_config(config.sampling, tok)
  sample = functools.partial(
    rollout_lib.rollout, graphdef, params, mine, rng, tok=tok, add_bos=config.tokenizer.add_bos, task=task, mesh=mesh
  )
  r = sample(samples_per_prompt=e.samples, sampling_cfg=dataclasses.replace(base, temperature=e.temperature))
  correct = [[v.correct for v in row] for row in r.verdicts]
  if samples is not None:
    per_prompt = e.log_samples if samples_per_prompt is None else samples_per_prompt
    samples += sample_rows(
      r, per_prompt, tok=tok, add_bos=config.tokenizer.add_bos, first=jax.process_index(), stride=jax.process_count()
    )
  out = {f"eval/{k}": v for k, v in summarize(correct, e.pass_at).items()}
  if e.greedy:
    r = sample(samples_per_prompt=1, sampling_cfg=dataclasses.replace(base, greedy=True))
    out["eval/greedy_accuracy"] = float(np.mean([row[0].correct for row in r.verdicts]))
    out["eval/greedy_length"] = float(r.mask.sum(-1).mean())
  if jax.process_count() > 1:  # average the per-process figures (equal shares of prompts)
    out = {k: float(np.mean(multihost_utils.process_allgather(np.float32(v)))) for k, v in out.items()}
  return out
