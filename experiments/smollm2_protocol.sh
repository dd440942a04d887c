#!/bin/bash
# Experiment 5 (experiments/README.md): the real-model protocol in the background, niced and killed first under memory
# pressure. The same command starts it and resumes it after a session ends (finished runs are read back, a stopped
# run continues from its last checkpoint). First the three methods behind the paper's central claims (sequence-level
# credit against tokenwise; DistIL against RLVR) on one-step problems with sibling feedback, so that one table
# completes in a few sessions; then SDPO and OPSD on that setting; then every method and setting.
#   setsid experiments/smollm2_protocol.sh ~/distil-real /work/main/experiments/results/smollm2_runs \
#     >> ~/distil-real/orchestrator.log 2>&1 < /dev/null &
# The second argument is a folder that outlives the machine (a git checkout, committed as runs finish): each run is
# tested as it finishes and its figures copied there, so a later session on a fresh machine reads it back. A run
# that was still going when its machine was lost starts again.
# Stop it with `kill -TERM` to the orchestrator (experiments.arith_comparison): its run saves and exits.
set -u
work=${1:-$HOME/distil-real}
record=${2:?the second argument: a folder that outlives the machine, e.g. /work/main/experiments/results/smollm2_runs}
record=$(realpath -m "$record")
mkdir -p "$work" "$record"
echo 1000 > /proc/self/oom_score_adj
echo 19 > /proc/self/autogroup 2>/dev/null  # nice alone does not lower a job in its own session against other sessions
cd "$(dirname "$0")/.."
nice -n 19 python -m experiments.arith_comparison --task smollm2 --expert sibling \
  --methods DistIL "tokenwise FCE" GRPO "DistIL, KL cost" "DistIL, held terminal" \
  --out "$work/results_core" --workdir "$work" --record "$record" || exit 1
# Then the two self-distillers the paper compares DistIL against (reverse KL, SDPO; JSD, OPSD) on the same setting,
# before the hybrid and SFT: the methods take turns for the one run slot (first come, first served:
# `arith_comparison.Cores`), so a stage of two finishes in about one session where the setting's four remaining
# methods would all finish in about three.
nice -n 19 python -m experiments.arith_comparison --task smollm2 --expert sibling --methods SDPO OPSD \
  --out "$work/results_distillers" --workdir "$work" --record "$record" || exit 1
for e in sibling reference; do
  nice -n 19 python -m experiments.arith_comparison --task smollm2 --expert "$e" --out "$work/results" \
    --workdir "$work" --record "$record" || exit 1
done
# The one-step runs whose reward is the grader's verdict, again under the grader as mended in 381c20a and 5bb8c14
# (it had read "The answer is 9 + 8 = 17." as 9, and the hybrid's lead over GRPO rested on that): GRPO and the hybrid,
# grid and seeds, and the start, in folders of their own (`--tag`), the first runs kept as they were.
nice -n 19 python -m experiments.arith_comparison --task smollm2 --expert sibling --tag mended_grader \
  --methods GRPO DistIL+GRPO --out "$work/results" --workdir "$work" --record "$record" || exit 1
for e in hard hard_reference; do
  nice -n 19 python -m experiments.arith_comparison --task smollm2 --expert "$e" --out "$work/results" \
    --workdir "$work" --record "$record" || exit 1
done
