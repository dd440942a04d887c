#!/usr/bin/env bash
# N processes on this host, joined through the launcher's variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
# JAX_PROCESS_ID): one process per GPU, or a multi-process rehearsal on CPU.
#
#   launch/processes.sh 8 -- --config=configs/math.py:real --workdir=/data/run ...          # one per GPU
#   JAX_PLATFORMS=cpu launch/processes.sh 2 -- --config=configs/arith.py:runlocal --workdir=/tmp/mp   # rehearsal
#
# On GPUs each process sees one device (JAX_LOCAL_DEVICE_IDS). If one process dies, the others stop within
# --peer_timeout_s (default 10 s) with one line naming it; this script then stops the rest and exits non-zero.
# Several hosts: run the same command on each with JAX_PROCESS_ID offset, or use launch/slurm.sbatch.
set -euo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
N=$1; shift
[[ ${1:-} == -- ]] && shift
PORT=${PORT:-$((20000 + RANDOM % 20000))}
cd "$(dirname "$0")/.."
pids=()
for ((i = 0; i < N; i++)); do
  devices=()
  [[ ${JAX_PLATFORMS:-} == cpu ]] || devices=(JAX_LOCAL_DEVICE_IDS=$i)
  env "${devices[@]}" JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    python -m distil_jax.main --distributed "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
