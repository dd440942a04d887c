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


def _wrap(tree):
  """A lone array (e.g. RNG key data) as a one-leaf tree: orbax's standard handler saves trees only."""
  return {"array": tree} if isinstance(tree, jax.Array | jax.ShapeDtypeStruct) else tree


def _unwrap(tree, target):
  return tree["array"] if isinstance(target, jax.Array | jax.ShapeDtypeStruct) else tree


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
    """Start an asynchronous save of `state` (named pytrees of arrays, one orbax item each) and `meta` (JSON)."""
    items = {name: ocp.args.StandardSave(_wrap(tree)) for name, tree in state.items()}
    self._manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(dict(meta)), **items), force=True)

  def restore(self, step: int, targets: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of `step` for the items named in `targets` (e.g. only "params" for export); each tree is laid
    out like its abstract target (shape, dtype, sharding)."""
    items = {name: ocp.args.StandardRestore(_wrap(tree)) for name, tree in targets.items()}
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items))
    return {name: _unwrap(out[name], targets[name]) for name in targets}, dict(out["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
