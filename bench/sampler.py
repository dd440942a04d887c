"""Decode throughput of the KV-cache sampler, and its fraction of the memory-bandwidth roofline.

  python bench/sampler.py --size 1b --dtype bfloat16 --batch 64 --prompt 128 --new 256
Each decode step reads every parameter and the KV cache once; roofline tokens/s = batch x bandwidth / bytes per step
(bandwidth known for H100/H200/TPU v4/v5e). Prints one JSON line per figure.
"""

import argparse
import dataclasses

import jax
import numpy as np
from flax import nnx

from bench import common
from distil_jax import model as model_lib
from distil_jax import sampler, sharding


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=64)
  args = ap.parse_args()
  cfg = common.model_config(args.size, args.dtype)
  mesh = sharding.make_mesh({"fsdp": -1})
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  if args.dtype != "float32":  # serve bf16 weights: decode is bound by reading them
    params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), params)
  prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
  mask = np.ones_like(prompts)
  scfg = sampler.SamplingConfig(max_new_tokens=args.new, eos_id=None)
  with jax.set_mesh(mesh):
    prompts, mask = sharding.put_batch({"t": prompts, "m": mask}, mesh).values()
    full = common.timed(lambda: sampler.generate(graphdef, params, prompts, mask, jax.random.key(0), scfg).tokens)
    prefill = common.timed(
      lambda: (
        sampler.generate(
          graphdef, params, prompts, mask, jax.random.key(0), dataclasses.replace(scfg, max_new_tokens=1)
        ).tokens
      )
    )
  decode_s = max(full - prefill, 1e-9)
  tokens_per_s = args.batch * (args.new - 1) / decode_s
  itemsize = np.dtype(cfg.compute_dtype).itemsize
  kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_size * itemsize
  step_bytes = cfg.num_params() * itemsize + args.batch * (args.prompt + args.new / 2) * kv_bytes
  kind, (_, bandwidth) = common.device_peaks()
  shape = dict(
    size=args.size, dtype=args.dtype, batch=args.batch, prompt=args.prompt, new=args.new, devices=len(jax.devices())
  )
  common.emit("decode_tokens_per_second", round(tokens_per_s, 1), **shape)
  common.emit("prefill_seconds", round(prefill, 5), **shape)
  if bandwidth:
    roofline = args.batch * bandwidth * len(jax.devices()) / step_bytes
    common.emit("decode_fraction_of_bandwidth_roofline", round(tokens_per_s / roofline, 4), **shape)


if __name__ == "__main__":
  main()
