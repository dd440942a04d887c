"""Fused == unfused for every target kind, top-k(K=V) == dense, bf16, sharded; baselines vs closed forms / TRL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.experimental.gkd.gkd_trainer import GKDTrainer

from distil_jax import losses, sharding, train
from distil_jax import token_terms as tt

B, T, D, V, K, S = 4, 13, 16, 37, 5, 19  # T not a multiple of the chunk sizes used: the padding path runs


def _inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
  head = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D) * 3, dtype)
  tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  mask = np.ones((B, T), np.float32)
  mask[1, 9:] = 0
  mask[3, 4:] = 0
  teacher = jnp.asarray(rng.normal(size=(B, T, V)) * 2, jnp.float32)
  ids = jnp.asarray(np.argsort(-np.asarray(teacher), -1)[..., :K], jnp.int32)
  lq = jnp.take_along_axis(jax.nn.log_softmax(teacher, -1), ids, -1)
  lq = lq.at[0, 0, -1].set(-jnp.inf)  # a padded top-k entry
  samples = jnp.asarray(rng.integers(0, V, (B, T, 3)), jnp.int32)
  t_hidden = jnp.asarray(rng.normal(size=(B, S, D)), dtype)
  t_head = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D) * 3, dtype)
  positions = jnp.asarray(np.arange(T)[None] + rng.integers(0, S - T + 1, (B, 1)), jnp.int32)
  targets = {
    "dense": teacher,
    "topk": (ids, lq),
    "samples": tt.Samples(samples),
    "hidden": tt.HiddenTeacher(t_hidden, t_head, positions),
  }
  return hidden, head, tokens, jnp.asarray(mask), targets


def _dense_equivalent(target):
  if isinstance(target, tt.HiddenTeacher):
    th = jnp.take_along_axis(target.hidden, target.positions[..., None], 1)
    return jnp.einsum("btd,dv->btv", th.astype(jnp.float32), target.lm_head.astype(jnp.float32))
  return target


@pytest.mark.parametrize(
  "kind,loss_kind",
  [(k, lk) for k in ("dense", "topk", "hidden") for lk in ("distil", "reverse_kl", "jsd")]
  + [("samples", "distil")],  # sampled targets define only the cross-entropy
)
def test_fused_equals_unfused_float32(kind, loss_kind):
  hidden, head, tokens, mask, targets = _inputs()
  cfg = losses.LossConfig(kind=loss_kind, baseline="loo", chunk_size=4)

  def unfused(h, w):
    logits = jnp.einsum("btd,dv->btv", h, w)
    return losses.compute_loss(
      cfg, teacher=_dense_equivalent(targets[kind]), tokens=tokens, mask=mask, logits=logits, group_size=2
    )[0]

  def fused(h, w):
    return losses.compute_loss(cfg, teacher=targets[kind], tokens=tokens, mask=mask, hidden=h, lm_head=w, group_size=2)[
      0
    ]

  v1, g1 = jax.value_and_grad(unfused, argnums=(0, 1))(hidden, head)
  v2, g2 = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, head)
  np.testing.assert_allclose(v2, v1, rtol=1e-5)
  for a, b in zip(g2, g1, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_public_fused_distil_loss_matches_distil_loss():
  hidden, head, tokens, mask, targets = _inputs(seed=1)
  for target in targets.values():
    want = losses.distil_loss(hidden @ head, _dense_equivalent(target), tokens, mask, group_size=2, baseline="loo")
    got = losses.fused_distil_loss(hidden, head, target, tokens, mask, group_size=2, baseline="loo", chunk_size=5)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_fused_bfloat16_close_to_float32():
  """bf16 hidden states and head, float32 accumulation: within 1e-2 relative of the float32 loss of the same values."""
  hidden, head, tokens, mask, targets = _inputs(seed=2, dtype=jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)
  loss = lambda h, w: losses.fused_distil_loss(
    h, w, targets["topk"], tokens, mask, group_size=2, baseline="loo", chunk_size=4
  )
  v16, g16 = jax.value_and_grad(loss, argnums=(0, 1))(hidden, head)
  v32, g32 = jax.value_and_grad(loss, argnums=(0, 1))(f32(hidden), f32(head))
  assert g16[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(v16), v32, rtol=1e-2)
  for a, b in zip(g16, g32, strict=True):
    rel = float(jnp.linalg.norm(f32(a) - b) / jnp.linalg.norm(b))
    assert rel < 2e-2, rel


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("loss_kind", ["distil", "reverse_kl", "jsd"])
def test_topk_with_k_equal_v_is_dense(tail, loss_kind):
  hidden, head, tokens, mask, targets = _inputs(seed=3)
  teacher = targets["dense"]
  ids = jnp.asarray(np.argsort(np.random.default_rng(0).random((B, T, V)), -1), jnp.int32)  # shuffled, all V
  lq = jnp.take_along_axis(jax.nn.log_softmax(teacher, -1), ids, -1)
  cfg = losses.LossConfig(kind=loss_kind, baseline="loo", topk_tail=tail)
  logits = hidden @ head
  f = lambda lg, tgt: losses.compute_loss(cfg, teacher=tgt, tokens=tokens, mask=mask, logits=lg, group_size=2)[0]
  v1, g1 = jax.value_and_grad(f)(logits, teacher)
  v2, g2 = jax.value_and_grad(f)(logits, (ids, lq))
  np.testing.assert_allclose(v2, v1, rtol=1e-5)
  np.testing.assert_allclose(g2, g1, rtol=1e-5, atol=1e-6)


def test_topk_tail_bucket_closed_form():
  """Coarsened CE on {top-k, rest} by hand: -sum_k q_k log pi_k - q_rest log(1 - sum_k pi_k)."""
  rng = np.random.default_rng(4)
  z = rng.normal(size=(1, 1, 6))
  ids = np.array([[[4, 1]]])
  lq = np.log(np.array([[[0.5, 0.3]]]))
  pi = np.exp(z) / np.exp(z).sum()
  want = -(0.5 * np.log(pi[0, 0, 4]) + 0.3 * np.log(pi[0, 0, 1]) + 0.2 * np.log(1 - pi[0, 0, [4, 1]].sum()))
  got = losses.tokenwise_fce_loss(
    jnp.asarray(z), (jnp.asarray(ids), jnp.asarray(lq)), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1))
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)
  renorm = losses.tokenwise_fce_loss(
    jnp.asarray(z),
    (jnp.asarray(ids), jnp.asarray(lq)),
    jnp.zeros((1, 1), jnp.int32),
    jnp.ones((1, 1)),
    topk_tail="renorm",
  )
  np.testing.assert_allclose(renorm, -(0.625 * np.log(pi[0, 0, 4]) + 0.375 * np.log(pi[0, 0, 1])), rtol=1e-6)


def test_sampled_targets_estimate_ce():
  """CE to M expert samples is the average -log pi of the samples, an unbiased estimate of the dense CE."""
  z = jnp.asarray(np.random.default_rng(5).normal(size=(1, 1, 4)))
  samples = jnp.asarray([[[2, 2, 0]]])
  got = losses.tokenwise_fce_loss(z, tt.Samples(samples), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)))
  logp = jax.nn.log_softmax(z[0, 0])
  np.testing.assert_allclose(got, -(2 * logp[2] + logp[0]) / 3, rtol=1e-6)


def test_sharded_equals_unsharded():
  """Fused loss and gradients on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices equal one device's."""
  hidden, head, tokens, mask, targets = _inputs(seed=6)
  hidden = jnp.concatenate([hidden, hidden[::-1]], 0)  # 8 rows: divisible by data * fsdp
  tokens, mask = jnp.concatenate([tokens, tokens[::-1]], 0), jnp.concatenate([mask, mask[::-1]], 0)
  ids, lq = targets["topk"]
  ids, lq = jnp.concatenate([ids, ids[::-1]], 0), jnp.concatenate([lq, lq[::-1]], 0)
  head = jnp.pad(head, ((0, 0), (0, 3)))  # V = 40, divisible by tensor = 2

  def f(h, w, ids, lq, tok, m):
    return losses.fused_distil_loss(h, w, (ids, lq), tok, m, group_size=2, baseline="loo", chunk_size=4)

  grad_f = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  v1, g1 = grad_f(hidden, head, ids, lq, tokens, mask)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rows = sharding.batch_sharding(mesh, 3)
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  P = jax.sharding.PartitionSpec
  with jax.set_mesh(mesh):
    args = (
      jax.device_put(hidden, rows),
      put(head, P("fsdp", "tensor")),
      jax.device_put(ids, rows),
      jax.device_put(lq, rows),
      put(tokens, P(("data", "fsdp"))),
      put(mask, P(("data", "fsdp"))),
    )
    v2, g2 = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*args)
  assert len(g2[0].sharding.device_set) == 8
  np.testing.assert_allclose(v2, v1, rtol=1e-5)
  for a, b in zip(g2, g1, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- baselines against closed forms and a maintained reference -------------------------------------------------


def _np_logsoftmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_reverse_kl_closed_form_value_and_gradient():
  rng = np.random.default_rng(7)
  z, tl = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  lp, lq = _np_logsoftmax(z), _np_logsoftmax(tl)
  kl = (np.exp(lp) * (lp - lq)).sum(-1)  # KL(pi || q)
  v, g = jax.value_and_grad(
    lambda z: losses.reverse_kl_loss(
      z, jnp.asarray(tl), jnp.zeros((2, 3), jnp.int32), jnp.asarray(mask), reduction="token"
    )
  )(jnp.asarray(z))
  np.testing.assert_allclose(v, (kl * mask).sum() / mask.sum(), rtol=1e-6)
  # d KL(pi||q) / dz_j = pi_j (log pi_j - log q_j - KL)
  want = np.exp(lp) * (lp - lq - kl[..., None]) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(g, want, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl(beta):
  rng = np.random.default_rng(8)
  z, tl = rng.normal(size=(2, 4, 6)) * 2, rng.normal(size=(2, 4, 6)) * 2
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  zt = torch.tensor(z, requires_grad=True)
  labels = torch.tensor(np.where(mask == 1, 1, -100))
  want = GKDTrainer.generalized_jsd_loss(zt, torch.tensor(tl), labels=labels, beta=beta)
  want.backward()
  v, g = jax.value_and_grad(
    lambda z: losses.jsd_loss(
      z, jnp.asarray(tl), jnp.zeros((2, 4), jnp.int32), jnp.asarray(mask), jsd_beta=beta, reduction="token"
    )
  )(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(v, want.item(), rtol=1e-5)
  np.testing.assert_allclose(g, zt.grad.numpy(), atol=1e-6)


def test_grpo_closed_form():
  rng = np.random.default_rng(9)
  z = rng.normal(size=(4, 3, 5))
  tokens = rng.integers(0, 5, (4, 3))
  mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32)
  rewards = np.array([1.0, 0.0, 1.0, 1.0])
  lp = np.take_along_axis(_np_logsoftmax(z), tokens[..., None], -1)[..., 0]
  old = lp + rng.normal(size=lp.shape) * 0.3  # off-policy: some ratios outside the clip range
  ref = lp + rng.normal(size=lp.shape) * 0.2
  adv = []
  for g in rewards.reshape(2, 2):
    adv += list((g - g.mean()) / (g.std(ddof=1) + 1e-4))
  adv = np.array(adv)[:, None]
  ratio = np.exp(lp - old)
  per_tok = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
  d = ref - lp
  per_tok = per_tok + 0.1 * (np.exp(d) - d - 1)
  want = np.mean((per_tok * mask).sum(1) / mask.sum(1))
  got = losses.grpo_loss(
    jnp.asarray(z),
    jnp.asarray(tokens),
    jnp.asarray(mask),
    jnp.asarray(rewards),
    group_size=2,
    behaviour_logprobs=jnp.asarray(old),
    ref_logprobs=jnp.asarray(ref),
    kl_coef=0.1,
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # On-policy gradient: -A (onehot(y) - softmax(z)) / |y| / B per position.
  g = jax.grad(
    lambda z: losses.grpo_loss(z, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(rewards), group_size=2)
  )(jnp.asarray(z))
  onehot = np.eye(5)[tokens]
  want_g = -adv[..., None] * (onehot - np.exp(_np_logsoftmax(z))) * (mask / mask.sum(1, keepdims=True))[..., None] / 4
  np.testing.assert_allclose(g, want_g, atol=1e-6)


def test_tokenwise_fce_and_sft_closed_forms():
  rng = np.random.default_rng(10)
  z, tl = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
  tokens = rng.integers(0, 4, (2, 3))
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  q = np.exp(_np_logsoftmax(tl))
  g = jax.grad(lambda z: losses.tokenwise_fce_loss(z, jnp.asarray(tl), jnp.asarray(tokens), jnp.asarray(mask)))(
    jnp.asarray(z)
  )
  np.testing.assert_allclose(g, (np.exp(_np_logsoftmax(z)) - q) * mask[..., None] / 2, atol=1e-7)
  want = torch.nn.functional.cross_entropy(
    torch.tensor(z).reshape(-1, 4), torch.tensor(np.where(mask == 1, tokens, -100)).reshape(-1)
  )
  got = losses.sft_loss(jnp.asarray(z), jnp.asarray(tokens), jnp.asarray(mask))
  np.testing.assert_allclose(got, want.item(), rtol=1e-6)


def test_ppo_clip_stops_score_gradient():
  """Off-policy score term max(rho A, clip(rho) A) with rho = e > 1 + eps: live for A > 0, clipped for A < 0."""
  z = jnp.asarray(np.tile([2.0, 0.0, 0.0], (2, 2, 1)))  # the student prefers token 0 everywhere
  tokens = jnp.zeros((2, 2), jnp.int32)
  mask = jnp.ones((2, 2))
  # Row 0's expert agrees with the student (low future cost, A < 0 under leave-one-out); row 1's does not (A > 0).
  teacher = jnp.asarray(np.log([[[0.98, 0.01, 0.01]] * 2, [[0.01, 0.98, 0.01]] * 2]))
  logp = jax.nn.log_softmax(z, -1)[..., 0]
  f = lambda z, old, **kw: losses.distil_loss(z, teacher, tokens, mask, behaviour_logprobs=old, **kw)
  g_local = jax.jit(jax.grad(lambda z: losses.tokenwise_fce_loss(z, teacher, tokens, mask)))(z)
  for kw in [{}, {"group_size": 2, "baseline": "loo"}]:
    grad = jax.jit(jax.grad(functools.partial(f, **kw)))
    g_on = grad(z, logp)  # rho = 1
    g_far = grad(z, logp - 1.0)  # rho = e everywhere
    score_on, score_far = g_on - g_local, g_far - g_local
    assert np.abs(score_on[:, 0]).max() > 1e-3  # the score term is live at t = 0 ...
    np.testing.assert_allclose(score_on[:, 1], 0.0, atol=1e-7)  # ... and R_1 = 0 at the last position
    if not kw:  # baseline none: A = R > 0 for both rows, so the unclipped rho * A is taken: e times the gradient
      np.testing.assert_allclose(score_far, np.e * score_on, rtol=1e-5, atol=1e-7)
    else:  # row 0 has A < 0: clipped, no score gradient; row 1 has A > 0: e times the on-policy one
      np.testing.assert_allclose(score_far[0], 0.0, atol=1e-7)
      np.testing.assert_allclose(score_far[1], np.e * score_on[1], rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="loss.baseline='mean'"):
    losses.LossConfig(baseline="mean")
  with pytest.raises(ValueError, match="group_size >= 2"):
    losses.distil_loss(
      jnp.zeros((3, 2, 4)),
      jnp.zeros((3, 2, 4)),
      jnp.zeros((3, 2), jnp.int32),
      jnp.ones((3, 2)),
      group_size=2,
      baseline="loo",
    )
  with pytest.raises(ValueError, match="sampled targets"):
    losses.reverse_kl_loss(
      jnp.zeros((1, 2, 4)), tt.Samples(jnp.zeros((1, 2, 3), jnp.int32)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2))
    )


@pytest.mark.parametrize("head_dtype", [jnp.float32, jnp.bfloat16])
def test_fused_head_gradient_sums_chunks_in_float32(head_dtype):
  """bf16 hidden states: the LM head's gradient summed over 256 one-position chunks is as accurate as one chunk's
  (0.0019 relative to a float32 reference on the same bf16 values, both ways), for a float32 or a bf16 head; a bf16
  running sum over 256 chunks would lose far more."""
  rng = np.random.default_rng(0)
  b, t, d, v = 4, 256, 32, 64
  h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d) * 3, jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
  tok, m = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32), jnp.ones((b, t))
  logits = lambda w: jnp.einsum("btd,dv->btv", h.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32))
  ref = jax.jit(jax.grad(lambda w: losses.distil_loss(logits(w), teacher, tok, m)))(w)

  def rel_err(chunk):
    loss = lambda w: losses.fused_distil_loss(h, w, teacher, tok, m, chunk_size=chunk)
    grad = jax.jit(jax.grad(loss))(w.astype(head_dtype))
    assert grad.dtype == head_dtype
    return float(jnp.linalg.norm(grad.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))

  one, many = rel_err(t), rel_err(1)
  assert one < 5e-3 and many < 1.05 * one, (one, many)


def test_student_topk_reverse_kl_closed_form_fused_and_unfused():
  """SDPO's reverse KL over the student's top k ids plus one tail bucket, written out directly (the ids chosen from
  the student's logits and held constant): value and gradient; the fused path with a hidden-state teacher gives the
  same; and it differs from the full-vocabulary KL (the check has teeth)."""
  hidden, head, tokens, mask, targets = _inputs(seed=2)
  k = 4
  teacher = _dense_equivalent(targets["hidden"])

  z = jnp.einsum("btd,dv->btv", hidden, head)
  order = np.argsort(-np.asarray(z), -1)  # the student's ranking, constant in the gradient
  ids, rest = jnp.asarray(order[..., :k]), jnp.asarray(order[..., k:])

  @jax.jit
  def direct(z, teacher=teacher):
    logp, logq = jax.nn.log_softmax(z, -1), jax.nn.log_softmax(teacher, -1)
    lp, lq = jnp.take_along_axis(logp, ids, -1), jnp.take_along_axis(logq, ids, -1)
    tail = lambda logx: jax.nn.logsumexp(jnp.take_along_axis(logx, rest, -1), -1)  # the unlisted ids' mass
    lp_tail, lq_tail = tail(logp), tail(logq)
    kl = (jnp.exp(lp) * (lp - lq)).sum(-1) + jnp.exp(lp_tail) * (lp_tail - lq_tail)
    return jnp.mean(jnp.sum(kl * mask, 1))

  want_v, want_g = jax.value_and_grad(direct)(z)
  topk_kl = jax.jit(jax.value_and_grad(lambda z, t: losses.reverse_kl_loss(z, t, tokens, mask, student_topk=k)))
  got_v, got_g = topk_kl(z, teacher)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6)
  cfg = losses.LossConfig(kind="reverse_kl", student_topk=k, chunk_size=4)
  fused = lambda h: losses.compute_loss(
    cfg, teacher=targets["hidden"], tokens=tokens, mask=mask, hidden=h, lm_head=head
  )
  unfused = lambda h: losses.compute_loss(cfg, teacher=teacher, tokens=tokens, mask=mask, logits=h @ head)
  (v1, g1), (v2, g2) = (
    jax.jit(jax.value_and_grad(lambda h: unfused(h)[0]))(hidden),
    jax.jit(jax.value_and_grad(lambda h: fused(h)[0]))(hidden),
  )
  np.testing.assert_allclose(v2, v1, rtol=1e-5)
  np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-6)
  full = losses.reverse_kl_loss(z, teacher, tokens, mask)
  assert abs(float(full) - float(got_v)) > 1e-2 * float(full)
  # a confident teacher (all but ~e^-40 of its mass on the student's top id): 1 - sum q_k rounds to 0 in float32, the
  # tail in log space stays finite
  confident = teacher.at[..., :].set(0.0)
  confident = confident.at[jnp.arange(B)[:, None], jnp.arange(T)[None], jnp.argmax(z, -1)].set(40.0)
  want_v, want_g = jax.value_and_grad(lambda z: direct(z, confident))(z)
  got_v, got_g = topk_kl(z, confident)
  assert np.isfinite(float(got_v)) and np.isfinite(np.asarray(got_g)).all()
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6)


def test_distil_grpo_is_grpo_plus_weighted_distil():
  """The hybrid is GRPO on every row plus the weight times DistIL on the labelled rows, in value and gradient (both
  parts are tested against closed forms above); the weight falls linearly to 0 over its iterations."""
  rng = np.random.default_rng(4)
  z = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
  _, _, tokens, mask, targets = _inputs(seed=3)
  rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0])
  labelled = jnp.asarray([1.0, 1.0, 0.0, 1.0])
  opts = dict(baseline="loo", group_size=2)

  def hybrid(z):
    cfg = losses.LossConfig(kind="distil_grpo", baseline="loo")
    return losses.compute_loss(
      cfg,
      teacher=targets["dense"],
      tokens=tokens,
      mask=mask,
      logits=z,
      group_size=2,
      rewards=rewards,
      labelled=labelled,
      distil_weight=0.3,
    )[0]

  def parts(z):
    grpo = losses.grpo_loss(z, tokens, mask, rewards, group_size=2)
    distil = losses.distil_loss(z, targets["dense"], tokens, mask * labelled[:, None], **opts)
    return grpo + 0.3 * distil

  (v1, g1), (v2, g2) = jax.value_and_grad(hybrid)(z), jax.value_and_grad(parts)(z)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)
  cfg = losses.LossConfig(kind="distil_grpo", distil_weight=0.8, distil_weight_decay_iterations=10)
  assert [float(cfg.distil_weight_at(i)) for i in (1, 6, 11, 30)] == pytest.approx([0.8, 0.4, 0.0, 0.0])
  assert losses.LossConfig(kind="distil_grpo", distil_weight=0.8).distil_weight_at(30) == 0.8


def test_an_iteration_pools_its_updates_token_means_over_their_tokens():
  """An iteration's token means are its updates' pooled token by token: equal to the figure of one update over the
  union of their labelled rows (derived by running it). An update with no labelled row has means of 0 over no token
  and counts for nothing; averaged in, it halved them (a ratio of 1 read 0.5); an iteration of such updates logs no
  token mean (its 0 read as a collapsed entropy). The hybrid's GRPO figures read every row, so such an update (no
  correct response, no label) still counts in its reward."""
  rng = np.random.default_rng(5)
  z = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
  _, _, tokens, mask, targets = _inputs(seed=3)
  behaviour = jax.nn.log_softmax(z, -1)[jnp.arange(B)[:, None], jnp.arange(T)[None], tokens]

  def figures(labelled, kind="distil", rewards=(1.0, 0.0, 0.0, 0.0)):
    cfg = losses.LossConfig(kind=kind, baseline="loo")
    inputs = dict(teacher=targets["dense"], tokens=tokens, mask=mask, logits=z, group_size=2)
    labelled, rewards = jnp.asarray(labelled), jnp.asarray(rewards)
    _, m = losses.compute_loss(cfg, **inputs, behaviour_logprobs=behaviour, labelled=labelled, rewards=rewards)
    return {k: float(v) for k, v in m.items()}

  rows_03, row_1, none = figures([1, 0, 0, 1]), figures([0, 1, 0, 0]), figures([0, 0, 0, 0])
  assert rows_03["loss_tokens"] == T + 4 and row_1["loss_tokens"] == 9 and none["loss_tokens"] == 0  # by the mask
  assert none["ratio_mean"] == 0.0 and none["kl_per_token"] == 0.0
  pooled, union = train.iteration_figures([rows_03, none, row_1]), figures([1, 1, 0, 1])
  for k in ("entropy", "logp", "ce_per_token", "kl_per_token", "ratio_mean"):  # the baseline reads its batch
    np.testing.assert_allclose(pooled[f"train/{k}"], union[k], rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(pooled["train/ratio_mean"], 1.0, rtol=1e-6)
  per_update = {f"train/{k}": v for k, v in none.items() if losses.count_of(k) is None}  # no token: no token mean
  empty = train.iteration_figures([none, none])
  assert empty == per_update and "train/loss" in empty and "train/entropy" not in empty
  hybrid = [figures([0, 0, 0, 0], "distil_grpo", rewards=(0, 0, 0, 0)), figures([1, 1, 0, 0], "distil_grpo")]
  assert train.iteration_figures(hybrid)["train/reward"] == (0.0 + 0.25) / 2
  np.testing.assert_allclose(train.iteration_figures(hybrid)["train/ratio_mean"], 1.0, rtol=1e-6)
