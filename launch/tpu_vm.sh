#!/usr/bin/env bash
# Run distil_jax on every worker of a Cloud TPU VM (single host or a multi-host slice).
#
#   launch/tpu_vm.sh NAME ZONE [ACCELERATOR] -- --config=configs/math.py:real --workdir=gs://bucket/run \
#       --config.model.hf_path=/ckpt/Qwen3-1.7B --config.task.train_path=/data/math.jsonl
#
# Creates the VM if it does not exist (set TPU_VERSION for the runtime image), copies this repository's committed
# tree to all workers, installs it with jax[tpu], and starts the same command on every worker with
# --distributed (jax.distributed.initialize() finds the other workers from the TPU metadata; JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID override it). A worker that dies stops the others within --peer_timeout_s.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
NAME=$1; ZONE=$2; shift 2
ACCELERATOR=v5litepod-8
if [[ $# -gt 0 && $1 != -- ]]; then ACCELERATOR=$1; shift; fi
[[ ${1:-} == -- ]] && shift
VERSION=${TPU_VERSION:-v2-alpha-tpuv5-lite}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$VERSION"
fi
ARCHIVE=$(mktemp -t distil_jax.XXXXXX.tar.gz)
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME":distil_jax.tar.gz --zone "$ZONE" --worker=all
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/distil_jax && tar xzf ~/distil_jax.tar.gz -C ~/distil_jax && cd ~/distil_jax
  pip install -q -U 'jax[tpu]' && pip install -q -e .
  python -m distil_jax.main --distributed $ARGS"
