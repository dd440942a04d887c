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


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axes data, fsdp, tensor; one size may be -1 ("the rest")."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
  sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
  known = math.prod(s for s in sizes if s != -1)
  named = lambda: dict(zip(MESH_AXES, sizes, strict=True))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {named()}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {named()} needs {math.prod(sizes)} devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


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
