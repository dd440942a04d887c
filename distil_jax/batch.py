"""The training batch, defined once: the rows rollouts produce, the buffer stores and the update reads.

One row per prompt group; a batch stacks Bg rows. Per row:
  prompt_tokens, prompt_mask  [P]      the prompt, left-padded to sampling.max_prompt_tokens
  tokens, mask, logprobs      [G,N]    G sampled responses (pad after EOS), mask (EOS included), the sampler's log-probs
  reward                      [G]      the task's verdicts
  iteration                   []       the DAgger iteration that sampled the row (staleness of the score term)
  sft_tokens, sft_mask        [N]      the expert's own response (SFT and behaviour cloning)
and the expert's labels, by kind of expert:
  "topk"    target_ids, target_logprobs  [G,N,K]  top-k (or one-hot) next-token targets; -inf pads a list, and a
                                                  response whose every list is empty is unlabelled (not in the loss)
  "device"  teacher_tokens, teacher_mask [G,Pt]   the re-prompt the on-device teacher reads (self, model)
            teacher_valid                [G]      1 where the expert labels the response
  "none"    nothing (behaviour cloning reads only the fields above)
"topk" and "device" rows also carry
  whole_response_credit        [G]      1 where the expert's feedback read the response itself (its own verdict):
                                        the loss then charges every token the whole response's cost (surrogate.py)
"""

from __future__ import annotations

import numpy as np

LABELS = ("topk", "device", "none")


def fields(*, prompt: int, new: int, group: int, labels: str, top_k: int = 0, teacher_prompt: int = 0):
  """{name: (shape of one row, dtype)} for rows of this layout."""
  if labels not in LABELS:
    raise ValueError(f"labels={labels!r}; expected one of {LABELS}")
  out = {
    "prompt_tokens": ((prompt,), "int32"),
    "prompt_mask": ((prompt,), "int32"),
    "tokens": ((group, new), "int32"),
    "mask": ((group, new), "int32"),
    "logprobs": ((group, new), "float32"),
    "reward": ((group,), "float32"),
    "iteration": ((), "int32"),
    "sft_tokens": ((new,), "int32"),
    "sft_mask": ((new,), "int32"),
  }
  if labels == "topk":
    out.update(target_ids=((group, new, top_k), "int32"), target_logprobs=((group, new, top_k), "float32"))
  elif labels == "device":
    out.update(
      teacher_tokens=((group, teacher_prompt), "int32"),
      teacher_mask=((group, teacher_prompt), "int32"),
      teacher_valid=((group,), "int32"),
    )
  if labels != "none":
    out["whole_response_credit"] = ((group,), "int32")
  return out


def check(rows: dict[str, np.ndarray], layout: dict) -> dict[str, np.ndarray]:
  """`rows` ([n, ...] per field) as arrays of the layout's dtypes; a missing, extra or misshapen field is an error
  here, where the rows are built, not a shape error inside the jitted update."""
  if set(rows) != set(layout):
    raise ValueError(f"batch fields {sorted(rows)} differ from the layout's {sorted(layout)}")
  out = {}
  for name, (shape, dtype) in layout.items():
    value = np.asarray(rows[name])
    if value.shape[1:] != shape:
      raise ValueError(f"batch field {name!r} has rows of shape {value.shape[1:]}, the layout says {shape}")
    out[name] = value.astype(dtype, copy=False)
  return out
