"""Test session set-up: 8 fake CPU devices for sharding tests, no model hubs, absl flags parsed for Grain, and one
compilation cache for the session.

Why the cache: most of the suite's time is XLA compiling the same small programs again, in-process and in the
`python -m distil_jax.main` children the end-to-end tests start (a one-layer run took 47 s cold and 16 s with its
programs cached). The cache is the session's own, in a temporary folder, so every CI run starts empty and no test
reads a program compiled by an older checkout; children inherit it through the environment, and so do the
pytest-xdist workers (pyproject's `-n auto`), which therefore share it.

Why the workers: a test is mostly one XLA compilation or one child process at a time, about one core's work, so
two cores run two tests at once. `-n 0` runs the suite in one process.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="distil-jax-tests-xla-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(
    JAX_COMPILATION_CACHE_DIR=_cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # tiny programs too: the suite compiles thousands
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
  )

from run_helpers import XLA_TEST_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()  # read when XLA starts

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # before any backend is initialised
jax.config.update("jax_default_matmul_precision", "highest")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.hookimpl(optionalhook=True)  # xdist's hook: without xdist (the GPU machine) pytest must still load this
def pytest_xdist_auto_num_workers(config):
  """`-n auto`: a worker per core, at most 8, and one per 8 GiB of memory (the SmolLM2 tests hold ~6 GB each)."""
  memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # macOS has no affinity
  return max(1, min(cores or 1, 8, int(memory_gib // 8)))


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` first (a stable sort): the workers share out the short ones that follow, instead of one
  worker starting a two-minute test as the other finishes."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
