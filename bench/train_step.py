"""Train-step time and model FLOPs utilisation (MFU) of the jitted update (fused DistIL loss, AdamW).

  python bench/train_step.py --size 1b --dtype bfloat16 --batch 8 --seq 2048 [--remat]
Prints one JSON line per figure. MFU = 6 * params * tokens + attention FLOPs, over step time x peak FLOP/s
(peak known for H100/H200/TPU v4/v5e; on other devices only the time and tokens/s are printed).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from distil_jax import losses, sharding, update
from distil_jax import model as model_lib


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, default=8, help="sequences per step (global)")
  ap.add_argument("--seq", type=int, default=256, help="prompt + response tokens")
  ap.add_argument("--topk", type=int, default=16)
  ap.add_argument("--remat", action="store_true")
  args = ap.parse_args()
  cfg = common.model_config(args.size, args.dtype, args.remat)
  mesh = sharding.make_mesh({"fsdp": -1})
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  optim = type(
    "O",
    (),
    dict(lr=1e-4, warmup_steps=0, schedule="constant", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0),
  )
  tx = update.make_optimizer(optim, 100)
  state = update.init_state(tx, params, mesh)
  step = update.make_update(
    graphdef,
    tx,
    update.UpdateSpec(losses.LossConfig(kind="distil"), teacher="topk"),
    state_shardings=jax.tree.map(lambda x: x.sharding, state),
  )
  p, n, g = args.seq // 2, args.seq // 2, 2
  rng = np.random.default_rng(0)
  bg = args.batch // g
  batch = {
    "prompt_tokens": rng.integers(0, cfg.vocab_size, (bg, p)).astype(np.int32),
    "prompt_mask": np.ones((bg, p), np.int32),
    "tokens": rng.integers(0, cfg.vocab_size, (bg, g, n)).astype(np.int32),
    "mask": np.ones((bg, g, n), np.int32),
    "logprobs": np.zeros((bg, g, n), np.float32),
    "reward": np.zeros((bg, g), np.float32),
    "iteration": np.zeros(bg, np.int32),
    "sft_tokens": np.zeros((bg, n), np.int32),
    "sft_mask": np.zeros((bg, n), np.int32),
    "target_ids": rng.integers(0, cfg.vocab_size, (bg, g, n, args.topk)).astype(np.int32),
    "target_logprobs": np.full((bg, g, n, args.topk), np.log(0.9 / args.topk), np.float32),
  }
  with jax.set_mesh(mesh):
    batch = sharding.put_batch(batch, mesh)
    holder = {"state": state}

    def run():
      holder["state"], m = step(holder["state"], batch, None, jnp.int32(0))
      return m["loss"]

    seconds = common.timed(run)
  tokens = args.batch * args.seq
  n_params = cfg.num_params()
  attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq * tokens  # fwd + bwd attention matmuls
  flops = 6 * n_params * tokens + attn
  kind, (peak_flops, _) = common.device_peaks()
  shape = dict(
    size=args.size,
    params=n_params,
    dtype=args.dtype,
    batch=args.batch,
    seq=args.seq,
    remat=args.remat,
    devices=len(jax.devices()),
  )
  common.emit("train_step_seconds", round(seconds, 5), **shape)
  common.emit("train_tokens_per_second", round(tokens / seconds, 1), **shape)
  if peak_flops:
    common.emit("train_mfu", round(flops / seconds / (peak_flops * len(jax.devices())), 4), **shape)


if __name__ == "__main__":
  main()
