"""The config a run trains with, as a checkpoint records it: what a resume, or another process, may differ in.

Why: a checkpoint holds the parameters and the optimizer's moments, not how they were made. A resume with another
loss, learning rate or data would train on in the first run's workdir and buffer without a word, and two
processes started with different configs would train apart (another lr, another seed) or hang (another
`train.iterations`). Every checkpoint therefore carries the flattened config; a resume compares it key by key and
refuses, in one line naming each key with both values, unless the user names the keys they mean to change
(`--allow_changed`).

Keys that do not change what is trained are free: how long the run is (`train.iterations`; the learning-rate
schedule stays the original run's, see `train._restore`), what is evaluated and logged, when checkpoints are kept,
the mesh and sharding (a resume onto another mesh is supported), the export format, the attention kernel and remat
(the same function), an http expert's transport settings. Processes of one run must agree on every key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from distil_jax.errors import ConfigError

FREE = (
  "train.iterations",
  "train.skip_unlabelled",  # the same loss and gradient (update.kept_rows)
  "log.",
  "eval.",
  "checkpoint.",
  "mesh.",
  "sharding_rules",
  "export.",
  "model.attention",
  "model.remat",
  "expert.timeout_s",
  "expert.max_retries",
  "expert.backoff_s",
  "expert.concurrency",
  "expert.deadline_s",  # the http transport's bounds, where the config has them
  "expert.max_reply_mb",
)


# Keys a checkpoint records under their earlier names, read under today's so that such a run still resumes (its
# `--allow_changed` could not name a key the config no longer has).
RENAMED = {
  "train.warmup_steps": "train.bc_steps",
  "train.warmup_batch": "train.bc_batch",
  "train.warmup_lr": "train.bc_lr",
  "train.warmup_reprompt_fraction": "train.bc_reprompt_fraction",
  "loss.normalize": "loss.reduction",
}


def flat(config) -> dict[str, Any]:
  """{"section.key": value} with JSON values (tuples as lists), as a checkpoint's meta stores them."""
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}{k}.", v)
    else:
      out[prefix[:-1]] = node

  walk("", config.to_dict() if hasattr(config, "to_dict") else dict(config))
  return json.loads(json.dumps(out, sort_keys=True))


def _free(key: str) -> bool:
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


_MISSING = object()


def _show(v) -> str:
  return "(unset)" if v is _MISSING else repr(tuple(v) if isinstance(v, list) else v)


def differences(before: dict[str, Any], after: dict[str, Any], *, free: bool = True) -> list[tuple[str, Any, Any]]:
  """(key, before, after) for each key whose value differs (`free=False`: the free keys too), sorted by key."""
  keys = sorted(set(before) | set(after))
  return [
    (k, before.get(k, _MISSING), after.get(k, _MISSING))
    for k in keys
    if before.get(k, _MISSING) != after.get(k, _MISSING) and not (free and _free(k))
  ]


def check_allowed_names(allowed, config) -> None:
  """`--allow_changed` may name config keys only (a typo would otherwise allow nothing, silently)."""
  known = flat(config)
  unknown = [k for k in allowed if k not in known]
  if unknown:
    raise ConfigError(f"--allow_changed={','.join(allowed)}: {', '.join(unknown)} is not a config key")


def check_resume(recorded: dict[str, Any], config, allowed, where: str) -> list[tuple[str, Any, Any]]:
  """The changes of `config` against the `recorded` one that `allowed` names (returned, for the log); raises
  ConfigError naming every other change that alters what is trained."""
  changes = differences({RENAMED.get(k, k): v for k, v in recorded.items()}, flat(config))
  refused = [c for c in changes if c[0] not in allowed]
  if refused:
    listed = "; ".join(f"{k}: {_show(a)} there, {_show(b)} now" for k, a, b in refused)
    raise ConfigError(
      f"{where} was trained with another config ({listed}); resume it with the same values, or pass "
      f"--allow_changed={','.join(k for k, _, _ in refused)} to train on with the new ones"
    )
  return changes


def digest(config) -> str:
  return hashlib.sha256(json.dumps(flat(config), sort_keys=True).encode()).hexdigest()


def check_processes(config) -> None:
  """On a multi-process run (a collective: every process calls it at start): refuse, in one line naming each key
  and the processes' values, configs that differ between processes."""
  import jax

  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  words = np.frombuffer(bytes.fromhex(digest(config)), np.uint32)
  every = np.asarray(multihost_utils.process_allgather(words))
  if (every == every[0]).all():
    return
  text = json.dumps(flat(config), sort_keys=True).encode()
  size = int(np.max(multihost_utils.process_allgather(np.int32(len(text)))))
  padded = np.frombuffer(text.ljust(size, b" "), np.uint8)
  configs = [json.loads(bytes(row)) for row in np.asarray(multihost_utils.process_allgather(padded))]
  parts = []
  for p in range(1, len(configs)):
    for k, a, b in differences(configs[0], configs[p], free=False):
      parts.append(f"{k} is {_show(a)} on process 0, {_show(b)} on process {p}")
  raise ConfigError(
    f"the processes were started with different configs: {'; '.join(parts[:6])}"
    + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")
  )
