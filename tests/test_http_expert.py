"""The http expert against servers that stall, swamp, fail or answer in another form (issue 25 item 5, issue 23 item 6):
each reply is either used, retried within its bounds, or refused in one line; a response without feedback gets no
targets and stays out of the loss."""

import dataclasses
import time

import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import FakeExpertServer, load_config
from test_update import _batch

from distil_jax import experts, http_client, losses, train, update
from distil_jax import tokenizer as tok_lib
from distil_jax.errors import ExpertError

URL = r"expert http://127\.0\.0\.1:\d+(/v1/completions)?"


@pytest.fixture(scope="module")
def tok():
  return tok_lib.train_sentencepiece(["0123456789+-*=# wrong right " * 4], 40, "char")


def _expert(tok, server, **overrides):
  cfg = load_config(
    "arith", **{"expert.kind": "http", "expert.top_k": 3, "expert.backoff_s": 0.05, "expert.concurrency": 1}
  )
  cfg.expert.update(url=server.url, **overrides)
  return experts.make_expert(cfg.expert, None, tok)


def _rollouts(tok, feedback=("wrong", "wrong")):
  """One prompt, a wrong response of 4 tokens per verifier feedback given ("2+13", "2+14", ...)."""
  texts = [f"2+1{3 + j}" for j in range(len(feedback))]
  tokens = np.asarray([tok.encode(t) for t in texts], np.int32)[None]
  return experts.Rollouts(
    problems=[experts.Problem("1+1=", "2")],
    prompt_tokens=np.zeros((1, 1), np.int32),
    prompt_mask=np.ones((1, 1), np.int32),
    tokens=tokens,
    mask=np.ones_like(tokens),
    logprobs=np.zeros(tokens.shape, np.float32),
    texts=[texts],
    verdicts=[[experts.Verdict(False, f) for f in feedback]],
  )


ONE = ("wrong",)  # one response: one request, so a test counts exactly the tries made


def _expected(tok, response):
  """The fake server's targets for each response position: the token itself at 0.6, the next two ids at 0.1."""
  ids = np.asarray([[(t + j) % tok.vocab_size for j in range(3)] for t in response], np.int32)
  return ids, np.log(np.tile([0.6, 0.1, 0.1], (len(response), 1))).astype(np.float32)


@pytest.mark.parametrize("mode", ["ok", "list", "k+1"])
def test_both_top_logprobs_forms_and_k_plus_one_entries_give_the_same_targets(tok, mode):
  with FakeExpertServer(tok, mode=mode) as server:
    labels, _ = _expert(tok, server).label(_rollouts(tok))
  for j, text in enumerate(("2+13", "2+14")):
    ids, logq = _expected(tok, tok.encode(text))
    np.testing.assert_array_equal(labels["target_ids"][0, j], ids)
    np.testing.assert_allclose(labels["target_logprobs"][0, j], logq, rtol=1e-6)


@pytest.mark.parametrize(
  "entry,error",
  [
    ([["token_id:1", -0.5]], r"top_logprobs of response position 0 is \[\[.*neither"),
    ("token_id:1", r"top_logprobs of response position 0 is \"token_id:1\", neither"),
    ({"token_id:1": "-0.5"}, r"log-prob '-0\.5' of token_id:1 at response position 0 is not a finite number"),
    (
      [{"token": "token_id:1", "logprob": -1.0}, {"token": "token_id:1", "logprob": -2.0}],
      "token id 1 listed twice at response position 0",
    ),
  ],
)
def test_malformed_positions_are_one_line(tok, entry, error):
  with FakeExpertServer(tok) as server:
    expert = _expert(tok, server)
    teacher = tok.prompt_ids("p", False)
    reply = {"choices": [{"logprobs": {"tokens": [f"token_id:{t}" for t in [*teacher, 5]], "top_logprobs": None}}]}
    reply["choices"][0]["logprobs"]["top_logprobs"] = [None] * len(teacher) + [entry]
    expert._post = lambda path, payload: reply
    with pytest.raises(ExpertError, match=rf"{URL}: {error}"):
      expert._score(teacher, [5])


def test_a_slow_drip_reply_ends_at_the_timeout(tok):
  """2 bytes a second, each read within any per-read timeout: only a bound on the whole try ends it."""
  with FakeExpertServer(tok, mode="drip") as server:
    expert = _expert(tok, server, timeout_s=1.0, deadline_s=3.0, max_retries=1)
    start = time.monotonic()
    with pytest.raises(ExpertError, match=rf"{URL}: no answer after 2 tries \(no complete reply within 1 s"):
      expert.label(_rollouts(tok, ONE))
    assert time.monotonic() - start < 3.5 and server.failed >= 2


@pytest.mark.parametrize("mode", ["huge", "stream"])
def test_a_reply_over_the_size_cap_is_refused(tok, mode):
  with FakeExpertServer(tok, mode=mode) as server:
    expert = _expert(tok, server, max_reply_mb=1.0)
    with pytest.raises(ExpertError, match=rf"{URL}: reply (of 4194304 bytes is )?over expert\.max_reply_mb"):
      expert.label(_rollouts(tok, ONE))
    assert server.failed == 1  # not retried: the same server would send it again


def test_a_reply_cut_mid_way_is_retried_then_named(tok):
  with FakeExpertServer(tok, mode="cut", failures=2) as server:
    labels, _ = _expert(tok, server, max_retries=2).label(_rollouts(tok))  # 2 cuts, then a reply
    np.testing.assert_array_equal(labels["target_ids"][0, 0], _expected(tok, tok.encode("2+13"))[0])
    server.failures = 1 << 30
    with pytest.raises(ExpertError, match=rf"{URL}: no answer after 1 tries \(reply cut after 500 of 1000 bytes\)"):
      _expert(tok, server, max_retries=0).label(_rollouts(tok))


@pytest.mark.parametrize("mode", ["busy", "unavailable"])
def test_429_and_503_are_retried_after_retry_after(tok, mode):
  with FakeExpertServer(tok, mode=mode, failures=1, retry_after=1) as server:
    start = time.monotonic()
    labels, _ = _expert(tok, server).label(_rollouts(tok))
    waited = time.monotonic() - start
    assert server.failed == 1 and waited >= 0.9 if mode == "busy" else waited >= 0.0  # an HTTP date: whole seconds
    np.testing.assert_array_equal(labels["target_ids"][0, 1], _expected(tok, tok.encode("2+14"))[0])
    server.failures, server.retry_after = 1 << 30, 3600
    with pytest.raises(
      ExpertError, match=rf"{URL}: HTTP 4?5?\d+; a retry after 3[56]\d\d\.\d s would pass expert\.dead"
    ):
      _expert(tok, server).label(_rollouts(tok))


def test_retry_after_forms():
  assert http_client.retry_after("7") == 7.0
  assert http_client.retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == pytest.approx(30.0)
  assert http_client.retry_after("soon") is None and http_client.retry_after(None) is None


def test_a_redirect_is_refused_not_followed(tok):
  with FakeExpertServer(tok, mode="redirect") as server:
    with pytest.raises(ExpertError, match=rf"{URL}: HTTP 307 redirects to 'http://127\.0\.0\.1:9/v1/completions'"):
      _expert(tok, server).label(_rollouts(tok, ONE))
    assert server.failed == 1


def test_a_response_without_feedback_gets_no_targets_and_no_loss(tok):
  with FakeExpertServer(tok) as server:
    r = _rollouts(tok, feedback=("wrong", ""))
    labels, _ = _expert(tok, server).label(r)
    assert server.requests == 2  # the tokenizer check and the one labelled response
  assert train.label_shares({**labels, "mask": r.mask})["rollout/feedback_valid"] == 0.5
  assert np.all(labels["target_logprobs"][0, 1] == -np.inf)
  _, labelled = update.topk_teacher(labels, 2)
  np.testing.assert_array_equal(labelled, [1.0, 0.0])


def test_an_unlabelled_topk_row_is_out_of_the_loss():
  batch = _batch()
  batch["target_logprobs"][1, 1] = -np.inf  # prompt 1's second response: empty lists everywhere
  batch["target_logprobs"][2, 0, 1:] = -np.inf  # a labelled response whose lists end early: kept
  (ids, logq), labelled = update.topk_teacher(batch, 2)
  assert ids.shape == logq.shape == (8, 7, 3)
  expected = np.ones(8)
  expected[3] = 0  # row 1 * G + 1
  np.testing.assert_array_equal(labelled, expected)
  # the loss reads a row only where it is labelled: the unlabelled row's tokens change nothing
  cfg = losses.LossConfig(kind="tokenwise_fce")
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, 7, 48)), jnp.float32)
  tokens = jnp.asarray(batch["tokens"].reshape(8, 7))
  mask = jnp.asarray(batch["mask"].reshape(8, 7), jnp.float32)
  loss = lambda lg: losses.compute_loss(
    cfg, teacher=(ids, logq), tokens=tokens, mask=mask, logits=lg, labelled=labelled
  )
  np.testing.assert_allclose(loss(logits)[0], loss(logits.at[3].set(5.0))[0], rtol=1e-6)


def test_new_keys_are_validated():
  from distil_jax import validate

  config = load_config("arith", **{"expert.kind": "http", "expert.url": "http://127.0.0.1:1"})
  config.expert.update(deadline_s=5.0, timeout_s=10.0, max_reply_mb=0)
  with pytest.raises(validate.ConfigError) as e:
    validate.config(config, devices=1, processes=1)
  assert "expert.deadline_s=5.0: must be >= expert.timeout_s=10.0" in str(e.value)
  assert "expert.max_reply_mb=0.0: must be a number > 0" in str(e.value)
  assert dataclasses.asdict(http_client.Policy.from_config(load_config("arith").expert)) == dict(
    timeout_s=30.0, deadline_s=180.0, max_retries=3, backoff_s=0.5, max_bytes=64 << 20
  )
