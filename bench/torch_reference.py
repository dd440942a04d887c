"""The same train step in PyTorch + transformers: what a user would otherwise run, for the ratio to ours.

  python -m bench.torch_reference --size 1b --dtype bfloat16 --batch 8 --seq 2048
The model shapes of `bench.train_step` (`common.SIZES`) as a LlamaForCausalLM with SDPA attention, float32 master
weights under bf16 autocast, fused AdamW, global-norm clipping at 1, plain cross-entropy on the response half of each
row, no remat, no torch.compile (the stack as users run it). Prints one JSON line per figure: step seconds, tokens/s,
MFU with `common.train_flops` (the same count as ours, so the MFU ratio equals the tokens/s ratio), and on GPU the
allocator's peak. torch is a reference here only: distil_jax never imports it.
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # bench.common imports jax: keep it off the GPU that torch measures

import torch  # noqa: E402
import transformers  # noqa: E402

from bench import common  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--batch", type=int, default=8, help="sequences per step")
  ap.add_argument("--seq", type=int, default=256, help="prompt + response tokens")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  shapes = common.SIZES[args.size]
  cfg = transformers.LlamaConfig(
    **shapes, max_position_embeddings=max(args.seq, 2048), attn_implementation="sdpa", use_cache=False
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
  tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
  response = args.seq - args.seq // 2
  labels = tokens.clone()
  labels[:, : args.seq - response] = -100  # the loss covers the response half, as in bench.train_step

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
      logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(
      logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    step().item()
  times = []
  for _ in range(args.repeats):
    sync()
    start = time.perf_counter()
    step().item()
    sync()
    times.append(time.perf_counter() - start)
  seconds = sorted(times)[len(times) // 2]
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
  flops = common.train_flops(common.model_config(args.size, args.dtype), args.batch, args.seq, response)
  fields = dict(device=kind, size=args.size, dtype=args.dtype, batch=args.batch, seq=args.seq, stack="torch")

  def emit(figure, value):
    print(json.dumps({"figure": figure, "value": value, **fields}), flush=True)

  emit("torch_step_seconds", round(seconds, 5))
  emit("torch_tokens_per_second", round(args.batch * args.seq / seconds, 1))
  if peak:
    emit("torch_mfu", round(flops / seconds / peak, 4))
  if device == "cuda":
    emit("torch_peak_bytes_device", int(torch.cuda.max_memory_allocated()))


if __name__ == "__main__":
  main()
