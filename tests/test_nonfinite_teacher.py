"""A teacher whose distribution is not finite is an error, never a zero: the loss is NaN (so the update is skipped),
the loss metrics carry the share of positions at fault, and the loop names the teacher. Top-k padding (-inf, zero
mass) stays legitimate, and so does garbage at positions outside the mask."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax import losses, train
from distil_jax.errors import ExpertError

B, T, D, V, K = 2, 6, 8, 11, 3


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  mask = np.ones((B, T), np.float32)
  mask[1, 4:] = 0
  teacher = rng.normal(size=(B, T, V)).astype(np.float32)
  return hidden, head, tokens, mask, teacher


@functools.partial(jax.jit, static_argnames="fused")
def _loss_grad(hidden, head, teacher, tokens, mask, fused):
  if fused:
    fn = lambda h: losses.fused_distil_loss(h, head, teacher, tokens, mask, with_metrics=True, chunk_size=4)
  else:
    fn = lambda h: losses.distil_loss(h @ head, teacher, tokens, mask, with_metrics=True)
  (loss, m), grad = jax.value_and_grad(fn, has_aux=True)(hidden)
  return loss, m["teacher_nonfinite"], jnp.linalg.norm(grad)


def _loss(hidden, head, teacher, tokens, mask, fused):
  """(loss, teacher_nonfinite, grad norm) of the DistIL loss, fused from hidden states or from full logits."""
  return tuple(float(x) for x in _loss_grad(hidden, head, teacher, tokens, jnp.asarray(mask), fused))


@pytest.mark.parametrize("bad,fused", [(np.nan, True), (np.inf, False)])
def test_a_dense_teacher_with_a_nan_or_inf_logit_gives_a_nan_loss_and_is_counted(fused, bad):
  hidden, head, tokens, mask, teacher = _inputs()
  loss, share, grad = _loss(hidden, head, jnp.asarray(teacher), tokens, mask, fused)
  assert np.isfinite(loss) and share == 0.0 and np.isfinite(grad)
  teacher[0, 2, 5] = bad  # one logit of one response position
  teacher[1, 5, 0] = bad  # and one outside the mask: not counted, and it changes nothing
  loss, share, grad = _loss(hidden, head, jnp.asarray(teacher), tokens, mask, fused)
  assert np.isnan(loss) and share == pytest.approx(1 / mask.sum()), (loss, share)
  teacher[0, 2, 5] = 0.0
  loss2, share, grad2 = _loss(hidden, head, jnp.asarray(teacher), tokens, mask, fused)
  assert np.isfinite(loss2) and share == 0.0 and np.isfinite(grad2)


def test_a_teacher_with_a_nan_weight_is_not_a_loss_of_zero():
  """The issue's case: a model teacher whose every logit is NaN trained to loss 0.0, grad_norm 0.0."""
  hidden, head, tokens, mask, _ = _inputs()
  rng = np.random.default_rng(1)
  t_head = rng.normal(size=(D, V)).astype(np.float32)
  t_head[3, 4] = np.nan
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  teacher = losses.HiddenTeacher(jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32), jnp.asarray(t_head), positions)
  loss, share, grad = _loss(hidden, head, teacher, tokens, mask, fused=True)
  assert np.isnan(loss) and share == 1.0 and not np.isfinite(grad), (loss, share, grad)


def test_topk_padding_is_zero_mass_and_nan_or_inf_is_not():
  hidden, head, tokens, mask, teacher = _inputs()
  ids = jnp.asarray(np.argsort(-teacher, -1)[..., :K], jnp.int32)
  lq = np.array(jnp.take_along_axis(jax.nn.log_softmax(jnp.asarray(teacher), -1), ids, -1))
  lq[:, :, -1] = -np.inf  # every position lists K - 1 ids: padding
  lq[1, 5, 0] = np.nan  # outside the mask
  loss, share, grad = _loss(hidden, head, (ids, jnp.asarray(lq)), tokens, mask, fused=True)
  assert np.isfinite(loss) and share == 0.0 and np.isfinite(grad)
  for bad in (np.nan, np.inf):
    lq_bad = lq.copy()
    lq_bad[0, 1, 0] = bad
    lq_bad[1, 0, 1] = bad
    loss, share, _ = _loss(hidden, head, (ids, jnp.asarray(lq_bad)), tokens, mask, fused=True)
    assert not np.isfinite(loss) and share == pytest.approx(2 / mask.sum()), (bad, loss, share)


def test_the_loop_names_the_teacher():
  ckpt = types.SimpleNamespace(latest_step=lambda: 3)
  writer = types.SimpleNamespace(path="/w/metrics.jsonl")
  expert = types.SimpleNamespace(kind="model", model_path="/ckpt/teacher", url="")
  m = {"loss": float("nan"), "grad_norm": float("nan"), "nonfinite": 1.0, "teacher_nonfinite": 0.25}
  with pytest.raises(
    ExpertError,
    match=r"the model teacher /ckpt/teacher gives a distribution that is not finite "
    r"\(NaN or inf\) at 25\.0% of the response positions at iteration 4, update 1.*iteration 3",
  ):
    train._finite_or_raise(m, 4, 1, ckpt, writer, expert)
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at iteration 4"):  # the student's fault
    train._finite_or_raise({**m, "teacher_nonfinite": 0.0}, 4, 1, ckpt, writer, expert)
  self_teacher = types.SimpleNamespace(kind="self", model_path="", url="")  # the student: the step is at fault
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at iteration 4"):
    train._finite_or_raise(m, 4, 1, ckpt, writer, self_teacher)
  ok = {**m, "loss": 1.0, "grad_norm": 1.0, "nonfinite": 0.0, "teacher_nonfinite": 0.0}
  assert train._finite_or_raise(ok, 4, 1, ckpt, writer, expert) is ok
