"""Decode throughput of the sampler, its fraction of the memory-bandwidth roofline, and a rollout as the loop makes it.

  python -m bench.sampler --size 1b --dtype bfloat16 --batch 8 64 256 --prompt 128 --new 256 --vs_torch
Random prompts of `--prompt` tokens, `--new` tokens sampled at temperature 1 without EOS (every row runs to the end).
One JSON line per figure, per batch:
  decode_tokens_per_second    rows x new / (generate - prefill), compute-dtype weights handed in
  prefill_seconds             the prompts' forward pass into the cache (`decode.prefill`), on its own
  generate_tokens_per_second  rows x new / the whole `sampler.generate` call (weight fusion and prefill included)
  decode_bytes_per_second     what a step must read (every weight once, the KV cache filled so far: prompt plus
                              half the new tokens on average) x steps / decode time
  decode_fraction_of_bandwidth_roofline   that over the device's HBM bandwidth (H100/H200/TPU v4/v5e only)
  rollout_tokens_per_second   `rollout.sample`, as the training loop calls it: float32 master weights (cast once
                              inside), `--group` responses per prompt sharing one prefill, tokens back on the host
  torch_generate_tokens_per_second, sampler_speedup_vs_torch (--vs_torch): transformers' `generate` at the same
                              shapes (`bench.torch_generate`, run first in its own process) against our generate
"""

import argparse
import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from distil_jax import data, decode, rollout, sampler, sharding
from distil_jax import model as model_lib


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, params, prompt_BxP, mask_BxP):
  return decode.prefill(model_lib.merge_for_compute(graphdef, params), prompt_BxP, mask_BxP)


def torch_reference(args) -> dict[int, float]:
  """{batch: tokens/s} of `bench.torch_generate` at these shapes, in a child process (its lines are passed on)."""
  flags = ["--size", args.size, "--dtype", args.dtype, "--prompt", str(args.prompt), "--new", str(args.new)]
  out = subprocess.run(
    [sys.executable, "-m", "bench.torch_generate", *flags, "--batch", *map(str, args.batch)],
    capture_output=True,
    text=True,
    check=True,
  )
  lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  for line in lines:
    print(json.dumps(line), flush=True)
  return {line["batch"]: line["value"] for line in lines}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, nargs="+", default=[8, 64, 256])
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--group", type=int, default=8, help="responses per prompt in the rollout figure")
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--vs_torch", action="store_true", help="also run bench.torch_generate and print the ratio")
  args = ap.parse_args()
  torch_rates = torch_reference(args) if args.vs_torch else {}
  cfg = common.model_config(args.size, args.dtype)
  mesh = sharding.make_mesh({"fsdp": -1})
  graphdef, masters = sharding.init_params(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  weights = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cfg.compute_dtype), p))(masters)
  scfg = sampler.SamplingConfig(max_new_tokens=args.new, top_p=args.top_p)
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_size * itemsize
  _, (_, bandwidth) = common.device_peaks()
  rng, key = np.random.default_rng(0), jax.random.key(0)
  with jax.set_mesh(mesh):
    for batch in args.batch:
      shape = dict(size=args.size, dtype=args.dtype, batch=batch, prompt=args.prompt, new=args.new)
      shape.update(devices=len(jax.devices()), top_p=args.top_p)
      prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt)).astype(np.int32)
      tokens, mask = data.to_global({"t": prompts, "m": np.ones_like(prompts)}, mesh).values()
      full = common.timed(lambda: sampler.generate(graphdef, weights, tokens, mask, key, scfg).tokens)  # noqa: B023
      prefill = common.timed(lambda: _prefill(graphdef, weights, tokens, mask))  # noqa: B023
      decode_s = max(full - prefill, 1e-9)
      step_bytes = cfg.num_params() * itemsize + batch * (args.prompt + args.new / 2) * kv_bytes_per_token
      common.emit("decode_tokens_per_second", round(batch * args.new / decode_s, 1), **shape)
      common.emit("prefill_seconds", round(prefill, 5), **shape)
      common.emit("generate_tokens_per_second", round(batch * args.new / full, 1), **shape)
      common.emit("decode_bytes_per_second", round(step_bytes * args.new / decode_s), **shape)
      if bandwidth:
        roofline = batch * bandwidth * len(jax.devices()) / step_bytes
        common.emit("decode_fraction_of_bandwidth_roofline", round(batch * args.new / decode_s / roofline, 4), **shape)
      if batch % args.group == 0:
        ids = [row.tolist() for row in prompts[: batch // args.group]]
        sample = functools.partial(rollout.sample, buckets=[args.prompt], pad_id=0, mesh=mesh, sampling_cfg=scfg)
        seconds = common.timed(lambda: sample(graphdef, masters, ids, key, samples_per_prompt=args.group)[0])  # noqa: B023
        common.emit("rollout_tokens_per_second", round(batch * args.new / seconds, 1), group=args.group, **shape)
      if batch in torch_rates:
        common.emit("sampler_speedup_vs_torch", round(batch * args.new / full / torch_rates[batch], 3), **shape)


if __name__ == "__main__":
  main()
