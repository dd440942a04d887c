"""The sampler against independent references: the full forward pass (every decode step's logits, float32 and
bf16), transformers' greedy `generate`, the policy's log-probs recomputed by the forward pass, a numpy nucleus;
shared prefill against independent prompts; and the compiled decode loop (no all-gather on an fsdp mesh, no
transposed cache, no weight cast inside it)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import random_hf_model

from distil_jax import decode, hf, sampler
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


def _params(cfg, seed, head_scale=1.0):
  graphdef, params = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
  params = params.to_pure_dict()
  if head_scale != 1.0:  # peaked next-token distributions (the initialiser's are near uniform)
    if cfg.tie_word_embeddings:
      params["model"]["embed_tokens"]["embedding"] *= head_scale
    else:
      params["lm_head"]["kernel"] *= head_scale
  return graphdef, params


@functools.partial(jax.jit, static_argnames=("graphdef", "rows", "slots"))
def _prefill(graphdef, params, prompt, mask, rows, slots):
  model = model_lib.merge_for_compute(graphdef, params)
  logits, cache = decode.prefill(model, prompt, mask)
  return decode.prepare(model), logits, decode.grow(cache, rows, slots, model.config)


def _forward(graphdef, params, seq, seg):
  return np.asarray(jax.jit(lambda p: model_lib.merge_for_compute(graphdef, p)(seq, segment_ids_BxT=seg))(params))


_step = jax.jit(decode.step, static_argnums=1)
_grow = jax.jit(decode.grow, static_argnums=(1, 2, 3))


@pytest.mark.parametrize(
  "arch,dtype,tied",
  [("qwen3", "float32", False), ("qwen2", "bfloat16", True)],
)
def test_decode_steps_equal_full_forward(arch, dtype, tied):
  """Two prompts (one left-padded), three responses each with their own tokens, the response cache grown in the
  middle: the logits of every step equal the full forward pass over [prompt | own response] (float32: 1e-5;
  bf16: both paths round differently, so within 2% of the logit scale, and both within 5% of float32)."""
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "arch": arch, "dtype": dtype, "tie_word_embeddings": tied})
  graphdef, params = _params(cfg, seed=1, head_scale=20.0)
  rng = np.random.default_rng(0)
  bp, r, p, n = 2, 3, 6, 7
  prompt, mask = sampler.left_pad([rng.integers(1, 61, 4), rng.integers(1, 61, 6)], [p])
  response = rng.integers(1, 61, (bp * r, n)).astype(np.int32)
  weights, logits, cache = _prefill(graphdef, params, prompt, mask, rows=bp * r, slots=3)
  got = [np.repeat(np.asarray(logits), r, 0)]
  start = np.repeat(mask.sum(1), r)
  for t in range(n - 1):
    if t == 3:
      cache = _grow(cache, bp * r, 8, cfg)
    logits, cache = _step(weights, cfg, cache, response[:, t], start + t, t)
    got.append(np.asarray(logits))
  got = np.stack(got, 1)
  seq = np.concatenate([np.repeat(prompt, r, 0), response], 1)
  seg = np.concatenate([np.repeat(mask, r, 0), np.ones_like(response)], 1)
  want = _forward(graphdef, params, seq, seg)[:, p - 1 : -1]
  scale = np.abs(want).max()
  assert scale > 1.0  # logits far from zero, so that the tolerance below is a real bound
  if dtype == "float32":
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-5)
  else:
    np.testing.assert_allclose(got, want, atol=0.02 * scale, rtol=0)
    graphdef32, _ = nnx.split(
      model_lib.Transformer(model_lib.ModelConfig(**{**cfg.__dict__, "dtype": "float32"}), rngs=nnx.Rngs(0))
    )
    want32 = _forward(graphdef32, params, seq, seg)[:, p - 1 : -1]
    np.testing.assert_allclose(got, want32, atol=0.05 * scale, rtol=0)


@pytest.mark.parametrize("arch,samples", [("llama", 1), ("qwen3", 2)])
def test_greedy_equals_transformers_generate(arch, samples, tmp_path):
  ref = random_hf_model(arch, seed=4)
  ref.save_pretrained(tmp_path)
  model, _ = hf.load_hf(str(tmp_path))
  graphdef, params = nnx.split(model, nnx.Param)
  prompts = [[5, 17, 3, 88, 41], [9, 2]]  # different lengths: the second is left-padded
  tokens, mask = sampler.left_pad(prompts, buckets=[8])
  n = 12
  cfg = sampler.SamplingConfig(max_new_tokens=n, greedy=True)
  out = sampler.generate(
    graphdef, params.to_pure_dict(), tokens, mask, jax.random.key(0), cfg, samples_per_prompt=samples
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
    for g in range(samples):
      np.testing.assert_array_equal(np.asarray(out.tokens[i * samples + g]), want)
  assert np.asarray(out.lengths).tolist() == [n] * 2 * samples


def _nucleus(z, top_k, top_p):
  """The kept ids of softmax(z) under top-k then top-p, by a full numpy sort (ties at a cut are kept)."""
  order = np.argsort(-z, kind="stable")
  k = top_k or len(z)
  kept = z >= z[order[k - 1]]
  if top_p >= 1.0:
    return kept
  zk = np.where(kept, z.astype(np.float64), -np.inf)
  probs = np.exp(zk - zk.max())
  sorted_p = probs[order] / probs.sum()
  count = int(np.sum(np.cumsum(sorted_p) - sorted_p < top_p))
  return kept & (z >= z[order[count - 1]])


def _check_against_forward(graphdef, params, prompt, mask, out, cfg, samples):
  """Each sampled token is in the kept set of softmax(z / T) over ids < vocab_limit (numpy nucleus) and its
  log-prob is log p / p(kept), with z recomputed by one full forward pass over [prompt | response]. A row's tokens
  after its end do not change its earlier logits (causal), so padded rows share one pass."""
  toks, lps, lens = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
  seq = np.concatenate([np.repeat(prompt, samples, 0), toks], 1)
  seg = np.concatenate([np.repeat(mask, samples, 0), np.ones_like(toks)], 1)
  z = _forward(graphdef, params, seq, seg)[:, prompt.shape[1] - 1 : -1, : cfg.vocab_limit] / cfg.temperature
  for i in range(len(toks)):
    assert (lps[i, lens[i] :] == 0).all() and (toks[i, lens[i] :] == cfg.pad_id).all()
    for t in range(lens[i]):
      kept = _nucleus(z[i, t], cfg.top_k, cfg.top_p)
      assert kept[toks[i, t]], (i, t)
      p = np.exp(z[i, t] - z[i, t].max())
      np.testing.assert_allclose(lps[i, t], np.log(p[toks[i, t]] / p[kept].sum()), atol=1e-5)
  return lens


def test_logprobs_are_the_policy_at_temperature_with_eos_and_padded_vocabulary():
  """At T = 0.7 with the last 5 LM-head rows outside the tokenizer, two responses per prompt: rows stop at EOS
  (kept, then padding) and each log-prob is log softmax(z / 0.7) over the real ids, recomputed by the forward pass
  (the policy the losses differentiate)."""
  graphdef, params = _params(CFG, seed=2, head_scale=8.0)
  eos = 11
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, eos].add(0.3)  # some rows stop early
  prompt, mask = sampler.left_pad([[3, 4, 5], [7, 8], [1, 2, 3]], buckets=[4])
  cfg = sampler.SamplingConfig(max_new_tokens=10, temperature=0.7, eos_id=eos, vocab_limit=56)
  out = sampler.generate(graphdef, params, prompt, mask, jax.random.key(3), cfg, samples_per_prompt=2)
  lens = _check_against_forward(graphdef, params, prompt, mask, out, cfg, samples=2)
  assert (lens < 10).any() and (lens == 10).any(), lens
  assert all(out.tokens[i, lens[i] - 1] == eos for i in range(6) if lens[i] < 10)


def test_top_k_and_top_p_in_the_loop():
  """top-k then top-p at T = 1.5 inside the decode loop: tokens in the numpy nucleus of the forward pass's logits,
  log-probs those of the truncated distribution."""
  graphdef, params = _params(CFG, seed=3, head_scale=6.0)
  prompt, mask = sampler.left_pad([[3, 4, 5], [9]], buckets=[4])
  cfg = sampler.SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=6, top_p=0.7, vocab_limit=61)
  out = sampler.generate(graphdef, params, prompt, mask, jax.random.key(4), cfg, samples_per_prompt=4)
  _check_against_forward(graphdef, params, prompt, mask, out, cfg, samples=4)
  assert len(np.unique(np.asarray(out.tokens))) > 4  # sampled, not greedy


def test_shared_prefill_equals_independent_prompts_and_the_loop_stops_early():
  """G responses to a prompt from one shared prefill are the tokens and log-probs of G copies of the prompt, under
  the same key. EOS is likely, so rows end at different steps, all well before max_new_tokens: the loop stops at
  the end of the block of `check_every` steps in which the last row ended."""
  graphdef, params = _params(CFG, seed=5, head_scale=4.0)
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 7].add(1.0)
  prompt, mask = sampler.left_pad([[3, 4, 5, 6, 9], [7, 8], [1, 2, 3]], buckets=[8])
  cfg = sampler.SamplingConfig(max_new_tokens=40, eos_id=7, check_every=4)
  key = jax.random.key(7)
  shared = sampler.generate(graphdef, params, prompt, mask, key, cfg, samples_per_prompt=4)
  alone = sampler.generate(graphdef, params, np.repeat(prompt, 4, 0), np.repeat(mask, 4, 0), key, cfg)
  lengths = np.asarray(shared.lengths)
  assert len(set(lengths.tolist())) > 2 and lengths.max() <= 28, lengths
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(alone.tokens))
  np.testing.assert_array_equal(lengths, np.asarray(alone.lengths))
  np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(alone.logprobs), atol=1e-5)  # f32 rounding
  assert int(shared.steps) == int(alone.steps) == -(-lengths.max() // 4) * 4
  assert sampler.segment_ends(40, 4, 4) == [12, 20, 32, 40]  # the default 4 while loops, ends on block edges
  assert sampler.segment_ends(5, 4, 8) == [8]  # a single block: one loop


@pytest.mark.parametrize(
  "top_k,top_p,flat,among_candidates",
  [
    (0, 0.9, False, True),
    (0, 0.9, True, False),
    (10, 0.95, False, True),
    (40, 0.95, False, False),
    (3, 1.0, True, True),
  ],
)
def test_truncated_sampling_matches_a_numpy_nucleus(top_k, top_p, flat, among_candidates):
  """Over 5000 ids (candidates: the top 16 of each of three 2048-id chunks): every sampled token is in the numpy
  nucleus and its log-prob is log p / p(nucleus). A nucleus of flat rows, or a top-40, reaches past the candidates:
  those take the full-sort branch."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(64, 5000)).astype(np.float32) * (0.05 if flat else 8.0)
  cfg = sampler.SamplingConfig(max_new_tokens=1, top_k=top_k, top_p=top_p)
  values, _, bound = sampler._candidates(jnp.asarray(z))
  _, lowest_cut = sampler._truncation_threshold(values, jax.nn.logsumexp(z, axis=-1), cfg)
  assert bool(jnp.all(lowest_cut[:, 0] > bound)) == among_candidates  # the branch this case takes
  token, logprob = jax.jit(sampler._pick, static_argnums=2)(jnp.asarray(z), jax.random.key(1), cfg, 1.0)
  for i in range(z.shape[0]):
    kept = _nucleus(z[i], top_k, top_p)
    assert kept[int(token[i])]
    p = np.exp(z[i] - z[i].max())
    np.testing.assert_allclose(float(logprob[i]), np.log(p[token[i]] / p[kept].sum()), atol=1e-4)


def test_draws_follow_the_softmax():
  """The sampler's draw against the closed form softmax(z), over 2,500 ids (nine whole 256-id chunks and a part one)
  with ids at -inf at both ends and four whole chunks of them: 120,000 draws pass a chi-square test on bins of at
  least 20 expected draws (a shift of mass by one id, or within the wrong chunk, fails it), and no -inf id is drawn."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=2500).astype(np.float32) * 2.5
  z[:3] = z[-5:] = z[1024:2048] = -np.inf
  p = np.exp(z - z.max())
  p /= p.sum()
  draw = jax.jit(lambda key: sampler._draw(jnp.broadcast_to(jnp.asarray(z), (4000, z.size)), key))
  drawn = np.concatenate([np.asarray(draw(jax.random.key(i))) for i in range(30)])
  assert np.isfinite(z[drawn]).all()
  counts = np.bincount(drawn, minlength=z.size)
  order = np.argsort(p)[::-1]
  expected, observed = p[order] * drawn.size, counts[order]
  edges = np.searchsorted(np.cumsum(expected), np.arange(20, expected.sum() - 20, 20))  # bins of >= 20 expected
  e_bins, o_bins = np.add.reduceat(expected, np.r_[0, edges + 1]), np.add.reduceat(observed, np.r_[0, edges + 1])
  e_bins, o_bins = e_bins[e_bins > 0], o_bins[: len(e_bins)]
  chi2, dof = ((o_bins - e_bins) ** 2 / e_bins).sum(), len(e_bins) - 1
  assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


def test_inverse_cdf_never_lands_on_a_zero_weight_id():
  """At the uniforms' ends (0, and the largest float32 below 1, whose product with the total can round up to it) the
  draw takes the first and the last id of positive weight, not a masked id beside them."""
  z = np.full((2, 3000), -np.inf, np.float32)
  z[:, 5:1500] = 0.0
  u = jnp.asarray([[[0.0], [np.nextafter(np.float32(1), np.float32(0))]]] * 2)
  np.testing.assert_array_equal(np.asarray(sampler.inverse_cdf(jnp.asarray(z), u)), [5, 1499])


def test_prompt_bucketing():
  assert sampler.bucket_length(5, [4, 8, 16]) == 8
  with pytest.raises(ValueError, match="largest length bucket 16"):
    sampler.bucket_length(17, [4, 8, 16])
  tokens, mask = sampler.left_pad([[1, 2, 3], [4]], buckets=[2, 4])
  np.testing.assert_array_equal(tokens, [[0, 1, 2, 3], [0, 0, 0, 4]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])


def test_every_stop_id_ends_a_row_as_eos_does():
  """With a second stop id (an end-of-turn token beside EOS), each row is the EOS-only run's row under the same key,
  cut after the first of either id, then padded: one more stop changes where rows end and nothing before."""
  graphdef, params = _params(CFG, seed=2, head_scale=8.0)
  eos = 11
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, eos].add(0.3)
  prompt, mask = sampler.left_pad([[3, 4, 5], [7, 8], [1, 2, 3]], buckets=[4])
  cfg = sampler.SamplingConfig(max_new_tokens=10, temperature=0.7, eos_id=eos, vocab_limit=56)
  key = jax.random.key(3)
  plain = jax.tree.map(np.asarray, sampler.generate(graphdef, params, prompt, mask, key, cfg, samples_per_prompt=2))
  seen = [int(plain.tokens[i, t]) for i in range(6) for t in range(int(plain.lengths[i]) - 1)]
  stop = max(set(seen), key=seen.count)  # a token some rows write before they end
  cfg2 = dataclasses.replace(cfg, stop_ids=(stop,))
  both = jax.tree.map(np.asarray, sampler.generate(graphdef, params, prompt, mask, key, cfg2, samples_per_prompt=2))
  cut = 0
  for i in range(6):
    row = plain.tokens[i, : plain.lengths[i]].tolist()
    n = next(t + 1 for t, tok in enumerate(row + [eos]) if tok in (eos, stop) or t + 1 == cfg.max_new_tokens)
    n = min(n, len(row))
    cut += n < len(row)
    assert int(both.lengths[i]) == n
    assert both.tokens[i, :n].tolist() == row[:n] and (both.tokens[i, n:] == cfg.pad_id).all()
  assert cut > 0
