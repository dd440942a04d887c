"""Tasks: prompts, a verifier with rich feedback, and (built-in tasks) an oracle expert."""

from distil_jax.errors import ConfigError
from distil_jax.tasks.arith import ArithTask
from distil_jax.tasks.base import DataError, Problem, Task, Verdict
from distil_jax.tasks.code import CodeTask
from distil_jax.tasks.math import MathTask
from distil_jax.tasks.science import ScienceTask

TASKS = {"arith": ArithTask, "math": MathTask, "code": CodeTask, "science": ScienceTask}


def make_task(cfg) -> Task:
  """The task named `cfg.name`, configured by `cfg` (the config's `task` section)."""
  if cfg.name not in TASKS:
    raise ConfigError(f"task.name={cfg.name!r}: expected one of {sorted(TASKS)}")
  return TASKS[cfg.name](cfg)


__all__ = ["TASKS", "DataError", "Problem", "Task", "Verdict", "make_task"]
