"""The `self` and `model` experts: the teacher runs on the device inside the train step; labelling writes only its
re-prompt tokens."""

from __future__ import annotations

import numpy as np

from distil_jax.experts.base import Rollouts
from distil_jax.experts.feedback import reprompts
from distil_jax.sampler import left_pad_rows
from distil_jax.tokenizer import Tokenizer


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
