"""KV-cache decoding against the full forward pass, and greedy sampling against transformers' `generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import random_hf_model

from distil_jax import hf, sampler
from distil_jax import model as model_lib

CFG = model_lib.ModelConfig(
  vocab_size=61,
  hidden_size=48,
  intermediate_size=80,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  arch="qwen3",
  rope_theta=100.0,
)


def test_cache_decode_equals_full_forward():
  """Prefill a left-padded prompt, then one token per step: each step's logits equal the full pass (f32, 1e-5)."""
  model = model_lib.create(CFG, seed=1)
  rng = np.random.default_rng(0)
  b, pad, p, n = 2, 3, 5, 6
  seq = rng.integers(1, CFG.vocab_size, (b, pad + p + n)).astype(np.int32)
  seg = np.ones_like(seq)
  seg[0, :pad] = 0  # row 0 is left-padded, row 1 is not
  full = np.asarray(model(jnp.asarray(seq), segment_ids_BxT=jnp.asarray(seg)))
  cache = model_lib.init_cache(CFG, b, pad + p + n)
  positions = model_lib.default_positions(jnp.asarray(seg))
  hidden, cache = model.hidden_states(
    jnp.asarray(seq[:, : pad + p]),
    positions_BxT=positions[:, : pad + p],
    segment_ids_BxT=jnp.asarray(seg[:, : pad + p]),
    cache=cache,
    cache_index=0,
  )
  got = [np.asarray(model.logits(hidden))]
  for t in range(pad + p, pad + p + n - 1):
    hidden, cache = model.hidden_states(
      jnp.asarray(seq[:, t : t + 1]),
      positions_BxT=positions[:, t : t + 1],
      segment_ids_BxT=jnp.ones((b, 1), jnp.int32),
      cache=cache,
      cache_index=t,
    )
    got.append(np.asarray(model.logits(hidden)))
  got = np.concatenate(got, axis=1)
  valid = seg[:, : pad + p + n - 1] == 1
  np.testing.assert_allclose(got[valid], full[:, :-1][valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_transformers_generate(arch, tmp_path):
  ref = random_hf_model(arch, seed=4)
  ref.save_pretrained(tmp_path)
  model, cfg = hf.load_hf(str(tmp_path))
  graphdef, params = nnx.split(model, nnx.Param)
  prompts = [[5, 17, 3, 88, 41], [9, 2]]  # different lengths: the second is left-padded
  tokens, mask = sampler.left_pad(prompts, buckets=[8])
  n = 12
  out = sampler.generate(
    graphdef,
    params.to_pure_dict(),
    tokens,
    mask,
    jax.random.key(0),
    sampler.SamplingConfig(max_new_tokens=n, greedy=True),
  )
  for i, prompt in enumerate(prompts):
    with torch.no_grad():
      want = ref.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
      )[0, len(prompt) :].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens[i]), want)
  assert np.asarray(out.lengths).tolist() == [n, n]


def test_eos_stops_rows_and_logprobs_match_policy():
  """Rows stop at EOS (kept, then padding); at temperature 1 the returned log-probs are the policy's."""
  model = model_lib.create(CFG, seed=2)
  graphdef, params = nnx.split(model, nnx.Param)
  params = params.to_pure_dict()
  tokens, mask = sampler.left_pad([[3, 4, 5], [7, 8], [1, 2, 3]], buckets=[4])
  eos = 11
  # Make EOS likely so that some rows stop early.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, eos].add(0.3)
  cfg = sampler.SamplingConfig(max_new_tokens=10, eos_id=eos, pad_id=0)
  out = sampler.generate(graphdef, params, tokens, mask, jax.random.key(3), cfg)
  toks, lps, lens = (np.asarray(x) for x in out)
  assert (lens < 10).any(), "the test needs at least one row that stopped at EOS"
  for i in range(3):
    if lens[i] < 10:
      assert toks[i, lens[i] - 1] == eos and (toks[i, lens[i] :] == 0).all() and (lps[i, lens[i] :] == 0).all()
    # Recompute log pi(y_t) with a full forward pass on prompt + sampled tokens.
    seq = np.concatenate([tokens[i], toks[i, : lens[i]]])[None]
    seg = np.concatenate([mask[i], np.ones(lens[i], np.int32)])[None]
    logits = nnx.merge(graphdef, params)(jnp.asarray(seq), segment_ids_BxT=jnp.asarray(seg))
    logp = jax.nn.log_softmax(logits[0, tokens.shape[1] - 1 : -1], -1)
    want = np.asarray(logp[jnp.arange(lens[i]), toks[i, : lens[i]]])
    np.testing.assert_allclose(lps[i, : lens[i]], want, atol=1e-5)


def test_top_k_and_top_p_restrict_support():
  """With top_k=1 or a tiny top_p, sampling is greedy; with top_k=3, every token is among the 3 most likely."""
  model = model_lib.create(CFG, seed=3)
  graphdef, params = nnx.split(model, nnx.Param)
  params = params.to_pure_dict()
  tokens, mask = sampler.left_pad([[3, 4, 5]] * 4, buckets=[4])
  greedy = sampler.generate(
    graphdef, params, tokens, mask, jax.random.key(0), sampler.SamplingConfig(max_new_tokens=5, greedy=True)
  ).tokens
  for cfg in [
    sampler.SamplingConfig(max_new_tokens=5, top_k=1, temperature=2.0),
    sampler.SamplingConfig(max_new_tokens=5, top_p=1e-6, temperature=2.0),
  ]:
    out = sampler.generate(graphdef, params, tokens, mask, jax.random.key(1), cfg)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy))
    np.testing.assert_allclose(np.asarray(out.logprobs), 0.0, atol=1e-6)  # all mass on one token
  out = sampler.generate(
    graphdef,
    params,
    tokens,
    mask,
    jax.random.key(2),
    sampler.SamplingConfig(max_new_tokens=1, top_k=3, temperature=5.0),
  )
  logits = nnx.merge(graphdef, params)(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(mask))[:, -1]
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  assert all(out.tokens[i, 0] in top3[i] for i in range(4))


def test_prompt_bucketing():
  assert sampler.bucket_length(5, [4, 8, 16]) == 8
  with pytest.raises(ValueError, match="largest length bucket 16"):
    sampler.bucket_length(17, [4, 8, 16])
  tokens, mask = sampler.left_pad([[1, 2, 3], [4]], buckets=[2, 4])
  np.testing.assert_array_equal(tokens, [[0, 1, 2, 3], [0, 0, 0, 4]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
