"""Every config in configs/ (and each of its presets) loads, names only known keys, and builds its model small."""

import glob
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx
from run_helpers import ROOT, load_config

from distil_jax import build, config_base, experts, losses, sharding, update, validate
from distil_jax import model as model_lib
from distil_jax.errors import ConfigError
from experiments import smollm2

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _presets(name):
  """None and every `arg` value the file tests for (`arg == "x"` or `arg in ("x", "y")`)."""
  with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
    lines = [line for line in f if re.search(r"\barg (==|in) ", line)]
  return [None] + sorted({word for line in lines for word in re.findall(r'"(\w+)"', line)})


def _keys(cfg, prefix=""):
  for k, v in cfg.items():
    if hasattr(v, "items") and not isinstance(v, dict):
      yield from _keys(v, f"{prefix}{k}.")
    else:
      yield prefix + k


@pytest.mark.parametrize("name,arg", [(n, a) for n in CONFIGS for a in _presets(n)])
def test_config_loads_and_builds(name, arg):
  config = load_config(name, arg)
  assert set(_keys(config)) == set(_keys(config_base.get_config())), "a config may set only the base's keys"
  losses.LossConfig(**{k: v for k, v in config.loss.items() if v is not None})  # a valid loss (unset: default)
  assert config.expert.kind in ("oracle", "self", "model", "http")
  if config.model.hf_path == smollm2.DEFAULT_DIR:  # a real checkpoint's preset: the folder the set-up writes
    smollm2.hf_folder()
  validate.config(config, devices=1, processes=1)  # every value in range, batch sizes fit a mesh
  tiny = build.model_config(config, vocab_size=50)
  tiny = model_lib.ModelConfig(
    **{
      **tiny.__dict__,
      "hidden_size": 32,
      "intermediate_size": 64,
      "num_hidden_layers": 1,
      "num_attention_heads": 4,
      "num_key_value_heads": 2,
    }
  )
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(tiny, rngs=nnx.Rngs(0)), mesh)
  logits = nnx.merge(graphdef, params)(np.zeros((1, 5), np.int32))
  assert logits.shape == (1, 5, tiny.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_all_configs_and_presets_are_covered():
  assert {"arith", "math", "code", "science"} <= set(CONFIGS)
  assert {"runlocal", "compare", "compare_self"} <= set(_presets("arith")) and "real" in _presets("math")


TYPED_SECTIONS = [  # a bad value, the start of the one line naming it, and the section's typed value built from it
  ({"loss.kind": "x"}, "loss.kind='x'", lambda c: losses.LossConfig(**c.loss)),
  ({"loss.jsd_beta": 2.0}, "loss.jsd_beta=2.0", lambda c: losses.LossConfig(**c.loss)),
  ({"model.remat": "some"}, "model.remat='some'", lambda c: build.model_config(c, vocab_size=50)),
  ({"model.num_key_value_heads": 3}, "model.num_key_value_heads=3", lambda c: build.model_config(c, vocab_size=50)),
  (
    {"mesh.fsdp": 3},
    "mesh (data=1, fsdp=3, tensor=1)",
    lambda c: sharding.make_mesh({k: v for k, v in c.mesh.items() if k != "num_devices"}, jax.devices()[:1]),
  ),
  ({"optim.lr": -1.0}, "optim.lr=-1.0", lambda c: update.make_optimizer(c.optim, 10)),
  ({"expert.kind": "http"}, "expert.url=''", lambda c: experts.make_expert(c.expert, None, None)),
  (
    {"expert.kind": "oracle", "expert.feedback": "sibling"},
    "expert.feedback='sibling'",
    lambda c: experts.make_expert(c.expert, None, None),
  ),
]


@pytest.mark.parametrize("overrides,start,make", TYPED_SECTIONS, ids=[" ".join(o) for o, _, _ in TYPED_SECTIONS])
def test_a_typed_section_refuses_a_bad_value_with_the_line_validation_prints(overrides, start, make):
  """A section's checks are written once: the typed value built from a bad config (an update's optimizer, a loss
  built by hand) refuses it with exactly the line that validation before work prints for it."""
  config = load_config("arith", **overrides)
  with pytest.raises(ConfigError) as before_work:
    validate.config(config, devices=1, processes=1)
  (line,) = str(before_work.value).splitlines()
  assert line.startswith(start + ":") or line.startswith(start + " ")
  with pytest.raises(ValueError) as built:
    make(config)
  assert str(built.value) == line
