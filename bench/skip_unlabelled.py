"""The update over the labelled rows only (`update.kept_rows`) against the update over every row: seconds per step.

  python -m bench.skip_unlabelled --hf_path ~/.cache/distil_jax/SmolLM2-135M-Instruct --labelled 4
  python -m bench.skip_unlabelled --size 125m --labelled 4

A self teacher shown a correct sibling labels only the responses whose group has one: 6 % to 56 % of them per
iteration in the SmolLM2 protocol's pilot (experiments/README.md, "Experiment 5"). The others' loss is zero, so the
step may skip their student and teacher passes. The shapes default to that protocol's: 2 groups of 8 responses,
64-token prompts, 96 new tokens, 192-token re-prompts, DistIL with a self teacher (random weights of the checkpoint's
shapes: speed does not depend on them). Both programs are compiled before timing. Figures, one JSON line each:
seconds per step over every row, over the kept rows, and the ratio (every row over kept).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bench import common
from distil_jax import data, hf, losses, sharding, update
from distil_jax import model as model_lib

OPTIM = ml_collections.ConfigDict(
  dict(lr=1e-5, lr_warmup_steps=0, schedule="constant", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)
)


def batch(args, vocab: int, rng) -> dict[str, np.ndarray]:
  """One training batch of the protocol's shapes, with `args.labelled` labelled responses."""
  bg, g, p, n, pt = args.groups, args.group, args.prompt, args.new, args.teacher
  valid = np.zeros(bg * g, np.int32)
  valid[rng.choice(bg * g, args.labelled, replace=False)] = 1
  return {
    "prompt_tokens": rng.integers(1, vocab, (bg, p)).astype(np.int32),
    "prompt_mask": np.ones((bg, p), np.int32),
    "tokens": rng.integers(1, vocab, (bg, g, n)).astype(np.int32),
    "mask": np.ones((bg, g, n), np.int32),
    "logprobs": np.full((bg, g, n), -1.0, np.float32),
    "reward": np.zeros((bg, g), np.float32),
    "iteration": np.ones(bg, np.int32),
    "teacher_tokens": rng.integers(1, vocab, (bg, g, pt)).astype(np.int32),
    "teacher_mask": np.ones((bg, g, pt), np.int32),
    "teacher_valid": valid.reshape(bg, g),
  }


def seconds_per_step(step, state, b, kept, repeats: int):
  """(median seconds of `repeats` steps after one untimed step, the state): the step donates its state."""
  state, _ = step(state, b, None, jnp.int32(1), kept)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, m = step(state, b, None, jnp.int32(1), kept)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2], state


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hf_path", default="", help="a checkpoint folder whose config.json gives the shapes")
  ap.add_argument("--size", default="125m", choices=tuple(common.SIZES), help="the shapes, without --hf_path")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--remat", default="dots")
  ap.add_argument("--groups", type=int, default=2)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=96)
  ap.add_argument("--teacher", type=int, default=192)
  ap.add_argument("--labelled", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  if args.hf_path:
    with open(os.path.join(os.path.expanduser(args.hf_path), "config.json")) as f:
      cfg = hf.config_from_hf(json.load(f), dtype=args.dtype, remat=args.remat)
  else:
    cfg = common.model_config(args.size, args.dtype, args.remat)
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  tx = update.make_optimizer(OPTIM, 100)
  options = update.UpdateOptions(losses.LossConfig(kind="distil", baseline="loo", baseline_parts=2), labels="device")
  step = update.make_update(graphdef, tx, options)
  b = batch(args, cfg.vocab_size, np.random.default_rng(0))
  kept = update.kept_rows(b["teacher_valid"], 1)
  b = data.to_global(b, mesh)
  state = update.init_state(tx, params, mesh)
  shape = dict(
    rows=args.groups * args.group,
    labelled=args.labelled,
    kept=0 if kept is None else len(kept),
    prompt=args.prompt,
    new=args.new,
    teacher=args.teacher,
    dtype=args.dtype,
    remat=args.remat,
    model=args.hf_path or args.size,
  )
  every, state = seconds_per_step(step, state, b, None, args.repeats)
  common.emit("update_seconds_every_row", every, **shape)
  if kept is None:
    return
  held, state = seconds_per_step(step, state, b, jnp.asarray(kept), args.repeats)
  common.emit("update_seconds_kept_rows", held, **shape)
  common.emit("update_speedup_kept_rows", every / held, **shape)


if __name__ == "__main__":
  main()
