"""The fused loss's chunk size, chosen by measurement: time and temporary memory of value_and_grad per chunk size,
beside the unfused loss (logits [B,T,V] written out) as the anchor when it fits.

  python -m bench.loss_chunk --vocab 128256 --tokens 16384 --dim 2048 --batch 8 --chunks 16,32,64,128,256
(the 1B shape of bench/common.py: 8 sequences, 2048 response tokens each). Prints one JSON line per figure; the last
line names the fastest chunk size whose temporary memory is within 2x of the smallest seen.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from distil_jax import losses


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--tokens", type=int, default=2048)
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--topk", type=int, default=64)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--chunks", default="16,32,64,128")
  ap.add_argument("--naive", action="store_true", help="also time the unfused loss (needs the [B,T,V] logits)")
  args = ap.parse_args()
  b, t, d, v, k = args.batch, args.tokens // args.batch, args.dim, args.vocab, args.topk
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), args.dtype)
  head = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)  # float32 master head
  tokens = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.ones((b, t), jnp.float32)
  ids = jnp.asarray(rng.integers(0, v, (b, t, k)), jnp.int32)
  logq = jnp.full((b, t, k), np.log(0.9 / k), jnp.float32)
  shape = dict(B=b, T=t, D=d, V=v, K=k, dtype=args.dtype)

  def measure(loss):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    temp = step.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes
    return common.timed(step, hidden, head), temp

  seen = []
  for chunk in [int(c) for c in args.chunks.split(",")]:
    fused = lambda h, w, c=chunk: losses.fused_distil_loss(
      h, w, (ids, logq), tokens, mask, group_size=2, baseline="loo", chunk_size=c
    )
    seconds, temp = measure(fused)
    seen.append((chunk, seconds, temp))
    common.emit("loss_fused_seconds", seconds, chunk=chunk, temp_bytes=temp, **shape)
  if args.naive:
    naive = lambda h, w: losses.distil_loss(
      jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32),
      (ids, logq),
      tokens,
      mask,
      group_size=2,
      baseline="loo",
    )
    seconds, temp = measure(naive)
    common.emit("loss_naive_seconds", seconds, temp_bytes=temp, **shape)
  small = min(temp for _, _, temp in seen)
  chunk, seconds, temp = min((s for s in seen if s[2] <= 2 * small), key=lambda s: s[1])
  common.emit("loss_best_chunk", chunk, seconds=seconds, temp_bytes=temp, **shape)


if __name__ == "__main__":
  main()
