"""From prompts to labelled data: sampling on the mesh, the task's verdicts, and the rows the buffer and the
updates read (rollout groups, the expert's own responses).

Rows are numpy on the host; `data.to_global` puts them on the mesh. The sampler gets each prompt once with the
group size (it prefills a prompt once for its group) and the float32 master weights, which it casts once per rollout.
Prompts are left-padded to the largest bucket (`sampling.max_prompt_tokens`) for storage, whatever bucket they were
sampled with: positions come from the mask, so the extra padding changes nothing the model computes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from distil_jax import batch, checks, data, experts, sampler, sharding


def _local(array, mesh):
  """This process's rows of a batch-sharded global array, as numpy."""
  spec = sharding.batch_sharding(mesh, array.ndim).spec
  return np.asarray(multihost_utils.global_array_to_host_local_array(array, mesh, spec))


def _global_prompts(tokens, mask, mesh):
  """Each prompt once, as global arrays (the sampler prefills it once for its whole group): rows split over the
  batch axes when they divide them, else whole on every device (one host; several hosts must split them)."""
  shards = sharding.batch_shards(mesh)
  rows = len(tokens) * jax.process_count()
  if rows % shards == 0:
    glob = data.to_global({"t": tokens, "m": mask}, mesh)
    return glob["t"], glob["m"]
  if jax.process_count() > 1:
    raise ValueError(f"{rows} prompts do not split over the mesh's data x fsdp = {shards} devices")
  return (jax.device_put(x, sharding.replicated(mesh)) for x in (tokens, mask))


def sample(graphdef, params, prompt_ids, rng, *, buckets, pad_id, mesh, samples_per_prompt, sampling_cfg):
  """(tokens, log-probs, lengths) as numpy, this process's rows: `samples_per_prompt` responses to each prompt (a
  list of token ids), with the parameters as the loop holds them (float32 masters, sharded)."""
  prompt, mask = _global_prompts(*sampler.left_pad(prompt_ids, buckets, pad_id), mesh)
  out = sampler.generate(graphdef, params, prompt, mask, rng, sampling_cfg, samples_per_prompt=samples_per_prompt)
  return tuple(_local(x, mesh) for x in (out.tokens, out.logprobs, out.lengths))


def stopped(tokens, mask, stop_ids) -> np.ndarray:
  """Whether each response (over the last axis) ended with a stop id; False for one cut at
  `sampling.max_new_tokens`, which its text cannot tell apart, and for an empty one (its position 0 is padding,
  which may be the stop id itself)."""
  length_X = mask.sum(-1)
  last_X = np.take_along_axis(tokens, np.maximum(length_X - 1, 0)[..., None], axis=-1)[..., 0]
  return (length_X > 0) & np.isin(last_X, list(stop_ids))


def rollout(graphdef, params, problems, rng, *, tok, add_bos, task, mesh, samples_per_prompt, sampling_cfg):
  """Sample `samples_per_prompt` responses to each problem, decode them and ask the task for verdicts."""
  s = sampling_cfg
  ids, full_prompt, full_mask = prompt_rows(problems, tok=tok, add_bos=add_bos, width=s.max_prompt_tokens)
  tokens, logprobs, lengths = sample(
    graphdef,
    params,
    ids,
    rng,
    buckets=s.prompt_buckets,
    pad_id=tok.pad_id,
    mesh=mesh,
    samples_per_prompt=samples_per_prompt,
    sampling_cfg=s,
  )
  bp, g, n = len(problems), samples_per_prompt, s.max_new_tokens
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
  texts = [tok.text_of(row[:length]) for row, length in zip(tokens, lengths, strict=True)]
  verdicts = [task.verify(problems[i // g], text) for i, text in enumerate(texts)]
  return experts.Rollouts(
    problems=list(problems),
    prompt_tokens=full_prompt,
    prompt_mask=full_mask,
    tokens=tokens.reshape(bp, g, n),
    mask=mask.reshape(bp, g, n),
    logprobs=logprobs.reshape(bp, g, n),
    texts=[texts[i * g : (i + 1) * g] for i in range(bp)],
    verdicts=[verdicts[i * g : (i + 1) * g] for i in range(bp)],
  )


def sampling_config(s, tok) -> sampler.SamplingConfig:
  """The config's `sampling` section as the sampler and the rollout read it, with the tokenizer's stops and ids."""
  return checks.typed(
    sampler.SamplingConfig,
    s,
    prompt_buckets=tuple(s.prompt_buckets),
    eos_id=tok.eos_id,
    stop_ids=tok.stop_ids,
    pad_id=tok.pad_id,
    vocab_limit=tok.vocab_size,
  )


def reference_rows(problems, n: int, tok) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, mask) [len(problems), n] of the expert's own responses (+ EOS), for SFT."""
  refs = [(tok.encode(p.reference) + [tok.eos_id])[:n] if p.reference else [] for p in problems]
  tokens = np.full((len(refs), n), tok.pad_id, np.int32)
  mask = np.zeros((len(refs), n), np.int32)
  for i, s in enumerate(refs):
    tokens[i, : len(s)], mask[i, : len(s)] = s, 1
  return tokens, mask


def prompt_rows(problems, *, tok, add_bos, width, key="sampling.max_prompt_tokens"):
  """Prompt ids, and (tokens, mask) left-padded to `width` (the buffer's: sampling.max_prompt_tokens).

  A prompt longer than `width` is an error naming the config key `key`: the loop never trains on a cut prompt.
  """
  ids = [tok.prompt_ids(p.prompt, add_bos) for p in problems]
  longest = max(len(i) for i in ids)
  if longest > width:
    raise ValueError(f"a prompt of {longest} tokens does not fit {key}={width}")
  return ids, *sampler.left_pad_rows(ids, width, tok.pad_id)


def layout(config, expert) -> dict:
  """The rows this run stores and trains on (`batch.fields`)."""
  return batch.fields(
    prompt=config.sampling.max_prompt_tokens,
    new=config.sampling.max_new_tokens,
    group=config.train.group_size,
    labels=experts.labels(expert),
    top_k=config.expert.top_k,
    teacher_prompt=config.expert.max_prompt_tokens,
  )


def group_records(r: experts.Rollouts, labels: dict, iteration: int, *, tok, layout) -> dict[str, np.ndarray]:
  """One buffer row per prompt group: the rollouts, the expert's labels, and the expert's own response (SFT)."""
  sft_tokens, sft_mask = reference_rows(r.problems, r.tokens.shape[-1], tok)
  reward = np.array([[v.reward for v in row] for row in r.verdicts], np.float32)
  rows = {
    "prompt_tokens": r.prompt_tokens,
    "prompt_mask": r.prompt_mask,
    "tokens": r.tokens,
    "mask": r.mask,
    "logprobs": r.logprobs,
    "reward": reward,
    "iteration": np.full(len(r.problems), iteration, np.int32),
    "sft_tokens": sft_tokens,
    "sft_mask": sft_mask,
    **labels,
  }
  return batch.check(rows, layout)
