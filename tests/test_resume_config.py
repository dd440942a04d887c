"""A resume is the same run: another config is refused naming each key and both values unless allowed, and an
extended run keeps the learning-rate schedule it started with."""

import json
import os

import jax
import numpy as np
import pytest
from run_helpers import load_config

from distil_jax import checkpoint, run_config, train
from distil_jax.errors import ConfigError


def _params(workdir, step):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
    return mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]


def test_a_changed_config_is_refused_unless_allowed_and_an_extension_keeps_the_schedule(tmp_path):
  """Cosine schedule over the first run's 2 updates: its rate is 0 from update 3 on. Extended to 3 iterations, the
  third update therefore changes nothing (a schedule laid out for 3 updates would train on at a positive rate)."""
  config = load_config("arith", **{"optim.schedule": "cosine", "eval.every": 10})
  workdir = str(tmp_path / "run")
  train.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    before = f.read()

  changed = load_config("arith", **{"optim.schedule": "cosine", "loss.kind": "grpo", "optim.lr": 1e-3})
  changed.train.iterations = 3
  with pytest.raises(ConfigError) as e:
    train.train(changed, workdir)
  assert str(e.value) == (
    f"{workdir} was trained with another config (loss.kind: 'distil' there, 'grpo' now; optim.lr: 0.0003 there, "
    "0.001 now); resume it with the same values, or pass --allow_changed=loss.kind,optim.lr to train on with the "
    "new ones"
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read() == before  # refused before anything was written
  with pytest.raises(ConfigError, match=r"--allow_changed=optim\.lrr: optim\.lrr is not a config key"):
    train.train(changed, workdir, allow_changed=["optim.lrr"])

  changed.loss.kind = "distil"
  train.train(changed, workdir, allow_changed=["optim.lr"])
  for a, b in zip(jax.tree.leaves(_params(workdir, 2)), jax.tree.leaves(_params(workdir, 3)), strict=True):
    np.testing.assert_array_equal(a, b)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    meta = ckpt._read_meta(3)
  assert meta["config"]["optim.lr"] == 1e-3 and meta["config"]["train.iterations"] == 3  # the next resume's reference
  assert meta["schedule_updates"] == 2
  assert json.loads(json.dumps(meta["config"])) == run_config.flat(changed)


def test_a_checkpoint_recording_renamed_keys_resumes_and_its_values_are_still_compared():
  """A run recorded with `train.warmup_*` / `loss.normalize` (the keys' earlier names) resumes under today's names
  when the values agree, and a changed value is named under today's key, which `--allow_changed` accepts."""
  config = load_config("arith")
  recorded = run_config.flat(config)
  for old, new in run_config.RENAMED.items():
    recorded[old] = recorded.pop(new)
  assert run_config.check_resume(recorded, config, (), "W") == []
  recorded["train.warmup_lr"] = 0.5
  with pytest.raises(ConfigError, match=r"train\.bc_lr: 0\.5 there, 0\.003 now.*--allow_changed=train\.bc_lr to"):
    run_config.check_resume(recorded, config, (), "W")
  run_config.check_allowed_names(("train.bc_lr",), config)
  assert run_config.check_resume(recorded, config, ("train.bc_lr",), "W") == [("train.bc_lr", 0.5, 0.003)]


def test_config_differences_name_each_key_and_skip_the_free_ones():
  a = run_config.flat(load_config("arith"))
  b = run_config.flat(load_config("arith", **{"train.group_size": 8, "eval.every": 5, "mesh.fsdp": 2}))
  b["train.iterations"] = 7
  assert run_config.differences(a, b) == [("train.group_size", 4, 8)]
  everything = run_config.differences(a, b, free=False)
  assert [k for k, _, _ in everything] == ["eval.every", "mesh.fsdp", "train.group_size", "train.iterations"]
