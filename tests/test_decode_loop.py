"""The decode loop as compiled, read where it matters: on an fsdp mesh it holds no all-gather (the weights are
gathered once per rollout, before it); under `tensor` its cache is split over kv heads and its matmuls sum over
the mesh; it moves no cache or weight between layouts; the float32 master weights enter it already cast to bf16.
Sharded rollouts give one device's tokens."""

import dataclasses
import functools

import hlo_helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from distil_jax import data, decode, sampler, sharding
from distil_jax import model as model_lib

CFG = model_lib.ModelConfig(
  vocab_size=64,
  hidden_size=48,
  intermediate_size=80,
  num_hidden_layers=2,
  num_attention_heads=8,
  num_key_value_heads=4,  # 2 per device under tensor=2
  arch="qwen3",
  rope_theta=100.0,
)
PROMPTS, GROUP, BUCKET = 16, 2, 8  # 2+ prompts per device: XLA:CPU lays out degenerate (size-1) batches otherwise
SAMPLING = sampler.SamplingConfig(max_new_tokens=16, check_every=4, cache_segments=2, temperature=0.8)


def _inputs():
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, CFG.vocab_size, rng.integers(2, BUCKET + 1)).tolist() for _ in range(PROMPTS)]
  return sampler.left_pad(prompts, [BUCKET])


def _rollout(axes, cfg=CFG):
  """(compiled HLO text, tokens, log-probs) of one rollout from float32 masters placed on a mesh with `axes`."""
  devices = jax.devices()[: int(np.prod(list(axes.values())))]
  mesh = sharding.make_mesh(axes, devices)
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  prompt, mask = _inputs()
  with jax.set_mesh(mesh):
    prompt, mask = data.to_global({"t": prompt, "m": mask}, mesh).values()
    args = (graphdef, params, prompt, mask, jax.random.key(1), jnp.float32(SAMPLING.temperature))
    static = dict(cfg=dataclasses.replace(SAMPLING, temperature=1.0), samples_per_prompt=GROUP)  # as generate does
    hlo = sampler._generate.lower(*args, **static).compile().as_text()
    out = sampler.generate(graphdef, params, prompt, mask, jax.random.key(1), SAMPLING, samples_per_prompt=GROUP)
  return hlo, np.asarray(out.tokens), np.asarray(out.logprobs)


@functools.cache
def _one_device():
  return _rollout({"fsdp": 1})


@pytest.mark.parametrize("axes", [{"fsdp": 1}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}])
def test_decode_loop_on_a_mesh(axes):
  hlo, tokens, logprobs = _one_device() if axes == {"fsdp": 1} else _rollout(axes)
  rows = PROMPTS * GROUP // axes.get("fsdp", 1)
  kv = CFG.num_key_value_heads // axes.get("tensor", 1)
  e = CFG.head_size
  # Two while loops (segments): the first carries 8 response slots, the second 16 (= max_new_tokens), so the steps
  # of the first never read slots 8..15. The checks below read both.
  loop = [line for slots in (8, 16) for line in hlo_helpers.while_body_lines(hlo, f"f32[{rows},{kv},{slots},{e}]")]
  ops = [hlo_helpers.opcode(line) for line in loop]
  # Nothing as large as a cache (or a weight, larger still) changes layout or is copied per step; query-sized
  # arrays may (rows x heads x head dim, below this bound).
  cache_elements = min(rows * kv * 8 * e, PROMPTS // axes.get("fsdp", 1) * kv * BUCKET * e)
  assert rows * (CFG.num_attention_heads // axes.get("tensor", 1)) * e < cache_elements
  moved = [line for line, op in zip(loop, ops, strict=True) if op in ("transpose", "copy")]
  assert all(hlo_helpers.elements(line) < cache_elements for line in moved), moved
  # No weight is gathered inside the loop: the only all-gathers there collect per-row sampling results when the
  # vocabulary is split over `tensor` (rows x shards elements).
  gathers = [line for line, op in zip(loop, ops, strict=True) if op == "all-gather"]
  assert all(hlo_helpers.elements(line) <= rows * axes.get("tensor", 1) for line in gathers), gathers
  if axes != {"fsdp": 1}:
    everywhere = [hlo_helpers.opcode(line) for lines in hlo_helpers.computations(hlo).values() for line in lines]
    assert "all-gather" in everywhere  # the weights are sharded and gathered: before the loop
  if axes.get("tensor", 1) > 1:
    assert "all-reduce" in ops  # tensor-parallel matmuls sum their partial products inside the loop
  _, want_tokens, want_logprobs = _one_device()
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-5)  # float32 rounding of sharded sums


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


def test_master_weights_are_cast_once_before_the_loop():
  """bf16 compute from float32 masters (as the training loop holds them): the weights enter the decode loops as
  bf16 operands, and no weight-shaped array is converted inside them (the cast happens once, before)."""
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  graphdef, params = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = params.to_pure_dict()
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  read = jax.eval_shape(lambda p: decode.prepare(model_lib.merge_for_compute(graphdef, p)), params)
  masters = [x.shape for x in jax.tree.leaves(params) if x.ndim >= 2]
  weight_shapes = {x.shape for x in jax.tree.leaves(read) if x.ndim >= 2} | set(masters) | {s[1:] for s in masters}
  prompt, mask = _inputs()
  generate = functools.partial(sampler._generate, cfg=SAMPLING, samples_per_prompt=GROUP)
  jaxpr = jax.make_jaxpr(generate, static_argnums=0)(graphdef, params, prompt, mask, jax.random.key(0), 1.0)
  loops = [eqn for eqn in _eqns(jaxpr.jaxpr) if eqn.primitive.name == "while"]
  loops = [e for e in loops if any(x.primitive.name == "dot_general" for x in _eqns(e.params["body_jaxpr"].jaxpr))]
  assert len(loops) == len(sampler.segment_ends(16, 2, 4)) == 2
  for loop in loops:
    weights = [v.aval for v in loop.invars if v.aval.shape in weight_shapes]
    assert len(weights) >= 5 * cfg.num_hidden_layers and {a.dtype for a in weights} == {jnp.dtype(jnp.bfloat16)}
    body = list(_eqns(loop.params["body_jaxpr"].jaxpr))
    casts = [e for e in body if e.primitive.name == "convert_element_type" and e.invars[0].aval.shape in weight_shapes]
    assert not casts, casts
