"""Orbax checkpoints of the training state, restorable onto a different mesh, verified by content on restore.

A checkpoint is a set of named pytrees (params, optimizer state, RNG key data, an EMA teacher, ...) plus one JSON
dict of host-side state (iteration, buffer rows, data position). Saves are asynchronous and atomic: orbax writes to
a temporary directory and renames it when complete, so a run killed mid-save resumes from the previous checkpoint.
Restores take an abstract target whose leaves carry shardings, which is how a checkpoint written on one mesh is read
onto another (`abstract_like` builds such a target from live arrays on the new mesh).

Why checksums: orbax reads back whatever bytes are on disk, so flipped bits load silently (a run then fails later
with a non-finite loss, pointing at the wrong cause). At save, every array leaf gets a 64-bit content checksum, kept
in the meta JSON that commits atomically with the arrays; at restore the restored arrays are summed again and
compared. The checksum is a sum over elements of a hash of (flat index, value bits), mod 2^32 in two lanes: a sum
does not depend on the order of reduction, so it is computed on device, on the arrays as they are sharded, and gives
the same value on any mesh and any number of processes (each device hashes its own shard; XLA adds the partial
sums). It needs no host copy and no gather, it detects any change to one element with certainty (the per-element
hash is a bijection of the value bits) and other damage with probability 1 - 2^-64; it is not a cryptographic hash
(it guards against storage faults, not against an adversary).

`restore_latest` walks back from the newest checkpoint: a damaged or incomplete one (flipped bytes, a truncated or
missing file, a missing item, an empty step folder) is reported in one warning line and skipped, and training moves
it aside (`<step>.unusable`) so that a later save of the same step cannot collide with it. A checkpoint whose arrays
do not fit the config (a parameter of another shape) is not damage: that stops the run with one line naming the
parameter and both shapes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from distil_jax.errors import CheckpointError

_ITEMS = "_items"  # meta key: {item: {leaf path: [checksum, shape, dtype]}}
_META_SUM = "_meta_sha256"  # meta key: sha256 of the rest of the meta dict
_ASIDE = ".unusable"


def abstract_like(tree):
  """ShapeDtypeStructs carrying each array's sharding: a restore target for `tree`'s layout."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _wrap(tree):
  """A lone array (e.g. RNG key data) as a one-leaf tree: orbax's standard handler saves trees only."""
  return {"array": tree} if isinstance(tree, jax.Array | jax.ShapeDtypeStruct) else tree


def _unwrap(tree, target):
  return tree["array"] if isinstance(target, jax.Array | jax.ShapeDtypeStruct) else tree


# ---------------------------------------------------------------------------------------------------------------------
# Content checksums


def _fmix32(h):
  """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit over the output."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _bits(x):
  """The value bits of every element as uint32 (8-byte dtypes give a trailing axis of 2)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(x.dtype.itemsize)
  if width is None or jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(f"no checksum for dtype {x.dtype}")
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _leaf_sum(x):
  bits = _bits(jnp.asarray(x))
  index = jax.lax.iota(jnp.uint32, max(bits.size, 1))[: bits.size].reshape(bits.shape)
  lane0 = _fmix32(bits ^ _fmix32(index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x2545F491)))
  lane1 = _fmix32((bits + jnp.uint32(0x68E31DA4)) ^ _fmix32(index * jnp.uint32(0x85EBCA77) + jnp.uint32(0x1B873593)))
  return jnp.stack([jnp.sum(lane0, dtype=jnp.uint32), jnp.sum(lane1, dtype=jnp.uint32)])


@functools.cache
def _sum_fn(out_sharding):
  """One jitted hash per leaf: jax compiles it once per (shape, dtype, layout), which the layers of a model share."""
  return jax.jit(_leaf_sum, out_shardings=out_sharding)


def content_sums(tree) -> dict[str, list]:
  """{leaf path: [checksum as 16 hex digits, shape, dtype]} of every array in `tree`, computed where it lives.

  On a multi-process mesh this is a collective: every process must call it with its part of the same global tree.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    return {}
  mesh = next((x.sharding.mesh for _, x in leaves if isinstance(getattr(x, "sharding", None), jax.NamedSharding)), None)
  out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
  sums = jax.device_get([_sum_fn(out)(x) for _, x in leaves])  # dispatched together, fetched once
  return {
    path: ["".join(f"{int(v):08x}" for v in np.asarray(s)), *shape_dtype]
    for (path, shape_dtype), s in zip(_layout(tree).items(), sums, strict=True)
  }


def _meta_digest(meta: Mapping[str, Any]) -> str:
  body = {k: v for k, v in meta.items() if k != _META_SUM}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# What can be wrong with a checkpoint


class _Unusable(Exception):
  """A checkpoint that cannot be trusted (damaged or incomplete); the message says why, in a few words."""


def _deepest(e: BaseException) -> str:
  """The innermost cause's first line: orbax wraps tensorstore's precise error in generic ones."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  if "OUT_OF_RANGE" in text or "byte range" in text:
    text = f"a data file is truncated ({text})"
  return text[:300]


def _agree(ok: bool) -> bool:
  """True when `ok` holds on every process (all processes must reach this call)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _layout(tree) -> dict[str, list]:
  """{leaf path: [shape, dtype]} of a (possibly abstract) tree, with the paths `content_sums` uses."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): [list(np.shape(x)), str(x.dtype)]
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _check_layout(step: int, recorded: Mapping[str, list], name: str, target) -> None:
  """Raise CheckpointError (not damage: the config changed) when `target`'s arrays differ from those saved."""
  want, have = _layout(_wrap(target)), {path: entry[1:] for path, entry in recorded.items()}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    listed = lambda paths: ", ".join(f"{name}/{p}" for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    parts = ([f"this config has {listed(missing)}, the checkpoint not"] if missing else []) + (
      [f"the checkpoint has {listed(extra)}, this config not"] if extra else []
    )
    raise CheckpointError(f"checkpoint {step} does not fit this config: {'; '.join(parts)}")
  for path in sorted(want):
    if want[path] != have[path]:
      (ws, wd), (hs, hd) = want[path], have[path]
      raise CheckpointError(
        f"checkpoint {step} does not fit this config: {name}/{path} is {tuple(hs)} {hd} there, "
        f"{tuple(ws)} {wd} in this config"
      )


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.unusable: list[int] = []  # steps `restore_latest` skipped, newest first
    self._pending: int | None = None  # the step of the save last started
    self._failed = False  # a failed save was reported: closing does not report it again
    # create=False: reading a workdir must not change it (the folder is made at the first save)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False),
    )

  def latest_step(self) -> int | None:
    """The newest step folder, usable or not (`restore_latest` finds the newest usable one)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Start an asynchronous save of `state` (named pytrees of arrays, one orbax item each) and `meta` (JSON).

    The checksums are computed first, on device (it waits for the arrays, as orbax's own copy to host does); the
    write itself proceeds in the background."""
    os.makedirs(self.directory, exist_ok=True)
    meta = dict(meta)
    meta[_ITEMS] = {name: content_sums(_wrap(tree)) for name, tree in state.items()}
    meta[_META_SUM] = _meta_digest(meta)
    items = {name: ocp.args.StandardSave(_wrap(tree)) for name, tree in state.items()}
    args = ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items)
    self._written(self._manager.save, step, args=args, force=True)  # raises a failure of the save before it
    self._pending = step

  def _written(self, fn, *args, **kwargs):
    """`fn` (an orbax call that may report a failed asynchronous save); a full disk becomes one CheckpointError that
    names the checkpoint lost and the one still intact, with the half-written folder removed."""
    try:
      return fn(*args, **kwargs)
    except Exception as e:
      if self._failed:
        return None
      chain, cause = [], e
      while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
      if not any("No space left" in t or "RESOURCE_EXHAUSTED" in t for t in chain):
        raise
      self._failed = True
      step = self._pending if self._pending is not None else args[0]
      if jax.process_index() == 0:
        for name in os.listdir(self.directory):
          if name.startswith(f"{step}.orbax-checkpoint-tmp"):
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      intact = [s for s in self.all_steps() if s != step]
      kept = f"checkpoint {max(intact)} is intact" if intact else "no earlier checkpoint exists"
      raise CheckpointError(
        f"the disk is full: checkpoint {step} could not be written in {self.directory} (no space left on device); "
        f"{kept}: free some space and run the same command to resume"
      ) from None

  def _read_meta(self, step: int) -> dict:
    folder = os.path.join(self.directory, str(step))
    if not os.path.isdir(folder) or not os.listdir(folder):
      raise _Unusable("the step folder is empty")
    if not os.path.exists(os.path.join(folder, "meta")):
      raise _Unusable("item 'meta' is missing")
    try:
      meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # anything orbax or the JSON parser raise: the file is not what was written
      raise _Unusable(f"its meta item is unreadable: {_deepest(e)}") from None
    if _META_SUM in meta and meta[_META_SUM] != _meta_digest(meta):
      raise _Unusable("its meta item's checksum differs (bytes changed on disk)")
    return meta

  def restore(self, step: int, targets: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of `step` for the items named in `targets` (e.g. only "params" for export); each tree is laid
    out like its abstract target (shape, dtype, sharding). Every array is checked against its saved checksum.

    Raises CheckpointError when the checkpoint does not fit the targets (the config changed) or cannot be used."""
    try:
      return self._restore(step, targets)
    except _Unusable as e:
      raise CheckpointError(f"checkpoint {step} in {self.directory} is unusable: {e}") from None

  def _restore(self, step, targets, check=None):
    error, meta, out, recorded = None, None, None, None
    try:
      meta = self._read_meta(step)
      why = check(step, meta) if check is not None else None
      if why:
        raise _Unusable(why)
      recorded = meta.get(_ITEMS)
      for name in sorted(targets, key=lambda n: (n != "params", n)):  # a changed model is best named by its params
        if recorded is not None and name not in recorded:
          raise CheckpointError(
            f"checkpoint {step} holds no item {name!r} (it has {', '.join(sorted(recorded))}): "
            "it was written by a run with another configuration"
          )
        if not os.path.isdir(os.path.join(self.directory, str(step), name)):
          raise _Unusable(f"item {name!r} is missing")
        if recorded is not None:
          _check_layout(step, recorded[name], name, targets[name])
      items = {name: ocp.args.StandardRestore(_wrap(tree)) for name, tree in targets.items()}
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # orbax / tensorstore: a truncated, missing or garbled file
        raise _Unusable(_deepest(e)) from None
    except _Unusable as e:
      error = str(e)
    if not _agree(error is None):
      raise _Unusable(error or "unreadable on another process")
    if recorded is None:
      logging.warning("checkpoint %d was written without content checksums: restored unverified", step)
    else:
      bad = []
      for name in targets:
        sums = content_sums(out[name])
        bad += [f"{name}/{p}" for p, entry in sums.items() if entry[0] != recorded[name][p][0]]
      if bad:
        more = f" and {len(bad) - 3} more arrays" if len(bad) > 3 else ""
        raise _Unusable(f"content checksum differs for {', '.join(bad[:3])}{more} (bytes changed on disk)")
    meta = {k: v for k, v in meta.items() if k not in (_ITEMS, _META_SUM)}
    return {name: _unwrap(out[name], targets[name]) for name in targets}, meta

  def restore_latest(self, targets: Mapping[str, Any], *, check=None):
    """(step, state, meta) of the newest usable checkpoint, or None when there is none at all. `check(step, meta)`
    may name a reason, outside the checkpoint, not to use it (e.g. damaged data it refers to), in a few words.

    Unusable newer ones are named in one warning line each and listed in `self.unusable` (training, which will save
    those steps again, moves them aside with `set_aside_unusable`). Raises CheckpointError when checkpoints exist but
    none is usable, or when one does not fit the targets."""
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self._restore(step, targets, check)
      except _Unusable as e:
        skipped.append((step, str(e)))
        continue
      for bad, why in skipped:
        logging.warning("checkpoint %d is unusable (%s); resuming from checkpoint %d instead", bad, why, step)
      self.unusable = [bad for bad, _ in skipped]
      return step, state, meta
    if skipped:
      raise CheckpointError(
        f"no usable checkpoint in {self.directory}: " + "; ".join(f"{s}: {why}" for s, why in skipped)
      )
    return None

  def set_aside_unusable(self) -> None:
    """Rename the folders of the steps `restore_latest` skipped to `<step>.unusable` (kept for inspection; orbax no
    longer lists them, so a new save of that step cannot collide with them)."""
    if not self.unusable:
      return
    if jax.process_index() == 0:
      for step in self.unusable:
        src, dst = os.path.join(self.directory, str(step)), os.path.join(self.directory, f"{step}{_ASIDE}")
        n = 1
        while os.path.exists(dst):
          n += 1
          dst = os.path.join(self.directory, f"{step}{_ASIDE}{n}")
        os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("distil_jax checkpoint set aside")
    self.unusable = []
    self._manager.reload()

  def close(self) -> None:
    try:
      self._written(self._manager.wait_until_finished)
    finally:
      try:
        self._manager.close()
      except Exception:
        if not self._failed:
          raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
