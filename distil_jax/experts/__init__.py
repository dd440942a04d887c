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

from distil_jax import checks
from distil_jax.checks import Checks
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

KINDS = ("oracle", "self", "model", "http")
ON_DEVICE = ("self", "model")  # the teacher runs in the update, on the re-prompts (`DeviceExpert`)


def check_section(ch: Checks) -> None:
  """The `expert` section, one line per problem (`checks.py`): what every kind reads, and what its own kind needs."""
  if not ch.enum("expert.kind", KINDS):
    return
  kind = ch.value("expert.kind")
  ch.count("expert.top_k")
  ch.count("expert.max_prompt_tokens")
  ch.template("expert.reprompt", ["prompt", "feedback"])
  ch.number("expert.ema_decay", lo=0, hi=1)
  if kind == "oracle":
    ch.number("expert.smoothing", lo=0, hi=1, lo_open=True, hi_open=True)
  if ch.enum("expert.feedback", FEEDBACK) and ch.value("expert.feedback") != "any" and kind not in ON_DEVICE:
    fb = ch.value("expert.feedback")  # only a teacher on the device reads siblings or references
    ch.fail("expert.feedback", f"{fb!r} needs a device expert (expert.kind self or model), not {kind!r}")
  if kind == "model":
    if not ch.get("expert.model_path"):
      ch.fail("expert.model_path", "expert.kind='model' needs a Hugging Face checkpoint folder")
    else:
      ch.checkpoint_folder("expert.model_path")
  if kind == "http":
    url = ch.get("expert.url", "")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
      ch.fail("expert.url", "expert.kind='http' needs the server's http:// or https:// address")
    timeout_ok = ch.number("expert.timeout_s", lo=0, lo_open=True)
    if ch.number("expert.deadline_s", lo=0, lo_open=True) and timeout_ok:
      if ch.value("expert.deadline_s") < ch.value("expert.timeout_s"):
        ch.fail("expert.deadline_s", f"must be >= expert.timeout_s={ch.value('expert.timeout_s')} (one try fits in it)")
    ch.number("expert.max_retries", lo=0, integer=True)
    ch.number("expert.backoff_s", lo=0)
    ch.number("expert.max_reply_mb", lo=0, lo_open=True)
    ch.count("expert.concurrency")
    if ch.has("expert.tokenizer_probe") and not ch.value("expert.tokenizer_probe"):
      ch.fail("expert.tokenizer_probe", "must be a non-empty text (the tokenizer check sends it)")


def make_expert(cfg, task, tokenizer: Tokenizer, add_bos: bool = False):
  """The host-side labeller for `cfg.kind` (the config's `expert` section, checked by `check_section`); `add_bos`
  as the student's prompts."""
  checks.raise_problems("expert", cfg, check_section)
  if cfg.kind == "oracle":
    return OracleExpert(task.oracle, tokenizer, cfg.top_k, cfg.smoothing)
  if cfg.kind in ON_DEVICE:
    return DeviceExpert(tokenizer, cfg.reprompt, cfg.max_prompt_tokens, cfg.feedback, add_bos)
  return HttpExpert(tokenizer, cfg, add_bos)


def labels(expert) -> str:
  """What an expert's rows carry (`batch.LABELS`): re-prompts for a teacher forward on device, or top-k targets."""
  return "device" if expert.on_device else "topk"


__all__ = [
  "FEEDBACK",
  "SIBLING",
  "DeviceExpert",
  "ExpertError",
  "KINDS",
  "ON_DEVICE",
  "HttpExpert",
  "OracleExpert",
  "Problem",
  "Reprompts",
  "Rollouts",
  "Verdict",
  "check_section",
  "labels",
  "make_expert",
  "reads_siblings",
  "reference_feedback",
  "reprompt_texts",
  "reprompts",
  "sibling_half",
]
