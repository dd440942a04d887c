"""Temporary memory of value_and_grad for the naive and the fused DistIL loss (compile only; nothing is allocated).

Naive (written out here, as a user would): student logits hidden @ lm_head [B,T,V] through a full log-softmax and,
for a dense teacher, the teacher's logits likewise; the sequence-level part is the library's.
Fused: `fused_distil_loss` with a `HiddenTeacher` (dense) or a top-k pair.
Figures come from `jax.jit(...).lower(...).compile().memory_analysis()`: exact for the compiled program.

  python bench/loss_memory.py [--vocab 131072 --tokens 8192 --dim 1024 --batch 8 --topk 64 --chunk 32]
Prints one JSON line per figure.
"""

import argparse
import json

import jax
import jax.numpy as jnp

from distil_jax import losses


def temp_bytes(fn, *shapes):
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--vocab", type=int, default=131072)
  ap.add_argument("--tokens", type=int, default=8192)
  ap.add_argument("--dim", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--topk", type=int, default=64)
  ap.add_argument("--chunk", type=int, default=32)
  args = ap.parse_args()
  b, t, d, v, k = args.batch, args.tokens // args.batch, args.dim, args.vocab, args.topk
  sds = jax.ShapeDtypeStruct
  hidden, head = sds((b, t, d), jnp.bfloat16), sds((d, v), jnp.float32)  # bf16 compute, f32 master head
  tokens, mask = sds((b, t), jnp.int32), sds((b, t), jnp.float32)
  t_hidden, positions = sds((b, t + 64, d), jnp.bfloat16), sds((b, t), jnp.int32)
  ids, lq = sds((b, t, k), jnp.int32), sds((b, t, k), jnp.float32)
  logits = lambda h, w: jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
  kw = dict(group_size=2, baseline="loo")

  cfg = losses.LossConfig(kind="distil", baseline="loo")

  def naive_terms(student_logits, tok, ce):
    logp = jax.nn.log_softmax(student_logits, axis=-1)  # [B,T,V] float32, kept for the backward pass
    return {
      "ce": ce(logp),
      "logp": jnp.take_along_axis(logp, tok[..., None], -1)[..., 0],
      "entropy": jnp.zeros(tok.shape),
    }

  def naive_dense(h, w, th, pos, tok, m):
    log_q = jax.nn.log_softmax(logits(jnp.take_along_axis(th, pos[..., None], 1), w), axis=-1)
    terms = naive_terms(logits(h, w), tok, lambda logp: -jnp.sum(jnp.exp(log_q) * logp, -1))
    return losses.loss_from_terms(cfg, terms, m, group_size=2)[0]

  def fused_dense(h, w, th, pos, tok, m):
    return losses.fused_distil_loss(h, w, losses.HiddenTeacher(th, w, pos), tok, m, chunk_size=args.chunk, **kw)

  def naive_topk(h, w, i, q, tok, m):
    def ce(logp):
      lp = jnp.take_along_axis(logp, i, -1)
      tail = jnp.log1p(-jnp.minimum(jnp.sum(jnp.exp(lp), -1), 1 - 1e-6))
      return -jnp.sum(jnp.exp(q) * lp, -1) - (1 - jnp.sum(jnp.exp(q), -1)) * tail

    return losses.loss_from_terms(cfg, naive_terms(logits(h, w), tok, ce), m, group_size=2)[0]

  def fused_topk(h, w, i, q, tok, m):
    return losses.fused_distil_loss(h, w, (i, q), tok, m, chunk_size=args.chunk, **kw)

  shape = dict(B=b, T=t, D=d, V=v, chunk=args.chunk)
  for teacher, naive, fused, extra in [
    ("dense", naive_dense, fused_dense, (t_hidden, positions)),
    (f"top{k}", naive_topk, fused_topk, (ids, lq)),
  ]:
    n = temp_bytes(naive, hidden, head, *extra, tokens, mask)
    f = temp_bytes(fused, hidden, head, *extra, tokens, mask)
    for name, value in [("naive", n), ("fused", f)]:
      print(
        json.dumps(
          {
            "figure": f"loss_temp_bytes_{name}",
            "teacher": teacher,
            "GiB": round(value / 2**30, 3),
            "bytes": value,
            **shape,
          }
        )
      )
    print(
      json.dumps(
        {
          "figure": "loss_temp_ratio_fused_over_naive",
          "teacher": teacher,
          "ratio": round(f / n, 4),
          "target": 0.125,
          **shape,
        }
      )
    )


if __name__ == "__main__":
  main()
