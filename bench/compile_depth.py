"""Compile time of the train step against depth: with the layers scanned it should barely grow (target: 32 layers
within 1.5x of 2 layers at the same width).

  python -m bench.compile_depth [--size tiny --layers 2 32 --dtype float32 --batch 4 --seq 64]
Prints one JSON line per depth (lowering + XLA compile seconds of the whole update: forward, backward, AdamW; the
fastest of `--repeats`, after one unrecorded compile that pays the process's one-time costs) and the ratio of the
deepest to the shallowest.
"""

import argparse
import time

import jax

from bench import common
from bench.train_step import build
from distil_jax import model as model_lib
from distil_jax import sharding


def compile_seconds(cfg, args, mesh) -> float:
  step, state, batch, iteration = build(cfg, args.batch, args.seq, args.topk, mesh)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    step.lower(state, batch, None, iteration).compile()
    return time.perf_counter() - start


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
  ap.add_argument("--layers", type=int, nargs="+", default=[2, 32])
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--topk", type=int, default=8)
  ap.add_argument("--remat", default="none", choices=sorted(model_lib.REMAT_POLICIES))
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  mesh = sharding.make_mesh({"fsdp": -1})
  make = lambda layers: common.model_config(args.size, args.dtype, args.remat, num_hidden_layers=layers)
  compile_seconds(make(min(args.layers)), args, mesh)  # warm-up: tracing caches, backend start
  seconds = {}
  for layers in args.layers:
    seconds[layers] = min(compile_seconds(make(layers), args, mesh) for _ in range(args.repeats))
    common.emit("train_compile_seconds", round(seconds[layers], 3), size=args.size, layers=layers, remat=args.remat)
  lo, hi = min(args.layers), max(args.layers)
  common.emit(
    "train_compile_ratio", round(seconds[hi] / seconds[lo], 3), layers=[lo, hi], size=args.size, remat=args.remat
  )


if __name__ == "__main__":
  main()
