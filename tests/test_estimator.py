"""The estimator as the loop feeds it: the sampler's policy is the loss's policy (temperature, padded vocabulary), the
teacher reads the student's prompt format, nothing is trained on a cut prompt, and GRPO is GRPO."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_update import CFG  # noqa: E402  (48 LM-head rows)

from distil_jax import build, config_base, experts, losses, rollout, sampler, sharding, train, update, validate
from distil_jax import model as model_lib
from distil_jax import tokenizer as tok_lib
from distil_jax.tasks.base import Problem, Verdict

REAL_VOCAB = 43  # the tokenizer's ids; the LM head has 48 rows (padded to a multiple of 8), as build.py builds it
BG, G, P, N, K = 2, 4, 5, 12, 2


def _peaked_policy(scale=6.0):
  """A random policy with its LM head scaled up: next-token distributions far from uniform, so that sampling at
  T = 0.7 is a different policy from T = 1 (on a near-uniform policy every ratio would be close to 1 anyway)."""
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  graphdef, params = sharding.init_params(lambda: model_lib.Transformer(CFG, rngs=nnx.Rngs(3)), mesh)
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * scale
  return mesh, graphdef, params


def _fresh_batch(graphdef, params, temperature):
  rng = np.random.default_rng(0)
  prompts = rng.integers(4, REAL_VOCAB, (BG, P)).astype(np.int32)
  cfg = sampler.SamplingConfig(max_new_tokens=N, temperature=temperature, vocab_limit=REAL_VOCAB, eos_id=None)
  out = sampler.generate(
    graphdef, params, np.repeat(prompts, G, 0), np.ones((BG * G, P), np.int32), jax.random.key(1), cfg
  )
  tokens, logprobs = np.asarray(out.tokens).reshape(BG, G, N), np.asarray(out.logprobs).reshape(BG, G, N)
  assert tokens.max() < REAL_VOCAB
  ids = rng.integers(0, REAL_VOCAB, (BG, G, N, K)).astype(np.int32)
  return {
    "prompt_tokens": prompts,
    "prompt_mask": np.ones((BG, P), np.int32),
    "tokens": tokens,
    "mask": np.ones((BG, G, N), np.int32),
    "logprobs": logprobs,
    "reward": rng.integers(0, 2, (BG, G)).astype(np.float32),
    "iteration": np.zeros(BG, np.int32),
    "sft_tokens": np.zeros((BG, N), np.int32),
    "sft_mask": np.zeros((BG, N), np.int32),
    "target_ids": ids,
    "target_logprobs": np.full((BG, G, N, K), np.log(0.3), np.float32),
  }


def _validate(config):
  validate.config(config, devices=1, processes=1)


def _loop_config(**overrides):
  c = config_base.get_config()
  c.sampling.temperature = 0.7
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def _first_update_metrics(loss_cfg, graphdef, params, batch, mesh):
  tx = update.make_optimizer(
    types.SimpleNamespace(
      lr=1e-3, lr_warmup_steps=0, schedule="constant", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0
    ),
    10,
  )
  state = update.init_state(tx, params, mesh)
  step = update.make_update(graphdef, tx, update.UpdateOptions(loss_cfg, labels="topk"))
  _, metrics = step(state, batch, None, jnp.int32(0))
  return jax.device_get(metrics)


@pytest.mark.parametrize("kind", ["distil", "grpo"])
def test_fresh_rollouts_have_ratio_one_at_temperature_07(kind):
  """Through the loop's own loss construction and update: rollouts sampled at T = 0.7 from a peaked policy with a
  padded LM head give ratio exactly 1 (to float32 rounding) and no clipping on their first update. The loss's mean
  log pi(y_t) is the sampler's mean behaviour log-prob. The old loss (T = 1, every LM-head row) is shown to fail the
  same check, so the check has teeth."""
  mesh, graphdef, params = _peaked_policy()
  batch = _fresh_batch(graphdef, params, temperature=0.7)
  tok = types.SimpleNamespace(vocab_size=REAL_VOCAB)
  expert = types.SimpleNamespace(reads_siblings=False, on_device=False)
  loss_cfg = build.loss_config(_loop_config(**{"loss.kind": kind}), tok, expert)
  assert (loss_cfg.policy_temperature, loss_cfg.vocab_limit) == (0.7, REAL_VOCAB)
  m = _first_update_metrics(dataclasses.replace(loss_cfg, chunk_size=4), graphdef, params, batch, mesh)
  np.testing.assert_allclose(m["ratio_mean"], 1.0, atol=2e-5)
  assert m["clip_fraction"] == 0.0
  np.testing.assert_allclose(m["logp"], batch["logprobs"].mean(), rtol=1e-5)
  old = dataclasses.replace(loss_cfg, policy_temperature=1.0, vocab_limit=0, chunk_size=4)
  m_old = _first_update_metrics(old, graphdef, params, batch, mesh)
  assert m_old["clip_fraction"] > 0.1, m_old["clip_fraction"]


def test_padded_vocabulary_is_outside_both_distributions():
  """Loss with V = 48 rows of which 43 are ids equals the loss computed on the 43 real ids alone, in value and
  gradient (dense teacher, and a top-k teacher whose tail bucket covers real ids only); padded rows get no
  gradient."""
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(4, 6, 48)) * 2, jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(4, 6, 48)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, REAL_VOCAB, (4, 6)), jnp.int32)
  mask = jnp.ones((4, 6))
  ids = jnp.asarray(rng.integers(0, REAL_VOCAB, (4, 6, 3)), jnp.int32)
  topk = (ids, jnp.full((4, 6, 3), np.log(0.2), jnp.float32))
  for target, target_real in [(teacher, teacher[..., :REAL_VOCAB]), (topk, topk)]:
    padded = lambda z, t=target: losses.distil_loss(z, t, tokens, mask, group_size=2, baseline="loo", vocab_limit=43)
    real = lambda z, t=target_real: losses.distil_loss(z, t, tokens, mask, group_size=2, baseline="loo")
    v_pad, g_pad = jax.jit(jax.value_and_grad(padded))(z)  # one program each: eagerly, every op compiles alone
    v_real, g_real = jax.jit(jax.value_and_grad(real))(z[..., :REAL_VOCAB])
    np.testing.assert_allclose(v_pad, v_real, rtol=1e-6)
    np.testing.assert_allclose(g_pad[..., :REAL_VOCAB], g_real, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(g_pad[..., REAL_VOCAB:]) == 0)


def test_policy_temperature_scales_the_student_only():
  """With policy_temperature T the student is softmax(z / T): the loss on z equals the T = 1 loss on z / T."""
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(size=(2, 5, 11)) * 3, jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
  mask = jnp.ones((2, 5))
  for loss in (losses.distil_loss, losses.reverse_kl_loss, losses.jsd_loss):
    hot = jax.jit(jax.value_and_grad(lambda z, f=loss: f(z, teacher, tokens, mask, policy_temperature=0.7)))(z)
    plain = jax.jit(jax.value_and_grad(lambda z, f=loss: f(z / 0.7, teacher, tokens, mask)))(z)
    np.testing.assert_allclose(hot[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(hot[1], plain[1], rtol=1e-5, atol=1e-7)


def test_truncating_sampling_is_refused_for_ratio_losses():
  for kind in losses.USES_RATIO:
    for key, value in (("sampling.top_p", 0.9), ("sampling.top_k", 5)):
      with pytest.raises(ValueError, match=key):
        _validate(_loop_config(**{"loss.kind": kind, key: value}))
  _validate(_loop_config(**{"loss.kind": "reverse_kl", "sampling.top_p": 0.9}))  # no ratio: allowed
  with pytest.raises(ValueError, match="sampling.temperature"):
    _validate(_loop_config(**{"sampling.temperature": 0.0}))


def _sp_tokenizer():
  texts = ["What is 3+4? [A correct solution: 3+4=7] Answer: 7\n", "0123456789+-*=?[]: abcdefghijklmnopqrstuvwxyz"]
  return tok_lib.train_sentencepiece(texts * 20, vocab_size=80)


def _one_group(texts, verdicts):
  """Rollouts of one prompt ("What is 3+4?") with the given responses and verdicts (tokens unused here)."""
  g = len(texts)
  return experts.Rollouts(
    problems=[Problem("What is 3+4?", "3+4=7")],
    prompt_tokens=np.zeros((1, 1)),
    prompt_mask=np.ones((1, 1)),
    tokens=np.zeros((1, g, 1), np.int32),
    mask=np.ones((1, g, 1)),
    logprobs=np.zeros((1, g, 1)),
    texts=[texts],
    verdicts=[verdicts],
  )


def test_teacher_rows_are_student_rows_of_the_reprompt():
  """With tokenizer.add_bos, the teacher's re-prompt row is token for token the row the student would get for the
  same text: BOS first, then the text, left-padded the same way."""
  tok = _sp_tokenizer()
  config = _loop_config(**{"tokenizer.add_bos": True, "sampling.max_prompt_tokens": 64, "expert.max_prompt_tokens": 64})
  template = config.expert.reprompt
  r = _one_group(["3+4=7", "3+4=8"], [Verdict(True, "correct"), Verdict(False, "wrong: 3+4=7")])
  labels, figures = experts.DeviceExpert(tok, template, 64, add_bos=True).label(r)
  texts, _ = experts.reprompt_texts(r, template)
  for j in range(2):
    reprompted = Problem(texts[0][j], None)
    _, student_row, student_mask = rollout.prompt_rows(
      [reprompted], tok=tok, add_bos=config.tokenizer.add_bos, width=config.sampling.max_prompt_tokens
    )
    np.testing.assert_array_equal(labels["teacher_tokens"][0, j], student_row[0])
    np.testing.assert_array_equal(labels["teacher_mask"][0, j], student_mask[0])
    assert labels["teacher_tokens"][0, j, -int(student_mask.sum())] == tok.bos_id
  assert figures["rollout/teacher_truncated"] == 0.0


def test_long_reprompts_are_unlabelled_not_cut():
  tok = _sp_tokenizer()
  r = _one_group(["3+4=7", "x"], [Verdict(False, "short"), Verdict(False, "a much longer verdict " * 8)])
  labels, figures = experts.DeviceExpert(tok, "{prompt} [{feedback}] ", 40).label(r)
  assert labels["teacher_valid"].tolist() == [[1, 0]]
  assert labels["teacher_mask"][0, 1].sum() == 0
  assert figures["rollout/teacher_truncated"] == 0.5
  with pytest.raises(ValueError, match="sampling.max_prompt_tokens=8"):
    config = _loop_config(**{"sampling.max_prompt_tokens": 8})
    rollout.prompt_rows(
      [Problem("What is 3+4? " * 3, None)], tok=tok, add_bos=False, width=config.sampling.max_prompt_tokens
    )
  with pytest.raises(ValueError, match="prompt_buckets"):
    _validate(_loop_config(**{"sampling.prompt_buckets": (16, 64)}))


def test_grpo_runs_as_published():
  """DeepSeekMath's per-response token mean by default, group-relative advantages refused for groups of one, no
  stale buffer rows; the other on-policy losses train on fresh rollouts unless told otherwise."""
  assert losses.LossConfig(kind="grpo").reduction_used == "sequence_token_mean"
  assert losses.LossConfig(kind="distil").reduction_used == "sequence"
  assert losses.LossConfig(kind="sft").reduction_used == "token"
  with pytest.raises(ValueError, match="loss.kind='grpo' needs at least 2"):
    _validate(_loop_config(**{"loss.kind": "grpo", "train.group_size": 1, "train.batch_groups": 1}))
  with pytest.raises(ValueError, match="buffer.mix"):
    _validate(_loop_config(**{"loss.kind": "grpo", "buffer.mix": 0.5}))
  assert [build.buffer_mix(_loop_config(**{"loss.kind": k})) for k in ("grpo", "reverse_kl", "distil")] == [0, 0, 0.5]
  with pytest.raises(ValueError, match="group_size >= 2"):
    losses.grpo_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)), jnp.ones(2), group_size=1)


def test_grpo_kl_to_a_frozen_reference_on_device():
  """kl_coef > 0: the reference is the starting policy, held in the train state. The first update sees KL 0 (the
  policy is the reference); the second's k3 estimate equals one computed from two plain forward passes."""
  mesh, graphdef, params = _peaked_policy(scale=1.0)
  batch = _fresh_batch(graphdef, params, temperature=1.0)
  loss_cfg = losses.LossConfig(kind="grpo", kl_coef=0.1, chunk_size=4, vocab_limit=REAL_VOCAB)
  tx = update.make_optimizer(
    types.SimpleNamespace(
      lr=3e-2, lr_warmup_steps=0, schedule="constant", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0
    ),
    10,
  )
  state = update.init_state(tx, params, mesh, ref=True)
  step = update.make_update(graphdef, tx, update.UpdateOptions(loss_cfg, labels="topk", frozen_policy=True))
  state, m1 = step(state, batch, None, jnp.int32(0))
  assert float(m1["kl_ref"]) == 0.0
  moved = jax.device_get(state["params"])
  _, m2 = step(state, batch, None, jnp.int32(0))

  def logp(p):
    model = nnx.merge(graphdef, p)
    seq = np.concatenate([np.repeat(batch["prompt_tokens"], G, 0), batch["tokens"].reshape(BG * G, N)], 1)
    logits = model(jnp.asarray(seq[:, :-1]))[:, P - 1 :, :REAL_VOCAB]
    lp = jax.nn.log_softmax(logits, -1)
    return np.take_along_axis(np.asarray(lp), seq[:, P:, None], -1)[..., 0]

  delta = logp(params) - logp(moved)
  want = np.mean(np.exp(delta) - delta - 1)
  assert want > 1e-4
  np.testing.assert_allclose(m2["kl_ref"], want, rtol=2e-3)


def test_teacher_is_scored_at_the_samplers_temperature():
  """A self teacher shown no feedback is the student. At the sampler's T = 0.7 forward CE to it has gradient 0 (the
  CE's minimum over pi is pi = q); scored at T = 1, as the loop did by default, it is a flatter policy, and a step
  on it raises the student's entropy (the issue measured 3.36 -> 3.75 in 12 updates). Top-k experts, which give
  log-probs no temperature is applied to, refuse a teacher temperature."""
  tok = types.SimpleNamespace(vocab_size=REAL_VOCAB)
  device, topk = (
    types.SimpleNamespace(reads_siblings=False, on_device=True),
    types.SimpleNamespace(reads_siblings=False, on_device=False),
  )
  assert build.loss_config(_loop_config(), tok, device).teacher_temperature == 0.7
  assert build.loss_config(_loop_config(), tok, topk).teacher_temperature == 1.0
  kept = _loop_config(**{"loss.teacher_temperature": 1.3})
  assert build.loss_config(kept, tok, device).teacher_temperature == 1.3
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(2, 5, REAL_VOCAB)) * 3, jnp.float32)
  tokens, mask = jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5))

  def entropy(z):
    logp = jax.nn.log_softmax(z / 0.7, -1)
    return float(-jnp.sum(jnp.exp(logp) * logp, -1).mean())

  for teacher_t in (0.7, 1.0):
    loss = lambda z, t=teacher_t: losses.tokenwise_fce_loss(
      z, z, tokens, mask, policy_temperature=0.7, teacher_temperature=t
    )
    grad = jax.grad(loss)(z)
    if teacher_t == 0.7:
      assert float(jnp.abs(grad).max()) < 1e-6
    else:
      assert entropy(z - 0.5 * grad) > entropy(z) + 1e-3
  _validate(_loop_config(**{"expert.kind": "self", "loss.teacher_temperature": 0.7}))
  with pytest.raises(ValueError, match="applies to self and model teachers only"):
    _validate(_loop_config(**{"loss.teacher_temperature": 0.7}))  # the default expert is the oracle


def test_truncation_counts_only_rows_the_expert_would_label():
  """With feedback="sibling" a response without a correct sibling is unlabelled whatever its length: a long
  re-prompt there is not a truncation. Rows 0-1 and 2-3 are the halves and only row 3 is correct: rows 0 and 1 are
  shown row 3's long text, rows 2 and 3 have no correct sibling in theirs and go unlabelled."""
  tok = _sp_tokenizer()
  long = "3+4=7 " * 12
  r = _one_group(["x", "y", "z", long], [Verdict(False, "no")] * 3 + [Verdict(True, "yes")])
  labels, figures = experts.DeviceExpert(tok, "{prompt} [{feedback}] ", 40, feedback="sibling").label(r)
  assert labels["teacher_valid"].tolist() == [[0, 0, 0, 0]]  # rows 0, 1 do not fit; rows 2, 3 are not labelled
  assert figures["rollout/teacher_truncated"] == 1.0  # 2 of the 2 rows it would label, not 2 of 4
  labels, figures = experts.DeviceExpert(tok, "{prompt} [{feedback}] ", 200, feedback="sibling").label(r)
  assert labels["teacher_valid"].tolist() == [[1, 1, 0, 0]]
  assert figures["rollout/teacher_truncated"] == 0.0


def test_ratio_figures_cover_the_rows_whose_ratio_is_used():
  """Stale buffer rows (score weight 0) never use their ratio: the ratio's mean and clip fraction are over the fresh
  rows (ratio 1 here), not diluted by stale ones whose ratio is 2."""
  t = 3
  logp = jnp.full((4, t), -1.0)
  terms = {k: jnp.ones((4, t)) for k in ("ce", "teacher_entropy", "entropy")} | {"logp": logp}
  behaviour = jnp.concatenate([jnp.full((2, t), -1.0), jnp.full((2, t), -1.0 - np.log(2.0))])  # ratio 1, then 2
  _, m = losses.loss_from_terms(
    losses.LossConfig(),
    terms,
    jnp.ones((4, t)),
    group_size=2,
    behaviour_logprobs=behaviour,
    score_weight=jnp.asarray([1.0, 1.0, 0.0, 0.0]),
  )
  np.testing.assert_allclose(m["ratio_mean"], 1.0, rtol=1e-6)
  assert float(m["clip_fraction"]) == 0.0
  np.testing.assert_allclose(m["kl_per_token"], 0.0, atol=1e-7)  # ce - teacher entropy


def test_label_figures_read_the_batch():
  """Top-k experts: labelled fraction (a response with no finite target is unlabelled) and the mass the k entries
  cover at the student's states, by hand; the device expert's labelled fraction is teacher_valid's mean."""
  logq = np.full((1, 2, 3, 2), -np.inf, np.float32)
  logq[0, 0, :, 0], logq[0, 0, :, 1] = np.log(0.5), np.log(0.3)  # response 0: mass 0.8 at each of its 2 tokens
  mask = np.array([[[1, 1, 0], [1, 1, 1]]], np.int32)
  figures = train.label_shares({"target_logprobs": logq, "mask": mask, "whole_response_credit": np.array([[0, 1]])})
  assert figures["rollout/feedback_valid"] == 0.5
  np.testing.assert_allclose(figures["rollout/teacher_topk_mass"], 0.8, rtol=1e-6)
  assert figures["rollout/own_feedback"] == 0.5
  assert train.label_shares({"teacher_valid": np.array([[1, 0, 0, 0]])}) == {"rollout/feedback_valid": 0.25}


def test_a_stale_score_term_is_warned_at_start():
  assert not build.start_warnings(_loop_config())
  (line,) = build.start_warnings(_loop_config(**{"train.score_max_staleness": 2}))
  assert "train.score_max_staleness=2" in line and "ratio" in line
