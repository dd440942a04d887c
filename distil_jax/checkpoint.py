"""Orbax checkpoints of the training state, restorable onto a different mesh.

A checkpoint is a set of named pytrees (params, optimizer state, RNG key data, an EMA teacher, ...) plus one JSON
dict of host-side state (iteration, buffer rows, data position). Saves are asynchronous and atomic: orbax writes to
a temporary directory and renames it when complete, so a run killed mid-save resumes from the previous checkpoint.
Restores take an abstract target whose leaves carry shardings, which is how a checkpoint written on one mesh is read
onto another (`abstract_like` builds such a target from live arrays on the new mesh).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(tree):
  """ShapeDtypeStructs carrying each array's sharding: a restore target for `tree`'s layout."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Start an asynchronous save of `state` (named pytrees of arrays) and `meta` (JSON-able)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(dict(state)), meta=ocp.args.JsonSave(dict(meta)))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, targets: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of `step`; each state tree is laid out like its abstract target (shape, dtype, sharding)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(dict(targets)), meta=ocp.args.JsonRestore())
    out = self._manager.restore(step, args=args)
    return dict(out["state"]), dict(out["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
