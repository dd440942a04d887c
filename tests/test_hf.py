"""Policy logits against `transformers` (the reference) through a checkpoint in both directions."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import ARCH_CONFIGS, hf_logits, random_hf_model

from distil_jax import hf

TOL_F32 = 1e-4


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_load_hf_matches_transformers(arch, tmp_path):
  ref = random_hf_model(arch)
  ref.save_pretrained(tmp_path)
  model, cfg = hf.load_hf(str(tmp_path))
  assert cfg.arch == arch
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 11))
  ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(ours, hf_logits(ref, tokens), atol=TOL_F32, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_save_hf_loads_in_transformers(arch, tmp_path):
  ref = random_hf_model(arch, seed=1)
  ref.save_pretrained(tmp_path / "in")
  model, cfg = hf.load_hf(str(tmp_path / "in"))
  hf.save_hf(model, cfg, str(tmp_path / "out"), dtype="float32")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
  assert type(back) is type(ref)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9))
  ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(hf_logits(back, tokens), ours, atol=TOL_F32, rtol=0)


def test_left_padding_matches_transformers(tmp_path):
  """A left-padded batch: positions restart after the padding, padding keys are masked, as in transformers."""
  ref = random_hf_model("llama", seed=2)
  ref.save_pretrained(tmp_path)
  model, cfg = hf.load_hf(str(tmp_path))
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, cfg.vocab_size, (2, 8))
  mask = np.ones((2, 8), np.int64)
  mask[0, :3] = 0
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    want = ref(
      input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
    ).logits.numpy()
  got = np.asarray(model(jnp.asarray(tokens, jnp.int32), segment_ids_BxT=jnp.asarray(mask, jnp.int32)))
  np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=TOL_F32, rtol=0)


def test_sharded_index_and_bf16_export(tmp_path):
  """A checkpoint split over several files with an index; a bf16 export within bf16 rounding of float32."""
  ref = random_hf_model("qwen3", seed=3)
  ref.save_pretrained(tmp_path / "in", max_shard_size="60KB")
  assert (tmp_path / "in" / "model.safetensors.index.json").exists()
  model, cfg = hf.load_hf(str(tmp_path / "in"))
  hf.save_hf(model, cfg, str(tmp_path / "out"), dtype="bfloat16", max_shard_bytes=50_000)
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 7))
  # bf16 weights carry ~3 significant digits; logits of this size move by a few 1e-3.
  np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(ref, tokens), atol=3e-2, rtol=0)


def test_unsupported_architecture_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    hf.load_hf(str(tmp_path))


def test_a_non_finite_weight_and_an_unsupported_rope_scaling_are_named(tmp_path):
  """A NaN weight used to load silently (a `model` teacher then trained the student to nothing); rope scaling of
  type yarn used to fail inside the first forward pass."""
  from safetensors.numpy import load_file, save_file

  random_hf_model("llama", seed=1).save_pretrained(tmp_path)
  weights = load_file(str(tmp_path / "model.safetensors"))
  name = "model.layers.1.mlp.up_proj.weight"
  weights[name] = weights[name].copy()
  weights[name][3, 5] = np.inf
  weights[name][4, 0] = np.nan
  save_file(weights, str(tmp_path / "model.safetensors"))
  message = rf"model\.safetensors: {name} has 2 non-finite values \(the first, inf, at index \(3, 5\)\): the"
  with pytest.raises(hf.InputError, match=message):
    hf.load_hf(str(tmp_path))

  config = json.loads((tmp_path / "config.json").read_text())
  config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
  config.pop("rope_parameters", None)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    hf.InputError, match=r"^config\.json: rope_scaling of type 'yarn' is not supported \(supported: default, llama3\)$"
  ):
    hf.load_hf(str(tmp_path))
