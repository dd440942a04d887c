"""Grain pipelines: the prompt stream, and the training batches mixed from fresh rollouts and the DAgger buffer.

Everything is index-based (`grain.MapDataset`): iteration i reads batch i of a seeded, shuffled, repeated prompt
stream, and its K training batches are a pure function of (seed, i, buffer contents). That is what makes a resumed
run replay exactly. Prompts are split by JAX process (process p takes every process_count-th example), so on a
multi-host slice each host samples and labels its own prompts; `to_global` assembles the global batch on the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import jax
import numpy as np

from distil_jax import sharding


def prompt_stream(problems: Sequence, *, seed: int, per_iteration: int) -> grain.MapDataset:
  """Item i: this process's list of `per_iteration // process_count` problems for iteration i."""
  count, index = jax.process_count(), jax.process_index()
  if per_iteration % count:
    raise ValueError(f"train.prompts_per_iteration={per_iteration} is not divisible by {count} processes")
  ds = grain.MapDataset.source(problems).shuffle(seed=seed).repeat()
  # drop_remainder: the stream is endless anyway, and grain computes its length with float ceil otherwise (an
  # OverflowError for batches of 1)
  return ds[index::count].batch(per_iteration // count, batch_fn=list, drop_remainder=True)


def _stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def training_batches(fresh: Sequence[dict], old, *, mix: float, seed: int, batch_groups: int, steps: int):
  """`steps` batches of `batch_groups` groups: each group from the buffer window `old` with probability `mix`,
  otherwise from this iteration's `fresh` groups (both shuffled with `seed`, repeated as needed)."""
  ds = grain.MapDataset.source(list(fresh)).shuffle(seed=seed).repeat()
  if old is not None and len(old) and mix > 0:
    old_ds = grain.MapDataset.source(old).shuffle(seed=seed + 1).repeat()
    ds = grain.MapDataset.mix([ds, old_ds], weights=[1.0 - mix, mix])
  ds = ds.batch(batch_groups, batch_fn=_stack, drop_remainder=True)[:steps]  # see prompt_stream
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays on the mesh, rows over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def split_rows(rows: Sequence[dict]) -> list[dict]:
  """Per-group records from a dict of [n, ...] arrays."""
  n = len(next(iter(rows.values())))
  return [{k: v[i] for k, v in rows.items()} for i in range(n)]
