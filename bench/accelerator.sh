#!/usr/bin/env bash
# Every accelerator figure the README lists, in one call of under 9 minutes on one H100 / H200 (or a TPU host):
#
#   bash bench/accelerator.sh [OUT]        (OUT defaults to $OUT, else /tmp/distil-accelerator)
#
# One JSON-lines file per benchmark in OUT (stderr beside it, `failures.txt` naming any that failed or ran out of
# its time), in this order, cheapest and most wanted first:
#   attention.jsonl     the cuDNN flash path against the einsum reference (pytest tests/test_attention.py -k cudnn)
#   train_1b.jsonl      train step at the 1B shape: seconds, tokens/s, MFU, peak memory, ratio to torch
#   sampler_1b.jsonl    decode tokens/s and the fraction of the HBM roofline, ratio to transformers' generate
#   loss_chunk.jsonl    the fused loss's chunk sweep at the 1B vocabulary
#   loop_smollm2.jsonl  one DAgger iteration on SmolLM2-135M-Instruct's shapes against transformers + torch
#   skip_unlabelled.jsonl  the update over 4 labelled rows of 16 against the update over all 16 (SmolLM2's shapes)
# The GPU machine has no network and lacks grain and ml-collections: wheels in `.wheels/` (made here with
# `pip download --no-deps grain ml-collections -d .wheels`) are installed first, and the SmolLM2 folder's small
# files in `.smollm2/` (config, tokenizer, template; `cp ~/.cache/distil_jax/SmolLM2-135M-Instruct/*.json
# ~/.cache/distil_jax/SmolLM2-135M-Instruct/*.jinja .smollm2/`) stand for the weights (random ones of its shapes:
# speed does not depend on them). Carry both (`carry: [".wheels", ".smollm2"]`).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/distil-accelerator}}
mkdir -p "$out"
if [ -d .wheels ]; then
  python -m pip install -q --no-index --no-deps .wheels/*.whl 2>>"$out/setup.err"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch references run beside JAX processes on the same device
smollm2=.smollm2
[ -d "$smollm2" ] || smollm2=$HOME/.cache/distil_jax/SmolLM2-135M-Instruct

run() {  # run NAME SECONDS COMMAND...: stdout to NAME.jsonl, a failure or a time-out named in failures.txt
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.jsonl" 2>"$out/$name.err"
  local rc=$?
  [ "$rc" -eq 0 ] || echo "$name: exit $rc after $((SECONDS - start)) s" >>"$out/failures.txt"
  echo "{\"figure\": \"bench_wall_seconds\", \"value\": $((SECONDS - start)), \"bench\": \"$name\", \"rc\": $rc}" \
    >>"$out/walls.jsonl"
}

run attention 60 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_attention.py -k cudnn  # no xdist there
run train_1b 120 python -m bench.train_step --size 1b --dtype bfloat16 --batch 8 --seq 2048 --remat dots --vs_torch
run sampler_1b 120 python -m bench.sampler --size 1b --dtype bfloat16 --batch 8 64 256 --prompt 128 --new 256 \
  --vs_torch
run loss_chunk 60 python -m bench.loss_chunk --vocab 128256 --tokens 16384 --dim 2048 --batch 8 \
  --chunks 16,32,64,128,256
run loop_smollm2 100 python -m bench.loop_iteration --hf_path "$smollm2" --random_weights --dtype bfloat16 \
  --remat none --prompts 16 --group 8 --new 256 --updates 2 --batch_groups 8
run skip_unlabelled 60 python -m bench.skip_unlabelled --hf_path "$smollm2" --dtype bfloat16 --remat none --labelled 4
ls -l "$out"
