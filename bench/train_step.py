"""Train-step time, model FLOPs utilisation (MFU) and peak memory of the jitted update (fused DistIL loss, AdamW).

  python -m bench.train_step --size 1b --dtype bfloat16 --batch 8 --seq 2048 [--remat dots] [--attention auto]
Each row is a prompt (first half) and a response (second half); two responses per prompt, a top-k expert.
Figures, one JSON line each: step seconds, tokens/s, MFU (`common.train_flops`: the FLOPs the step needs, LM head on
response positions only, over step time x peak FLOP/s; peak known for H100/H200/TPU v4/v5e), the compiled program's
peak memory (`memory_analysis`: arguments + outputs - donated + temporaries) and, where the device reports it
(GPU), the allocator's peak. Every line names the remat policy and the attention implementation that ran.
`--vs_torch` first runs `bench.torch_reference` at the same shapes (before JAX touches the device) and adds the
ratio of tokens/s, ours over theirs.
"""

import argparse
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bench import common
from distil_jax import attention, data, losses, sharding, update
from distil_jax import model as model_lib

OPTIM = ml_collections.ConfigDict(
  dict(lr=1e-4, lr_warmup_steps=0, schedule="constant", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)
)


def build(cfg: model_lib.ModelConfig, batch: int, seq: int, topk: int, mesh):
  """(update step, state, batch on the mesh, iteration) for `batch` rows of `seq` tokens, half prompt, half response."""
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  tx = update.make_optimizer(OPTIM, 100)
  state = update.init_state(tx, params, mesh)
  step = update.make_update(
    graphdef,
    tx,
    update.UpdateOptions(losses.LossConfig(kind="distil"), labels="topk"),
    state_shardings=jax.tree.map(lambda x: x.sharding, state),
  )
  p, n, g = seq // 2, seq - seq // 2, 2
  rng = np.random.default_rng(0)
  bg = batch // g
  host = {
    "prompt_tokens": rng.integers(0, cfg.vocab_size, (bg, p)).astype(np.int32),
    "prompt_mask": np.ones((bg, p), np.int32),
    "tokens": rng.integers(0, cfg.vocab_size, (bg, g, n)).astype(np.int32),
    "mask": np.ones((bg, g, n), np.int32),
    "logprobs": np.zeros((bg, g, n), np.float32),
    "reward": np.zeros((bg, g), np.float32),
    "iteration": np.zeros(bg, np.int32),
    "sft_tokens": np.zeros((bg, n), np.int32),
    "sft_mask": np.zeros((bg, n), np.int32),
    "target_ids": rng.integers(0, cfg.vocab_size, (bg, g, n, topk)).astype(np.int32),
    "target_logprobs": np.full((bg, g, n, topk), np.log(0.9 / topk), np.float32),
  }
  return step, state, data.to_global(host, mesh), jnp.int32(0)


def compiled_peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, default=8, help="sequences per step (global)")
  ap.add_argument("--seq", type=int, default=256, help="prompt + response tokens")
  ap.add_argument("--topk", type=int, default=16)
  ap.add_argument("--remat", nargs="?", const="full", default="none", choices=sorted(model_lib.REMAT_POLICIES))
  ap.add_argument("--attention", default="auto", choices=attention.IMPLEMENTATIONS)
  ap.add_argument("--vs_torch", action="store_true", help="also run bench.torch_reference and print the ratio")
  args = ap.parse_args()
  torch_tokens_per_second = torch_reference(args) if args.vs_torch else None
  cfg = common.model_config(args.size, args.dtype, args.remat, args.attention)
  mesh = sharding.make_mesh({"fsdp": -1})
  step, state, batch, iteration = build(cfg, args.batch, args.seq, args.topk, mesh)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = step.lower(state, batch, None, iteration).compile()
    compile_seconds = time.perf_counter() - start
    holder = {"state": state}

    def run():
      holder["state"], m = compiled(holder["state"], batch, None, iteration)
      return m["loss"]

    seconds = common.timed(run)
  tokens = args.batch * args.seq
  flops = common.train_flops(cfg, args.batch, args.seq, args.seq - args.seq // 2)
  kind, (peak_flops, _) = common.device_peaks()
  shape = dict(
    size=args.size,
    params=cfg.num_params(),
    dtype=args.dtype,
    batch=args.batch,
    seq=args.seq,
    remat=cfg.remat,
    attention=attention.resolve(cfg.attention, cfg.compute_dtype, cfg.head_size),
    devices=len(jax.devices()),
  )
  common.emit("train_step_seconds", round(seconds, 5), **shape)
  common.emit("train_tokens_per_second", round(tokens / seconds, 1), **shape)
  common.emit("train_model_tflops_per_step", round(flops / 1e12, 4), **shape)
  common.emit("train_compile_seconds", round(compile_seconds, 3), **shape)
  common.emit("train_peak_bytes_compiled", compiled_peak_bytes(compiled), **shape)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    common.emit("train_peak_bytes_device", int(stats["peak_bytes_in_use"]), **shape)
  if peak_flops:
    common.emit("train_mfu", round(flops / seconds / (peak_flops * len(jax.devices())), 4), **shape)
  if torch_tokens_per_second:
    common.emit("train_speedup_vs_torch", round(tokens / seconds / torch_tokens_per_second, 3), **shape)


def torch_reference(args) -> float:
  """tokens/s of `bench.torch_reference` at these shapes, run in a child process (its lines are passed through)."""
  flags = ["--size", args.size, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq)]
  out = subprocess.run(
    [sys.executable, "-m", "bench.torch_reference", *flags], capture_output=True, text=True, check=True
  ).stdout
  lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  for line in lines:
    print(json.dumps(line), flush=True)
  return next(line["value"] for line in lines if line["figure"] == "torch_tokens_per_second")


if __name__ == "__main__":
  main()
