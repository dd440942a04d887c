"""The DAgger loop end to end on CPU: every loss kind, every expert kind, a sharded mesh, resume after a kill,
export to Hugging Face, and one clear error for each kind of bad input."""

import gzip
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from run_helpers import ROOT, FakeExpertServer, child_env, load_config, rot_one_bit, run_main
from test_http_expert import _rollouts

from distil_jax import build, checkpoint, evaluate, experts, hf, losses, modes, tasks, train
from distil_jax import model as model_lib
from distil_jax import tokenizer as tok_lib
from distil_jax.errors import CheckpointError, ConfigError, DataError
from distil_jax.tasks import base as task_base


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _check_run(workdir, iterations=2, groups_per_iteration=2):
  rows = _metrics(workdir)
  assert [r["iteration"] for r in rows] == list(range(iterations + 1))
  for r in rows[1:]:
    assert np.isfinite(r["train/loss"]) and r["train/nonfinite"] == 0.0
    assert r["buffer/rows"] == groups_per_iteration * r["iteration"]  # one buffer row per prompt group
    assert 0.0 <= r["rollout/cut"] <= 1.0  # responses cut at the horizon (`rollout.stopped`, tested by hand)
  assert {"eval/pass@1", "eval/pass@2", "eval/greedy_accuracy"} <= set(rows[-1])
  return rows


@pytest.mark.parametrize("kind", losses.KINDS)
def test_each_loss_kind_with_the_oracle(kind, tmp_path):
  train.train(load_config("arith", **{"loss.kind": kind}), str(tmp_path))
  rows = _check_run(tmp_path)
  if kind in ("distil", "tokenwise_fce"):
    assert rows[1]["train/ce_per_token"] > 0


@pytest.mark.slow
def test_sharded_mesh_runs_the_loop(tmp_path):
  config = load_config(
    "arith", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.num_devices": 8, "train.batch_groups": 4}
  )
  train.train(config, str(tmp_path))
  _check_run(tmp_path)


def test_self_expert_with_ema(tmp_path):
  train.train(load_config("arith", **{"expert.kind": "self", "expert.ema_decay": 0.9}), str(tmp_path))
  rows = _check_run(tmp_path)
  assert rows[1]["rollout/feedback_valid"] == 1.0  # the verifier always gives feedback


def test_feedback_prompts_and_sibling_only_labelling():
  """Groups of 4 are two halves, {0,1} and {2,3}; a response is shown a correct response of the *other* half.
  Group 0: only response 1 is correct, so 2 and 3 see it, while 0 and 1 (its own half) get their own verdict.
  Group 1: nothing correct. With sibling_only, only responses shown a sibling are labelled."""
  verdict = lambda ok: experts.Verdict(ok, "correct" if ok else "wrong")
  r = experts.Rollouts(
    problems=[experts.Problem("p0", "r0"), experts.Problem("p1", "r1")],
    prompt_tokens=np.zeros((2, 1)),
    prompt_mask=np.ones((2, 1)),
    tokens=np.zeros((2, 4, 1)),
    mask=np.ones((2, 4, 1)),
    logprobs=np.zeros((2, 4, 1)),
    texts=[["a", "b", "c", "d"], ["e", "f", "g", "h"]],
    verdicts=[[verdict(False), verdict(True), verdict(False), verdict(False)], [verdict(False)] * 4],
  )
  texts, valid = experts.reprompt_texts(r, "{prompt}|{feedback}")
  sib = experts.SIBLING + "b"
  assert texts == [["p0|wrong", "p0|correct", f"p0|{sib}", f"p0|{sib}"], ["p1|wrong"] * 4]
  assert valid.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
  _, valid = experts.reprompt_texts(r, "{prompt}|{feedback}", sibling_only=True)
  assert valid.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]


def test_self_expert_sibling_only_runs(tmp_path):
  train.train(load_config("arith", **{"expert.kind": "self", "expert.feedback": "sibling"}), str(tmp_path))
  rows = _check_run(tmp_path)
  assert 0.0 <= rows[1]["rollout/feedback_valid"] < 1.0  # an untrained student rarely has a correct sibling


def _teacher_dir(config, workdir, path, extra_vocab=0):
  """A random HF checkpoint with the student's vocabulary (+ extra_vocab), and the student's tokenizer beside it."""
  task = tasks.make_task(config.task)
  tok = build.make_tokenizer(config, task, str(workdir))
  cfg = build.model_config(config, tok.vocab_size)
  cfg = model_lib.ModelConfig(**{**cfg.__dict__, "vocab_size": cfg.vocab_size + extra_vocab, "hidden_size": 48})
  hf.save_hf(model_lib.Transformer(cfg, rngs=nnx.Rngs(7)), cfg, str(path), dtype="float32")
  return str(path)


def test_model_expert(tmp_path, caplog):
  config = load_config("arith", **{"expert.kind": "model"})
  config.expert.model_path = _teacher_dir(config, tmp_path / "run", tmp_path / "teacher")
  with caplog.at_level(logging.WARNING):
    train.train(config, str(tmp_path / "run"))
  _check_run(tmp_path / "run")
  # save_hf writes no tokenizer files: the run says what it assumed
  assumed = "has no tokenizer.json or tokenizer.model: assuming it reads the student's"
  assert any(assumed in r.getMessage() for r in caplog.records)


def test_model_expert_vocabulary_mismatch_is_named(tmp_path):
  config = load_config("arith", **{"expert.kind": "model"})
  config.expert.model_path = _teacher_dir(config, tmp_path / "run", tmp_path / "teacher", extra_vocab=8)
  with pytest.raises(ValueError, match=r"expert vocabulary differs.*vocab_size \d+, the student \d+"):
    train.train(config, str(tmp_path / "run"))


def test_http_expert_against_a_local_server(tmp_path):
  config = load_config("arith", **{"expert.kind": "http", "expert.top_k": 3})
  tok = build.make_tokenizer(config, tasks.make_task(config.task), str(tmp_path))
  with FakeExpertServer(tok) as server:
    config.expert.url = server.url
    train.train(config, str(tmp_path))
    assert server.requests >= 1 + 2 * 8  # the tokenizer check, then one request per response
  _check_run(tmp_path)


def test_http_expert_errors_are_named(tmp_path):
  config = load_config("arith", **{"expert.kind": "http", "expert.max_retries": 0})
  tok = build.make_tokenizer(config, tasks.make_task(config.task), str(tmp_path))
  with FakeExpertServer(tok, mode="garbage") as server:
    config.expert.url = server.url
    with pytest.raises(experts.ExpertError, match=r"127\.0\.0\.1.*not valid JSON.*502 bad gateway"):
      train.train(config, str(tmp_path))
  other = tok_lib.train_sentencepiece(["completely different text 0123456789 +-*=#"], 64, "char")
  with FakeExpertServer(other) as server:
    config.expert.url = server.url
    with pytest.raises(experts.ExpertError, match="tokenizes differently from the student"):
      train.train(config, str(tmp_path))
  config.expert.url = "http://127.0.0.1:9"  # nothing listens there
  config.expert.timeout_s = 1.0
  with pytest.raises(experts.ExpertError, match=r"no answer after 1 tries"):
    train.train(config, str(tmp_path))


def _read_buffer(workdir):
  import tensorstore as ts

  folder = os.path.join(workdir, "buffer", "process_0")
  spec = lambda name: {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(folder, name)}}
  names = [name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))]  # not checksums.json
  return {name: ts.open(spec(name), open=True).result().read().result() for name in names}


def _final_params(workdir, step):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
    return mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tmp_path):
  """Kill a run (SIGKILL) after iteration 3 of 6, resume it: params, buffer and metrics equal an uninterrupted run."""
  args = [
    "--config=configs/arith.py:runlocal",
    "--config.train.iterations=6",
    "--config.checkpoint.every=2",
    "--config.eval.every=2",
    "--config.log.tensorboard=False",
  ]
  whole = run_main(*args, f"--workdir={tmp_path / 'whole'}")
  assert whole.returncode == 0, whole.stderr[-2000:]
  # The console: the config and no INFO line (orbax's save machinery printed ~200); they are in the log file.
  assert whole.stderr.startswith("config:\n") and "train:" in whole.stderr
  assert not [line for line in whole.stderr.splitlines() if line[:1] == "I" and line[1:5].isdigit()]
  log = (tmp_path / "whole" / "logs" / "distil_jax.process_0.log").read_text()
  assert "checkpoint_manager.py" in log and "config:" in log

  env = child_env()
  proc = subprocess.Popen(
    [sys.executable, "-m", "distil_jax.main", *args, f"--workdir={tmp_path / 'cut'}"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  metrics_path = tmp_path / "cut" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:
    if metrics_path.exists() and any(json.loads(x)["iteration"] == 3 for x in metrics_path.read_text().splitlines()):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  cut_rows = [json.loads(x)["iteration"] for x in metrics_path.read_text().splitlines()]
  assert 3 in cut_rows and 6 not in cut_rows, cut_rows  # it really was interrupted mid-run
  resumed = run_main(*args, f"--workdir={tmp_path / 'cut'}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Event loop is closed" not in resumed.stderr

  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
  assert strip(_metrics(tmp_path / "cut")) == strip(_metrics(tmp_path / "whole"))
  a, b = _final_params(tmp_path / "whole", 6), _final_params(tmp_path / "cut", 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  ba, bb = _read_buffer(tmp_path / "whole"), _read_buffer(tmp_path / "cut")
  assert ba.keys() == bb.keys()
  for name in ba:
    np.testing.assert_array_equal(ba[name], bb[name])


def _test_evaluation_keeps_every_response_it_graded(args, tmp_path):
  """`--mode=eval` writes each response it graded (eval_samples.jsonl) beside its figures, 4 per test prompt in the
  order evaluated, each naming its prompt's position: the task's grader, run again on those texts, gives the stored
  verdicts, and their mean per position averaged is the Pass@1 it reported."""
  flags = ["--mode=eval", "--config.eval.split=test", "--config.eval.samples=4", "--config.eval.pass_at=(1,2)"]
  out = run_main(*args, *flags)
  assert out.returncode == 0, out.stderr[-2000:]
  config = load_config("arith")
  task = tasks.make_task(config.task)
  tested = evaluate.held_out(task, "test")[: config.eval.num_prompts]
  rows = [json.loads(x) for x in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
  assert [r["prompt_index"] for r in rows] == [i for i in range(len(tested)) for _ in range(4)]
  assert [r["question"] for r in rows] == [tested[r["prompt_index"]].prompt for r in rows]
  assert {(r["iteration"], r["split"]) for r in rows} == {(2, "test")} and all("prompt" not in r for r in rows)
  assert [task.verify(tested[r["prompt_index"]], r["response"]).correct for r in rows] == [r["correct"] for r in rows]
  per_prompt = [np.mean([r["correct"] for r in rows if r["prompt_index"] == i]) for i in range(len(tested))]
  reported = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[-1])
  np.testing.assert_allclose(reported["eval/pass@1"], np.mean(per_prompt), rtol=1e-6)


def test_an_evaluation_repeated_replaces_only_its_own_kept_responses(tmp_path, monkeypatch):
  """`modes.keep_graded`: checkpoint 2's test responses, its validation ones, checkpoint 3's test ones, then checkpoint
  2's test again (as after a kill before its figures): the file holds one set per (checkpoint, split), the second
  test set in place of the first, the rendered prompt in none; a kill between the copy and the rename leaves the
  file as it was."""
  path = str(tmp_path / "eval_samples.jsonl")
  row = lambda text: {"prompt": "<rendered>", "question": "q", "response": text, "correct": False}
  for texts, iteration, split in ((["a", "b"], 2, "test"), (["c"], 2, "validation"), (["d"], 3, "test")):
    modes.keep_graded(path, [row(t) for t in texts], iteration, split)
  modes.keep_graded(path, [row("e"), row("f")], 2, "test")
  before = open(path).read()
  rows = [json.loads(x) for x in before.splitlines()]
  assert [(r["iteration"], r["split"], r["response"]) for r in rows] == [
    (2, "validation", "c"), (3, "test", "d"), (2, "test", "e"), (2, "test", "f")
  ]  # fmt: skip
  assert all("prompt" not in r for r in rows)

  def killed(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    modes.keep_graded(path, [row("g")], 2, "test")
  assert open(path).read() == before


def test_export_loads_in_transformers(tmp_path):
  args = ["--config=configs/arith.py:runlocal", "--config.log.tensorboard=False", f"--workdir={tmp_path}"]
  assert run_main(*args).returncode == 0
  _test_evaluation_keeps_every_response_it_graded(args, tmp_path)
  out = run_main(*args, "--mode=export", f"--export_dir={tmp_path / 'hf'}", "--config.export.dtype=float32")
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "hf" / "tokenizer.model").exists()
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  params = _final_params(tmp_path, 2)
  model, cfg = hf.load_hf(str(tmp_path / "hf"))
  ours = nnx.merge(nnx.split(model, nnx.Param)[0], params)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
  want = ref(torch.tensor(tokens)).logits.detach().numpy()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens, jnp.int32))), want, atol=1e-4, rtol=0)
  # --step: iteration 1's checkpoint (checkpoint.keep=2 kept it), exported as orbax holds it, not the newest
  out = run_main(
    *args, "--mode=export", "--step=1", f"--export_dir={tmp_path / 'hf1'}", "--config.export.dtype=float32"
  )
  assert out.returncode == 0, out.stderr[-2000:]
  first, _ = hf.load_hf(str(tmp_path / "hf1"))
  ids = jnp.asarray(tokens, jnp.int32)
  saved_first = nnx.merge(nnx.split(first, nnx.Param)[0], _final_params(tmp_path, 1))
  np.testing.assert_allclose(np.asarray(first(ids)), np.asarray(saved_first(ids)), atol=1e-6, rtol=0)
  assert np.abs(np.asarray(first(ids)) - np.asarray(ours(ids))).max() > 1e-4  # iteration 2 moved it
  with pytest.raises(CheckpointError, match=r"no checkpoint of step 7 \(it holds 1, 2;"):
    modes.export(load_config("arith"), str(tmp_path), str(tmp_path / "hf7"), step=7)
  assert not (tmp_path / "hf7").exists()


def test_bad_config_key_and_bad_data_are_one_line_errors(tmp_path):
  out = run_main("--config=configs/arith.py:runlocal", f"--workdir={tmp_path}", "--config.loss.kindd=grpo")
  assert out.returncode != 0 and "unknown config key 'kindd'" in out.stderr.strip().splitlines()[-1]
  data = tmp_path / "math.jsonl"
  data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "4"}\n{"question": oops}\n')
  out = run_main(
    "--config=configs/math.py:runlocal",
    f"--workdir={tmp_path / 'r'}",
    f"--config.task.train_path={data}",
    "--config.expert.kind=self",
  )
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode != 0 and f"{data}:3: not valid JSON" in last, last
  data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
  with pytest.raises(tasks.DataError, match=r"math\.jsonl:2: missing field 'answer'"):
    tasks.make_task(load_config("math", **{"task.train_path": str(data)}).task)


def test_nan_loss_stops_with_a_named_error_and_keeps_what_was_written(tmp_path, monkeypatch):
  config = load_config("arith", **{"train.iterations": 3})
  make = train.update.make_optimizer  # the first update makes every parameter NaN; the next loss is NaN
  monkeypatch.setattr(train.update, "make_optimizer", lambda *a, **k: optax.chain(make(*a, **k), optax.scale(np.nan)))
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at iteration \d, update \d"):
    train.train(config, str(tmp_path))
  rows = _metrics(tmp_path)
  assert rows[0]["iteration"] == 0 and all(np.isfinite(r.get("train/loss", 0.0)) for r in rows)


def test_behaviour_cloning_only_run_then_init_from(tmp_path):
  """A behaviour-cloning run (iterations=0) saves its parameters; a run started from it evaluates them identically."""
  warm = load_config(
    "arith",
    **{"train.iterations": 0, "train.bc_steps": 3, "train.bc_batch": 8, "train.bc_reprompt_fraction": 0.5},
  )
  train.train(warm, str(tmp_path / "warm"))
  w = _metrics(tmp_path / "warm")
  assert len(w) == 1 and w[0]["bc/steps"] == 3 and w[0]["bc/loss_last"] < w[0]["bc/loss_first"]
  assert "before_bc/eval/pass@1" in w[0] and (tmp_path / "warm" / "checkpoints" / "0").exists()
  post = load_config("arith", **{"model.init_from": str(tmp_path / "warm")})
  train.train(post, str(tmp_path / "post"))
  p = _metrics(tmp_path / "post")
  assert {k: v for k, v in p[0].items() if k.startswith("eval/")} == {
    k: v for k, v in w[0].items() if k.startswith("eval/")
  }
  tokenizer = (tmp_path / "post" / "tokenizer.model").read_bytes()  # a copy: the workdir stands alone
  assert tokenizer == (tmp_path / "warm" / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("kind", ["distil", "grpo"])
def test_sampling_temperature_is_the_policy_end_to_end(kind, tmp_path):
  """As a user runs it: a short behaviour-cloned start (a peaked policy), then rollouts at temperature 0.7. The first
  update sees its own fresh rollouts: ratio 1, nothing clipped (the loss once used the untempered policy and clipped
  a quarter of the tokens here). GRPO also keeps its KL reference on device (0 on the first update: ref = policy)."""
  overrides = {
    "loss.kind": kind,
    "sampling.temperature": 0.7,
    "train.iterations": 1,
    "train.bc_steps": 40,
    "train.bc_batch": 16,
  }
  if kind == "grpo":
    overrides["loss.kl_coef"] = 0.05
  train.train(load_config("arith", **overrides), str(tmp_path))
  rows = _check_run(tmp_path, iterations=1)
  assert rows[0]["bc/loss_last"] < 0.7 * rows[0]["bc/loss_first"]  # 3.9 -> 2.3 nats per token
  assert rows[1]["train/clip_fraction"] == 0.0
  np.testing.assert_allclose(rows[1]["train/ratio_mean"], 1.0, atol=1e-4)
  if kind == "grpo":
    assert rows[1]["train/kl_ref"] == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: refused before work starts, one line naming the key or file:line:field, nothing written


BAD_VALUES = [  # what each used to do: fail after iteration 1, or never
  ({"checkpoint.every": 0}, r"checkpoint\.every=0: must be an integer >= 1"),  # ZeroDivisionError
  ({"eval.every": 0}, r"eval\.every=0: must be an integer >= 1"),  # ZeroDivisionError
  ({"train.updates_per_iteration": 0}, r"train\.updates_per_iteration=0: must be an integer >= 1"),  # IndexError
  ({"expert.top_k": 0}, r"expert\.top_k=0: must be an integer >= 1"),  # IndexError
  ({"buffer.mix": 2.0}, r"buffer\.mix=2\.0: must be a number >= 0 and < 1"),  # negative __len__
  ({"checkpoint.keep": 0}, r"checkpoint\.keep=0: must be an integer >= 1"),  # min() of nothing, no checkpoint
  ({"optim.lr": -1.0}, r"optim\.lr=-1\.0: must be a number > 0"),  # trained "fine"
  ({"train.iterations": -1}, r"train\.iterations=-1: must be an integer >= 0"),  # ran to the end
  ({"loss.kind": "grpo", "train.group_size": 1}, r"train\.group_size=1: loss\.kind='grpo' needs at least 2"),
  ({"sampling.max_new_tokens": 0}, r"sampling\.max_new_tokens=0: must be an integer >= 1"),  # JAX traceback
  ({"model.hidden_size": 30}, r"model\.hidden_size=30: must be divisible by model\.num_attention_heads \(4\)"),
  ({"model.dtype": "float8"}, r"model\.dtype='float8': expected one of 'float32', 'bfloat16', 'float16'"),
  ({"model.remat": "some"}, r"model\.remat='some': expected one of 'none', 'full', 'dots'"),
  ({"model.attention": "flash"}, r"model\.attention='flash': expected one of 'auto', 'einsum', 'xla', 'cudnn'"),
  ({"sampling.temperature": 0.0}, r"sampling\.temperature=0\.0: must be a number > 0"),  # NaN at iteration 1
  ({"mesh.fsdp": 3}, r"mesh \(data=1, fsdp=3, tensor=1\) does not fit the 1 devices in use"),
  ({"train.batch_groups": 3, "mesh.num_devices": 2, "mesh.fsdp": 2}, r"train\.batch_groups .* = 3 is not divisible"),
  ({"expert.kind": "http"}, r"expert\.url='': expert\.kind='http' needs the server's http:// or https:// address"),
  ({"task.train_path": "/nonexistent.jsonl"}, r"task\.train_path='/nonexistent\.jsonl': no such file"),
]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_a_bad_value_is_refused_before_work_naming_the_key(overrides, message, tmp_path):
  with pytest.raises(ConfigError, match=message):
    train.train(load_config("arith", **overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_bad_values_through_main_one_line_each_and_no_workdir(tmp_path):
  out = run_main(
    "--config=configs/arith.py:runlocal",
    f"--workdir={tmp_path / 'run'}",
    "--config.checkpoint.every=0",
    "--config.optim.lr=-1",
    "--config.model.dtype=float8",
  )
  tail = out.stderr.strip().splitlines()[-3:]
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert tail[0] == "distil_jax: ConfigError: model.dtype='float8': expected one of 'float32', 'bfloat16', 'float16'"
  assert tail[1:] == ["  optim.lr=-1.0: must be a number > 0", "  checkpoint.every=0: must be an integer >= 1"]
  assert not (tmp_path / "run").exists()


def _jsonl(path, records, *, raw_line=None, at=None):
  lines = [json.dumps(r).encode() for r in records]
  if raw_line is not None:
    lines.insert(at, raw_line)
  with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return str(path)


RECORDS = [{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(40)]


def test_data_records_are_checked_at_load_naming_file_line_field(tmp_path):
  import tracemalloc

  latin1 = '{"question": "caf\xe9?", "answer": "1"}'.encode("latin-1")
  bad = _jsonl(tmp_path / "latin1.jsonl", RECORDS, raw_line=latin1, at=5)
  with pytest.raises(DataError, match=r"latin1\.jsonl:6: not UTF-8 text \(byte 0xe9 at byte 18 of the line\)"):
    task_base.read_jsonl(bad, ["question", "answer"])
  # A 50 MB line is refused after reading 1 MB of it (it used to be read whole: 3.6 GB resident).
  huge = json.dumps({"question": "x" * 50_000_000, "answer": "1"}).encode()
  for name in ("huge.jsonl", "huge.jsonl.gz"):
    path = _jsonl(tmp_path / name, RECORDS, raw_line=huge, at=7)
    tracemalloc.start()
    with pytest.raises(
      DataError, match=rf"{re.escape(name)}:8: the line is longer than task\.max_record_bytes=1048576"
    ):
      task_base.read_jsonl(path, ["question", "answer"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak
  # A prompt longer than the largest sampling bucket: refused before any work, naming its record (it used to crash
  # the iteration that drew it).
  long = [*RECORDS[:9], {"question": "what is " + "1+" * 40 + "1?", "answer": "41"}, *RECORDS[9:]]
  config = load_config("math", **{"task.train_path": _jsonl(tmp_path / "long.jsonl", long), "expert.kind": "self"})
  config.task.eval_size, config.eval.num_prompts = 8, 4
  with pytest.raises(DataError, match=r"long\.jsonl:10:question: the prompt is \d+ tokens, more than the largest"):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_resume_skips_a_damaged_checkpoint_and_metrics_precede_each_checkpoint(tmp_path, caplog, monkeypatch):
  """Bit rot in the latest checkpoint: the run warns once, resumes from the one before and replays iteration 2
  exactly. Each iteration's metrics line is on disk before its checkpoint is saved."""
  seen_at_save = {}
  save = checkpoint.Checkpointer.save

  def recording_save(self, step, state, meta):
    with open(os.path.join(os.path.dirname(self.directory), "metrics.jsonl")) as f:
      seen_at_save[step] = [json.loads(line)["iteration"] for line in f]
    return save(self, step, state, meta)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", recording_save)
  config = load_config("arith", **{"train.iterations": 2})
  train.train(config, str(tmp_path / "cut"))
  assert seen_at_save == {1: [0, 1], 2: [0, 1, 2]}
  before = _metrics(tmp_path / "cut")
  rot_one_bit(tmp_path / "cut" / "checkpoints" / "2" / "params", "model.embed_tokens.embedding", (3, 5))
  config.train.iterations = 3
  with caplog.at_level(logging.WARNING):
    train.train(config, str(tmp_path / "cut"))
  warned = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
  assert warned == [
    "checkpoint 2 is unusable (content checksum differs for params/model/embed_tokens/embedding (bytes changed on "
    "disk)); resuming from checkpoint 1 instead"
  ]
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["2", "2.unusable", "3"]
  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
  after = _metrics(tmp_path / "cut")
  assert [r["iteration"] for r in after] == [0, 1, 2, 3] and strip(after[:3]) == strip(before)


def _one_response(tok):
  return _rollouts(tok, feedback=("wrong",))  # 1 prompt x 1 response "2+13" (4 tokens), verdict "wrong"


HTTP_FAULTS = {  # what each used to do: NaN in the buffer (loss 0.0), loss 753, labels shifted by one
  "nan": r"log-prob nan of token_id:\d+ at response position 3 is not a finite number <= 0",
  "positive": r"log-prob 3\.0 of token_id:\d+ at response position 3 is not a finite number <= 0",
  "bos": r"the echoed tokens differ from the \d+ sent \(first difference at position 0: sent \d+, echoed 2\)",
  "overfull": r"the top-3 probabilities of response position 3 sum to 1\.5 > 1",
}


@pytest.mark.parametrize("fault", HTTP_FAULTS)
def test_http_expert_checks_content_not_only_form(fault, tmp_path):
  config = load_config("arith", **{"expert.kind": "http", "expert.top_k": 3, "expert.max_retries": 0})
  tok = build.make_tokenizer(config, tasks.make_task(config.task), str(tmp_path), save=False)
  with FakeExpertServer(tok) as server:
    config.expert.url = server.url
    expert = experts.make_expert(config.expert, None, tok)
    good, _ = expert.label(_one_response(tok))
    np.testing.assert_allclose(np.exp(good["target_logprobs"][0, 0]).sum(-1), 0.8, rtol=1e-6)  # 0.6 + 2 x 0.1
    server.mode = fault
    with pytest.raises(experts.ExpertError, match=rf"expert http://127\.0\.0\.1:\d+: {HTTP_FAULTS[fault]}"):
      expert.label(_one_response(tok))


def test_a_bad_expert_reply_writes_nothing_to_the_buffer(tmp_path):
  config = load_config("arith", **{"expert.kind": "http", "expert.top_k": 3})
  tok = build.make_tokenizer(config, tasks.make_task(config.task), str(tmp_path), save=False)
  with FakeExpertServer(tok, mode="nan") as server:
    config.expert.url = server.url
    with pytest.raises(experts.ExpertError, match="not a finite number"):
      train.train(config, str(tmp_path))
  assert [r["iteration"] for r in _metrics(tmp_path)] == [0]
  assert all(len(v) == 0 for v in _read_buffer(tmp_path).values())
