"""Device mesh, logical-to-mesh rules, and placement of parameters and batches.

Mode: the mesh uses `AxisType.Auto` (classic GSPMD propagation). jax >= 0.7 makes `Explicit` axes by default, where
every gather, embedding lookup and contraction on sharded operands must name its output sharding; the policy code
would then carry sharding annotations on every op. With `Auto` we annotate parameters (logical axis names, mapped by
the rules below), batches, and activations at block boundaries and logits, and let XLA propagate the rest.

The same code runs on one device, on 8 fake CPU devices, on a GPU host and on a TPU slice: only the axis sizes differ.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from distil_jax import checks

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Tokens split over data and fsdp; weights are fully sharded over fsdp on their model
# dimension and tensor-parallel over heads, MLP width and vocabulary.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("norm", None),
  ("head_dim", None),
  ("layers", None),  # the stacked decoder layers (scanned): every device holds its share of every layer
)


def check_mesh(ch: checks.Checks, devices: int) -> dict[str, int] | None:
  """The `mesh` section against `devices`, one line per problem (`checks.py`); each axis's size when it fits."""
  axes = {}
  for name in MESH_AXES:
    key = f"mesh.{name}"
    if not ch.number(key, integer=True):
      continue
    if ch.value(key) >= 1 or ch.value(key) == -1:
      axes[name] = ch.value(key)
    else:
      ch.fail(key, "must be >= 1, or -1 for the devices left")
  if not ch.number("mesh.num_devices", lo=0, hi=devices, integer=True) or len(axes) < len(MESH_AXES):
    return None
  n = ch.value("mesh.num_devices") or devices
  known = math.prod(v for v in axes.values() if v != -1)
  shown = ", ".join(f"{k}={v}" for k, v in axes.items())
  if list(axes.values()).count(-1) > 1:
    ch.lines.append(f"mesh ({shown}): at most one axis may be -1")
    return None
  if (-1 in axes.values() and n % known) or (-1 not in axes.values() and known != n):
    ch.lines.append(
      f"mesh ({shown}) does not fit the {n} devices in use (mesh.num_devices={ch.value('mesh.num_devices')})"
    )
    return None
  return {k: (n // known if v == -1 else v) for k, v in axes.items()}


def check_rules(ch: checks.Checks) -> None:
  """`sharding_rules`: each a [logical axis, mesh axis or axes] pair."""
  for rule in ch.value("sharding_rules") if ch.has("sharding_rules") else ():
    targets = rule[1] if len(rule) == 2 else None
    names = (targets,) if isinstance(targets, str) else tuple(targets or ())
    if len(rule) != 2 or set(names) - set(MESH_AXES):
      ch.lines.append(f"sharding_rules: {list(rule)} is not [logical axis, mesh axis or axes among {MESH_AXES}]")


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axes data, fsdp, tensor (1 where not given); one size may be -1
  ("the rest")."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
  section = {**{name: int(axes.get(name, 1)) for name in MESH_AXES}, "num_devices": len(devices)}
  sizes = checks.raise_problems("mesh", section, lambda ch: check_mesh(ch, len(devices)))
  return jax.make_mesh(
    tuple(sizes[name] for name in MESH_AXES),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
    devices=devices,
  )


def logical_to_spec(logical_axes: Sequence[str | None], rules=None, shape=None, mesh=None) -> P:
  """Map logical axis names to a PartitionSpec; a mesh axis is used once, and never on a dim it does not divide."""
  table = dict(rules if rules is not None else DEFAULT_RULES)
  used, out = set(), []
  for i, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n not in used)
    if names and shape is not None and mesh is not None:
      size = math.prod(mesh.shape[n] for n in names)
      if shape[i] % size:
        names = ()
    used.update(names)
    out.append(names[0] if len(names) == 1 else (names or None))
  return P(*out)


def _variable_spec(var: nnx.Variable, rules, mesh) -> P:
  axes = var.get_metadata().get("out_sharding")
  if not axes:
    return P()
  return logical_to_spec(axes, rules, var.shape, mesh)


def param_shardings(abstract_state: nnx.State, mesh, rules=None):
  """NamedShardings, as a pure dict shaped like `state.to_pure_dict()`, from each parameter's logical axes."""
  specs = jax.tree.map(
    lambda v: _variable_spec(v, rules, mesh),
    abstract_state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return jax.tree.map(lambda s: NamedSharding(mesh, s), nnx.State(specs).to_pure_dict())


def batch_shards(mesh) -> int:
  """How many devices a batch's rows are split over (data x fsdp): what a batch's row count must divide."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Leading (example) dimension split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def use(mesh, rules=None):
  """The mesh and the logical rules that activation constraints read while jitted code traces: the run's one set of
  rules (`config.sharding_rules`) places parameters (`param_shardings`) and activations (`constrain`) alike."""
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(tuple(rules or DEFAULT_RULES)):
    yield


def activation_spec(logical_axes: Sequence[str | None], shape) -> P | None:
  """The PartitionSpec of an activation under the current mesh and rules (`use`; the default rules outside it);
  None when no mesh is set (one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  return logical_to_spec(logical_axes, flax_spmd.get_logical_axis_rules() or DEFAULT_RULES, shape, mesh)


def constrain(x, logical_axes: Sequence[str | None]):
  """Activation sharding hint under the current mesh and rules; a no-op when no mesh is set (one device)."""
  spec = activation_spec(logical_axes, x.shape)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def init_params(make_model, mesh, rules=None):
  """(graphdef, params) with every parameter created directly in its sharded place (no host copy).

  `make_model()` builds the NNX module; it is traced once abstractly to read shapes and logical axes, then run under
  `jit` with those output shardings, as nanodo does.
  """
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  shardings = param_shardings(abstract_params, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(make_model(), nnx.Param).to_pure_dict()

  return graphdef, init()


def abstract_params(make_model, mesh, rules=None):
  """ShapeDtypeStructs with shardings for every parameter: the restore target for checkpoints and HF import."""
  abstract = nnx.eval_shape(make_model)
  graphdef, state = nnx.split(abstract, nnx.Param)
  shardings = param_shardings(state, mesh, rules)
  shapes = state.to_pure_dict()
  return graphdef, jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
