"""Test session set-up: 8 fake CPU devices for sharding tests, no model hubs, absl flags parsed for Grain."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # before any backend is initialised
jax.config.update("jax_default_matmul_precision", "highest")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
