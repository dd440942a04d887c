"""Hugging Face checkpoints in and out: `config.json` + safetensors (single file or sharded with an index).

Parameter names already match Hugging Face's, so the mapping is one rule: a path `a/b/kernel` is `a.b.weight`
transposed (flax stores [in, out], torch [out, in]); `embedding` is `weight`; every other leaf keeps its name. The
decoder layers are stacked inside the model (`model/layers/...` leaves carry a leading [L] axis, for the layer scan):
leaf `model/layers/x` of layer i is Hugging Face's `model.layers.{i}.x`.
Supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM. No torch or transformers import.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from distil_jax import layers, sharding
from distil_jax import model as model_lib
from distil_jax.errors import InputError

_ARCH_TO_HF = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}
_HF_TO_ARCH = {v: k for k, v in _ARCH_TO_HF.items()}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}  # save_hf: export.dtype


def config_from_hf(hf: dict[str, Any], **overrides) -> model_lib.ModelConfig:
  """ModelConfig from a parsed `config.json` (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
  archs = hf.get("architectures") or []
  arch = next((_HF_TO_ARCH[a] for a in archs if a in _HF_TO_ARCH), hf.get("model_type"))
  if arch not in model_lib.ARCHS:
    raise InputError(
      f"config.json: architectures={archs}, model_type={hf.get('model_type')!r} is not supported "
      f"(supported: {sorted(_HF_TO_ARCH)})"
    )
  if hf.get("hidden_act", "silu") != "silu":
    raise InputError(f"config.json: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is supported")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    rope = {}
  elif kind not in layers.ROPE_SCALINGS:  # refused here, naming the field, not deep inside the first forward
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    raise InputError(
      f"config.json: {field} of type {kind!r} is not supported (supported: default, {', '.join(layers.ROPE_SCALINGS)})"
    )
  eos = hf.get("eos_token_id")
  fields = dict(
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    intermediate_size=hf["intermediate_size"],
    num_hidden_layers=hf["num_hidden_layers"],
    num_attention_heads=hf["num_attention_heads"],
    num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
    head_dim=hf.get("head_dim"),
    arch=arch,
    rope_theta=float(theta),
    rope_scaling=tuple(sorted(rope.items())) or None,
    rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
    tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    attention_bias=hf.get("attention_bias") if arch != "qwen2" else None,
    max_position_embeddings=hf.get("max_position_embeddings", 4096),
    initializer_range=hf.get("initializer_range", 0.02),
    bos_token_id=hf.get("bos_token_id"),
    eos_token_id=eos[0] if isinstance(eos, list) else eos,
    pad_token_id=hf.get("pad_token_id"),
  )
  fields.update(overrides)
  return model_lib.ModelConfig(**fields)


def config_to_hf(cfg: model_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  """The `config.json` that transformers writes for the same architecture."""
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling:
    rope.update(dict(cfg.rope_scaling))
  out = {
    "architectures": [_ARCH_TO_HF[cfg.arch]],
    "model_type": cfg.arch,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_hidden_layers,
    "num_attention_heads": cfg.num_attention_heads,
    "num_key_value_heads": cfg.num_key_value_heads,
    "head_dim": cfg.head_size,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_position_embeddings,
    "initializer_range": cfg.initializer_range,
    "rms_norm_eps": cfg.rms_norm_eps,
    "rope_theta": cfg.rope_theta,  # transformers 4.x
    "rope_parameters": rope,  # transformers 5.x
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": cfg.eos_token_id,
    "pad_token_id": cfg.pad_token_id,
    "dtype": dtype,
    "torch_dtype": dtype,
  }
  if cfg.arch != "qwen2":
    out["attention_bias"] = cfg.qkv_bias
  if cfg.rope_scaling:
    out["rope_scaling"] = dict(rope)
  return out


def _hf_names(path: tuple, shape) -> list[tuple[str, int | None, bool]]:
  """Our parameter path -> [(Hugging Face tensor name, layer index or None, transpose?)], one per stacked layer."""
  *prefix, leaf = (str(p) for p in path)
  transpose = leaf == "kernel"
  leaf = "weight" if leaf in ("kernel", "embedding") else leaf
  if prefix[:2] == ["model", "layers"]:
    return [(".".join(["model", "layers", str(i), *prefix[2:], leaf]), i, transpose) for i in range(shape[0])]
  return [(".".join(prefix + [leaf]), None, transpose)]


def _safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return sorted({os.path.join(path, v) for v in weight_map.values()})
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def load_hf(path: str, *, mesh=None, rules=None, dtype: str = "float32", **overrides):
  """(model, config) from a Hugging Face directory; each tensor is placed straight into its sharded place.

  `dtype` is the compute dtype; parameters are float32 whatever the checkpoint's dtype.
  """
  with open(os.path.join(path, "config.json")) as f:
    cfg = config_from_hf(json.load(f), dtype=dtype, **overrides)
  mesh = mesh or sharding.make_mesh({"fsdp": -1}, jax.devices()[:1])
  graphdef, targets = sharding.abstract_params(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh, rules)
  keyed = dict(zip(_ordered_keys(targets), jax.tree.leaves(targets), strict=True))
  wanted = {
    name: (keys, layer, t) for keys, target in keyed.items() for name, layer, t in _hf_names(keys, target.shape)
  }
  loaded, stacks, found = {}, {}, set()
  for file in _safetensors_files(path):
    with safe_open(file, framework="numpy") as f:
      for name in f.keys():
        if name not in wanted:
          if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some exporters write the tied head too
          raise InputError(f"{file}: unexpected tensor {name!r} for {cfg.arch}")
        keys, layer, transpose = wanted[name]
        target = keyed[keys]
        array = f.get_tensor(name)
        if not np.isfinite(array).all():  # a NaN weight trains to nothing (a teacher's) or stops at update 1
          bad = ~np.isfinite(array)
          raise InputError(
            f"{file}: {name} has {int(bad.sum())} non-finite values (the first, {array[bad][0]}, at index "
            f"{tuple(int(i) for i in np.argwhere(bad)[0])}): the checkpoint is damaged"
          )
        if transpose:
          array = array.T
        shape = target.shape if layer is None else target.shape[1:]
        if array.shape != shape:
          raise InputError(f"{file}: {name} has shape {array.shape}, config says {shape}")
        found.add(name)
        if layer is None:
          loaded[keys] = jax.device_put(np.asarray(array, np.float32), target.sharding)
          continue
        # A stacked leaf is assembled on the host, then placed once all its layers are read.
        stack, seen = stacks.setdefault(keys, (np.empty(target.shape, np.float32), set()))
        stack[layer] = array
        seen.add(layer)
        if len(seen) == target.shape[0]:
          loaded[keys] = jax.device_put(stacks.pop(keys)[0], target.sharding)
  missing = sorted(set(wanted) - found)
  if missing:
    raise InputError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  params = jax.tree_util.tree_unflatten(
    jax.tree_util.tree_structure(targets), [loaded[k] for k in _ordered_keys(targets)]
  )
  return nnx.merge(graphdef, params), cfg


def _ordered_keys(tree) -> list[tuple]:
  return [
    tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def save_hf(
  model, config: model_lib.ModelConfig, path: str, *, dtype: str = "bfloat16", max_shard_bytes: int = 4 << 30
) -> None:
  """Write `config.json` and safetensors (sharded with an index above `max_shard_bytes`) that transformers loads."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
  os.makedirs(path, exist_ok=True)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  tensors = {}
  for keys, leaf in zip(_ordered_keys(params), jax.tree.leaves(params), strict=True):
    array = np.asarray(jax.device_get(leaf), np.float32)
    for name, layer, transpose in _hf_names(keys, array.shape):
      one = array if layer is None else array[layer]
      tensors[name] = np.ascontiguousarray(one.T if transpose else one).astype(DTYPES[dtype])
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name], size = tensors[name], size + nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
      weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config, dtype), f, indent=2)


def save_generation_config(path: str, *, bos_id: int | None, stop_ids, pad_id: int | None) -> None:
  """`generation_config.json` with every id that ends a response, so `generate` on the folder stops where our
  sampler does (transformers reads `eos_token_id` as an int or a list)."""
  stops = [int(i) for i in stop_ids]
  config = {"bos_token_id": bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops, "pad_token_id": pad_id}
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(config, f, indent=2)
