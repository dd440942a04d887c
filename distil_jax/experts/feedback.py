"""The feedback policy: what the expert of each response is shown in its re-prompt, and which responses it labels.

What the re-prompt carries (`expert.feedback`):
  any        a successful sibling response when the group has one, the environment's feedback otherwise; a sample
             with neither is masked out of the loss
  sibling    the same, but only responses shown a successful sibling are labelled
  reference  the task's reference solution and the verifier's verdict on this response (privileged information,
             OPSD's setting); no sibling is read
Siblings come from the *other half* of the group only: the loss's leave-one-out baseline for a row is taken within
its own half (`surrogate.leave_one_out(parts=2)`), so no row's baseline can depend on the row's own response through
the feedback it gave a sibling. With `reference` feedback no row reads another, and the baseline uses the whole group.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distil_jax.experts.base import Rollouts
from distil_jax.tasks.base import Problem, Verdict

SIBLING = "A correct solution: "  # how a successful sibling response (or a reference solution) is put in the re-prompt
FEEDBACK = ("any", "sibling", "reference")  # expert.feedback


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
