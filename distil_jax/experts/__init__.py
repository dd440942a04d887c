"""Experts: who labels the student's states, behind one interface.

  oracle  the task's own program: the right continuation from any state, as top-k targets (host side)
  http    an OpenAI-compatible completions endpoint (vLLM, SGLang) that scores the student's response under the
          feedback prompt and returns top-k log-probs per position (host side)
  self    the student itself, re-prompted with the feedback (live parameters or an EMA copy, as SDPO does)
  model   a separate teacher with the same vocabulary, loaded from a Hugging Face checkpoint
For `self` and `model` the teacher's logits never leave the device: `label` only writes the re-prompt tokens, and the
train step runs the teacher forward and the fused loss together (`HiddenTeacher`).

What the re-prompt carries, and which responses are labelled, is the feedback policy (`feedback.py`).

`label(rollouts)` returns (arrays for the buffer, figures for the metrics). One module per kind: `oracle.py`,
`device.py` (self and model), `http.py`; `base.py` holds what they read.
"""

from __future__ import annotations

from distil_jax.errors import ExpertError
from distil_jax.experts.base import Rollouts
from distil_jax.experts.device import DeviceExpert
from distil_jax.experts.feedback import (
  FEEDBACK,
  SIBLING,
  Reprompts,
  reads_siblings,
  reference_feedback,
  reprompt_texts,
  reprompts,
  sibling_half,
)
from distil_jax.experts.http import HttpExpert
from distil_jax.experts.oracle import OracleExpert
from distil_jax.tasks.base import Problem, Verdict
from distil_jax.tokenizer import Tokenizer


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


def labels(expert) -> str:
  """What an expert's rows carry (`batch.LABELS`): re-prompts for a teacher forward on device, or top-k targets."""
  return "device" if expert.on_device else "topk"


__all__ = [
  "FEEDBACK",
  "SIBLING",
  "DeviceExpert",
  "ExpertError",
  "HttpExpert",
  "OracleExpert",
  "Problem",
  "Reprompts",
  "Rollouts",
  "Verdict",
  "labels",
  "make_expert",
  "reads_siblings",
  "reference_feedback",
  "reprompt_texts",
  "reprompts",
  "sibling_half",
]
