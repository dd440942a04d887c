"""DAgger's round 0: behaviour cloning (BC) on the expert's own responses, before the first rollout.

With `train.bc_steps` the policy first imitates the task's reference solutions to fresh prompts, as a separate
SFT run would; `train.bc_reprompt_fraction` of those prompts are re-prompted as the `self` expert will see them,
so that a small model learns to read feedback before it is asked to label with it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import batch as batch_lib
from distil_jax import checkpoint, data, experts, losses, run_config, update
from distil_jax.rollout import prompt_rows, reference_rows


def train(params, run, *, config, mesh, stop=lambda: False, before=dict, allow_changed=()):
  """DAgger's round 0: `train.bc_steps` behaviour-cloning updates on the expert's own responses to fresh
  prompts (no sampling), with an optimizer of its own at `train.bc_lr`, as a separate SFT run would be.
  Returns the parameters and figures (with `before()`'s: the figures of the policy it starts from), or the number
  of steps done when `stop()` said to stop (asked before each step).

  Stopped, it saves what it has done (parameters, its optimizer's state, its figures) in `workdir/bc`; a rerun
  goes on from there and ends where an uninterrupted one would (step k's batch is `stream[k]`, a function of
  the seed and k), unless its config differs (refused as a resume is: `allow_changed`). The folder is removed once
  behaviour cloning is complete: from then on the run's own checkpoints hold its result."""
  c = config
  optim = c.optim.copy_and_resolve_references()
  optim.lr = c.train.bc_lr
  tx = update.make_optimizer(optim, c.train.bc_steps)
  state = update.init_state(tx, params, mesh)
  options = update.UpdateOptions(losses.LossConfig(kind="sft", chunk_size=c.loss.chunk_size), labels="none")
  step = update.make_update(run.graphdef, tx, options, state_shardings=jax.tree.map(lambda x: x.sharding, state))
  stream = data.prompt_stream(run.task.problems("train"), seed=c.seed + 1, per_iteration=c.train.bc_batch)
  with checkpoint.Checkpointer(os.path.join(run.workdir, "bc"), max_to_keep=1) as saved:
    found = saved.restore_latest(checkpoint.abstract_like(state))
    if found is None:
      first, losses_seen, figures = 0, [], dict(before())
    else:
      first, state, meta = found
      run_config.check_resume(meta["config"], c, allow_changed, saved.directory)
      losses_seen, figures = meta["losses"], meta["figures"]
    for k in range(first, c.train.bc_steps):
      if stop():
        if saved.latest_step() != k:
          saved.save(k, state, {"config": run_config.flat(c), "losses": losses_seen, "figures": figures})
        return k
      problems = with_feedback(stream[k], c.train.bc_reprompt_fraction, config=c, task=run.task)
      batch = bc_batch(problems, config=c, tok=run.tok)
      state, m = step(state, data.to_global(batch, mesh), None, jnp.int32(0))
      losses_seen.append(float(m["loss"]))
      if not np.isfinite(losses_seen[-1]):
        raise FloatingPointError(f"non-finite loss in behaviour-cloning step {k + 1}")
  if found is not None and jax.process_index() == 0:  # (one never stopped has no folder)
    shutil.rmtree(saved.directory, ignore_errors=True)
  return state["params"], {
    **figures,
    "bc/loss_first": losses_seen[0],
    "bc/loss_last": losses_seen[-1],
    "bc/steps": c.train.bc_steps,
  }


def with_feedback(problems, fraction: float, *, config, task):
  """The first `fraction` of `problems` re-prompted as the self expert sees them (half with a correct solution in
  context, half with the verifier's feedback on a wrong one; with `expert.feedback="reference"`, the reference and
  the verdict on a right or a wrong solution), so that a small model learns to use feedback."""
  out = list(problems)
  n = int(round(fraction * len(out)))
  for i, p in enumerate(out[:n]):
    verdict = task.verify(p, p.reference if i % 2 == 0 else task.wrong_solution(p))
    if config.expert.feedback == "reference":
      feedback = experts.reference_feedback(p, verdict)
    else:
      feedback = experts.SIBLING + p.reference if i % 2 == 0 else verdict.feedback
    out[i] = dataclasses.replace(p, prompt=config.expert.reprompt.format(prompt=p.prompt, feedback=feedback))
  return out


def bc_batch(problems, *, config, tok) -> dict[str, np.ndarray]:
  """A behaviour-cloning batch: prompts and the expert's responses, as one-response groups."""
  width, key = config.sampling.max_prompt_tokens, "sampling.max_prompt_tokens"
  if config.train.bc_reprompt_fraction:  # re-prompts are longer: pad every row to the expert's width
    width, key = max(width, config.expert.max_prompt_tokens), "expert.max_prompt_tokens (behaviour-cloning re-prompts)"
  _, prompt, pmask = prompt_rows(problems, tok=tok, add_bos=config.tokenizer.add_bos, width=width, key=key)
  sft_tokens, sft_mask = reference_rows(problems, config.sampling.max_new_tokens, tok)
  b = len(problems)
  rows = {
    "prompt_tokens": prompt,
    "prompt_mask": pmask,
    "sft_tokens": sft_tokens,
    "sft_mask": sft_mask,
    "tokens": sft_tokens[:, None],
    "mask": sft_mask[:, None],
    "logprobs": np.zeros(sft_mask[:, None].shape, np.float32),
    "reward": np.zeros((b, 1), np.float32),
    "iteration": np.zeros(b, np.int32),
  }
  n = config.sampling.max_new_tokens
  return batch_lib.check(rows, batch_lib.fields(prompt=width, new=n, group=1, labels="none", top_k=0))
