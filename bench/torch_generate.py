"""transformers' `generate` at the sampler bench's shapes: what a user would otherwise run, for the ratio to ours.

  python -m bench.torch_generate --size 1b --dtype bfloat16 --batch 64 --prompt 128 --new 256
The model shapes of `bench.sampler` (`common.SIZES`) as a LlamaForCausalLM (SDPA attention, its dynamic KV cache),
random weights, random prompts of `--prompt` tokens, `--new` tokens sampled at temperature 1 with no top-k / top-p
and no EOS (every row runs to the end, as in `bench.sampler`). The weights are in `--dtype` on GPU; on CPU always
float32 (torch's CPU bf16 matmuls are not what a user would run). Prints one JSON line per batch: end-to-end new
tokens per second (prefill included). torch is a reference here only: distil_jax never imports it.
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # bench.common imports jax: keep it off the GPU that torch measures

import torch  # noqa: E402
import transformers  # noqa: E402

from bench import common  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--batch", type=int, nargs="+", default=[8])
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if args.dtype == "bfloat16" and device == "cuda" else torch.float32
  cfg = transformers.LlamaConfig(
    **common.SIZES[args.size], max_position_embeddings=max(args.prompt + args.new, 2048), attn_implementation="sdpa"
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  for batch in args.batch:
    prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt), device=device)

    def run(new, prompts=prompts):
      with torch.no_grad():
        return model.generate(
          prompts,
          attention_mask=torch.ones_like(prompts),
          do_sample=True,
          temperature=1.0,
          top_k=0,
          top_p=1.0,
          max_new_tokens=new,
          min_new_tokens=new,
          pad_token_id=0,
          eos_token_id=None,
        )

    run(args.new)  # warm-up (allocator, kernels)
    times = []
    for _ in range(args.repeats):
      sync()
      start = time.perf_counter()
      run(args.new)
      sync()
      times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    fields = dict(device=kind, size=args.size, dtype=str(dtype).removeprefix("torch."), batch=batch, stack="torch")
    fields.update(prompt=args.prompt, new=args.new)
    line = {"figure": "torch_generate_tokens_per_second", "value": round(batch * args.new / seconds, 1), **fields}
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
