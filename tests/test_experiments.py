"""The evidence experiments: signs of the bandit claim, the credit-assignment claim, the protocol's statistics and
prompt split, privileged (`reference`) feedback, and smoke runs of the scripts."""

import ast
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import pytest
from flax import nnx
from run_helpers import ROOT, child_env, load_config, wait_for_file

from distil_jax import build, evaluate, experts, rollout, sharding, tasks, validate
from distil_jax.tasks import math as math_task
from distil_jax.tasks.base import Problem, Verdict
from experiments import (
  arith_comparison,
  bandit,
  comparison_tasks,
  credit_assignment,
  gradient_variance,
  processes,
  report,
  stats,
  teacher_quality,
)


def test_bandit_worked_case_signs():
  """pi = (0.05, 0.70, 0.25), q = (0.3, 0.6, 0.1), r = (1, 0, 1): E_q r = 0.4 > J = 0.3."""
  fo = bandit.first_order(bandit.PI, bandit.Q, bandit.R)
  assert fo["forward_ce"]["dJ"] > 0 and fo["forward_ce_natural"]["dJ"] > 0
  for name in ("reverse_kl", "jsd"):
    assert fo[name]["dJ"] < 0, name  # lowers the expected reward ...
    assert fo[name]["dpi"][1] > 0, name  # ... and raises the probability of the r = 0 action
  # Closed form for the plain forward-CE step: dpi = (diag(pi) - pi pi^T)(q - pi); by hand dJ = 0.0035 per unit eta.
  np.testing.assert_allclose(fo["forward_ce"]["dJ"], 0.0035, atol=1e-6)
  np.testing.assert_allclose(fo["forward_ce_natural"]["dJ"], 0.1, atol=1e-12)  # eta (E_q r - J)


def test_natural_step_never_lowers_reward_but_plain_gradient_can():
  rng = np.random.default_rng(1)
  found_counterexample = False
  for _ in range(300):
    pi, q = rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(3))
    r = rng.integers(0, 2, 3).astype(float)
    if q @ r <= pi @ r:
      continue
    # The natural-gradient step on the library's forward-CE gradient, F^+ grad with F = diag(pi) - pi pi^T (the
    # softmax Fisher), moves pi by exactly q - pi: the mixture step, whence dJ = E_q r - J >= 0.
    fisher = np.diag(pi) - np.outer(pi, pi)
    g = bandit.logit_gradients(pi, q)["forward_ce"]
    np.testing.assert_allclose(fisher @ (-np.linalg.pinv(fisher) @ g), q - pi, atol=1e-6)
    found_counterexample |= bandit.first_order(pi, q, r)["forward_ce"]["dJ"] < 0
  assert found_counterexample  # the monotonicity claim is about policy space, not plain logit gradients


def test_credit_assignment_worked_case():
  """Position-only student: tokenwise FCE stalls at p(first = 0) = 0.6; DistIL commits and reaches a lower J."""
  out = credit_assignment.run(*credit_assignment.worked_case(), steps=1500)
  tok, dis = out["tokenwise_fce"], out["distil"]
  np.testing.assert_allclose(tok["policy"][0][0], 0.6, atol=5e-3)  # the expert's first-step distribution
  assert tok["own_gradient_norm"] < 1e-3 < tok["grad_J_norm"]  # stationary for itself, not for J
  assert dis["policy"][0][0] > 0.75 and dis["grad_J_norm"] < 1e-2
  assert dis["J"] < tok["J"] - 0.04


def test_experiment_scripts_run(tmp_path, monkeypatch):
  monkeypatch.setattr("sys.argv", ["bandit", "--out", str(tmp_path), "--sweep", "50"])
  bandit.main()
  assert json.loads((tmp_path / "bandit.json").read_text())["sweep"]["fraction_lowering_J"]["forward_ce_natural"] == 0
  monkeypatch.setattr("sys.argv", ["ca", "--out", str(tmp_path), "--random", "1", "--steps", "200"])
  credit_assignment.main()
  assert (tmp_path / "credit_assignment.png").exists()
  jax.clear_caches()


# -- The protocol's statistics -----------------------------------------------------------------------------------------


def _t_mass_by_integration(t, df):
  """P(|T| <= t) by the trapezoid rule on Student's density: independent of the closed form under test."""
  x = np.linspace(0.0, t, 200_001)
  log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
  density = np.exp(log_c - (df + 1) / 2 * np.log1p(x**2 / df))
  return 2 * float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 9])
def test_t_distribution_against_integration_and_closed_forms(df):
  for t in (0.3, 1.0, 2.5, 6.0):
    np.testing.assert_allclose(stats.t_two_sided_mass(t, df), _t_mass_by_integration(t, df), atol=1e-8)
  q = stats.t_quantile(0.95, df)
  np.testing.assert_allclose(_t_mass_by_integration(q, df), 0.95, atol=1e-8)
  if df == 1:  # Cauchy: the 97.5% quantile is tan(0.475 pi)
    np.testing.assert_allclose(q, math.tan(0.475 * math.pi), rtol=1e-10)
  if df == 2:  # t_p = (2p - 1) / sqrt(2 p (1 - p))
    np.testing.assert_allclose(q, 0.95 / math.sqrt(2 * 0.975 * 0.025), rtol=1e-10)


def test_mean_ci_and_paired_differences_by_hand():
  """[1..5]: mean 3, sd sqrt(2.5), half width t_{0.975,4} sqrt(2.5 / 5) with t_{0.975,4} = 2.776445105 (tables)."""
  ci = stats.mean_ci([1, 2, 3, 4, 5])
  np.testing.assert_allclose(ci["half_width"], 2.776445105 * math.sqrt(0.5), rtol=1e-8)
  np.testing.assert_allclose(ci["ci"], [3 - ci["half_width"], 3 + ci["half_width"]])
  assert stats.mean_ci([0.4])["ci"] is None  # one seed: no interval, not a zero-width one
  p = stats.paired({0: 0.5, 1: 0.7, 2: 0.6, 3: 0.9}, {0: 0.4, 1: 0.7, 2: 0.8})  # seed 3 has no partner
  assert p["seeds"] == [0, 1, 2]
  np.testing.assert_allclose(p["diffs"], [0.1, 0.0, -0.2], atol=1e-12)
  assert (p["sign_test"]["n"], p["sign_test"]["ties"]) == (2, 1)


def test_sign_test_exact_binomial():
  """Zeros dropped; n = 5 all positive: two-sided 2/32, one-sided 1/32; 4 of 5: 2 (1 + 5)/32 and (5 + 1)/32."""
  t = stats.sign_test([0.1, 0.2, 0.3, 0.05, 0.4])
  assert (t["p_two_sided"], t["p_greater"]) == (2 / 32, 1 / 32)
  t = stats.sign_test([0.1, 0.2, 0.3, 0.05, -0.4, 0.0])
  assert (t["n"], t["ties"], t["p_two_sided"], t["p_greater"]) == (5, 1, 12 / 32, 6 / 32)
  t = stats.sign_test([-1, -2, -3])
  assert (t["p_two_sided"], t["p_greater"]) == (2 / 8, 1.0)
  assert stats.sign_test([0.0, 0.0])["p_two_sided"] == 1.0


# -- Three disjoint prompt sets ----------------------------------------------------------------------------------------


def test_train_validation_test_are_disjoint_by_problem():
  """Validation and test partition the held-out prompts by identity (no prompt in both, duplicates included), each
  holds the protocol's 256, and the training stream never draws a held-out prompt."""
  config = load_config("arith", "compare")
  task = tasks.make_task(config.task)
  val, test = evaluate.held_out(task, "validation"), evaluate.held_out(task, "test")
  held = [p.prompt for p in task.problems("eval")]
  assert not {p.prompt for p in val} & {p.prompt for p in test}
  assert sorted(p.prompt for p in val + test) == sorted(held)  # a partition of the held-out list
  assert min(len(val), len(test)) >= config.eval.num_prompts == 256
  train_stream = task.problems("train")
  assert not {train_stream[i].prompt for i in range(3000)} & set(held)
  # membership is a function of the prompt alone: a smaller held-out list splits the same way
  small = tasks.make_task(types.SimpleNamespace(**{**config.task.to_dict(), "eval_size": 100}))
  assert {p.prompt for p in evaluate.held_out(small, "test")} <= {p.prompt for p in test}
  with pytest.raises(ValueError, match="eval.split='dev'"):
    evaluate.held_out(task, "dev")


def test_logged_samples_say_whether_a_response_stopped_or_was_cut():
  """Hand-built responses of up to 4 tokens with stop id 2: one ends with it, one fills the horizon without it, one
  fills it and ends with it (stopped, at the horizon); `per_prompt` keeps the first ones of each prompt, and each row
  says its prompt's position in the evaluated list (the same question twice is two positions)."""
  tokens = np.array([[[5, 6, 2, 0], [5, 6, 7, 8], [5, 6, 7, 2]]], np.int32)
  mask = (np.arange(4) < np.array([3, 4, 4])[:, None]).astype(np.int32)[None]
  r = experts.Rollouts(
    problems=[Problem("1 + 1?", "2")], prompt_tokens=np.zeros((1, 1), np.int32), prompt_mask=np.ones((1, 1)),
    tokens=tokens, mask=mask, logprobs=np.zeros(tokens.shape, np.float32), texts=[["a", "b", "c"]],
    verdicts=[[Verdict(True, "correct"), Verdict(False, "no final answer"), Verdict(False, "wrong")]],
  )  # fmt: skip
  tok = types.SimpleNamespace(stop_ids=(2,), prompt_text=lambda text, add_bos: f"<user>{text}")
  rows = evaluate.sample_rows(r, 3, tok=tok, add_bos=False)
  assert [(x["response"], x["tokens"], x["stopped"]) for x in rows] == [("a", 3, True), ("b", 4, False), ("c", 4, True)]
  assert rows[0]["prompt"] == "<user>1 + 1?" and [x["correct"] for x in rows] == [True, False, False]
  assert len(evaluate.sample_rows(r, 2, tok=tok, add_bos=False)) == 2
  # the training figure `rollout/cut` reads the same: a second prompt's group adds an empty response (never stopped)
  tokens2 = np.concatenate([tokens, np.array([[[2, 0, 0, 0], [2, 0, 0, 0], [7, 7, 7, 7]]], np.int32)])  # pad = stop
  mask2 = np.concatenate([mask, (np.arange(4) < np.array([1, 0, 4])[:, None]).astype(np.int32)[None]])
  np.testing.assert_array_equal(rollout.stopped(tokens2, mask2, (2,)), [[True, False, True], [True, False, False]])
  # each row names its prompt's position in the evaluated list: process 1 of 3 evaluates positions 1, 4, 7, ...
  r2 = dataclasses.replace(
    r, problems=[Problem("1 + 1?", "2"), Problem("1 + 1?", "2")], tokens=tokens2, mask=mask2,
    logprobs=np.zeros(tokens2.shape, np.float32), texts=[["a", "b", "c"], ["d", "e", "f"]], verdicts=r.verdicts * 2,
  )  # fmt: skip
  assert [x["prompt_index"] for x in evaluate.sample_rows(r2, 2, tok=tok, add_bos=False)] == [0, 0, 1, 1]
  assert [x["prompt_index"] for x in evaluate.sample_rows(r2, 1, tok=tok, add_bos=False, first=1, stride=3)] == [1, 4]


# -- Privileged feedback (expert.feedback="reference") -----------------------------------------------------------------


def _rollouts():
  verdict = lambda ok: experts.Verdict(ok, "correct" if ok else "wrong")
  return experts.Rollouts(
    problems=[experts.Problem("p0", "1", "ref0"), experts.Problem("p1", "2", None)],
    prompt_tokens=np.zeros((2, 1)),
    prompt_mask=np.ones((2, 1)),
    tokens=np.zeros((2, 2, 1)),
    mask=np.ones((2, 2, 1)),
    logprobs=np.zeros((2, 2, 1)),
    texts=[["a", "b"], ["c", "d"]],
    verdicts=[[verdict(False), verdict(True)], [verdict(False), verdict(False)]],
  )


def test_reference_feedback_shows_the_reference_and_the_own_verdict():
  """Groups of 2 (no halves needed: no sibling is read). Response 0 of prompt 0 is wrong, 1 correct; each is shown the
  reference solution and its *own* verdict, never a sibling's text. Prompt 1 has no reference: unlabelled."""
  texts, valid = experts.reprompt_texts(_rollouts(), "{prompt}|{feedback}", feedback="reference")
  ref = experts.SIBLING + "ref0"
  assert texts[0] == [f"p0|{ref}; wrong", f"p0|{ref}; correct"]
  assert valid.tolist() == [[1, 1], [0, 0]]
  r = _rollouts()  # the default mode is untouched by a verdict whose text happens to name a mode
  r.verdicts[1] = [experts.Verdict(False, "reference"), experts.Verdict(False, "wrong")]
  assert experts.reprompt_texts(r, "{prompt}|{feedback}")[0][1] == ["p1|reference", "p1|wrong"]
  with pytest.raises(ValueError, match="expert.feedback='oracle'"):
    experts.reprompt_texts(_rollouts(), "{prompt}|{feedback}", feedback="oracle")


def test_reference_feedback_keeps_the_whole_group_baseline():
  """A reference expert reads no sibling: LOO over the whole group (parts 1), and groups of 2 are allowed; the
  sibling-reading default still needs halves and refuses groups of 2."""
  tok = types.SimpleNamespace(vocab_size=64)
  for feedback, parts in (("reference", 1), ("any", 2), ("sibling", 2)):
    config = load_config("arith", **{"expert.kind": "self", "expert.feedback": feedback})
    expert = experts.make_expert(config.expert, None, tok)
    assert expert.reads_siblings == experts.reads_siblings(config.expert) == (parts == 2)
    assert build.loss_config(config, tok, expert).baseline_parts == parts
    config.train.group_size = 2
    if parts == 1:
      validate.config(config, devices=1, processes=1)
    else:
      with pytest.raises(ValueError, match="needs an even group of >= 4"):
        validate.config(config, devices=1, processes=1)
  with pytest.raises(ValueError, match="needs a device expert"):
    experts.make_expert(load_config("arith", **{"expert.kind": "http", "expert.feedback": "reference"}).expert, 0, tok)


# -- Orchestration of the protocol, with a stand-in trainer ------------------------------------------------------------

PLANTED = {  # validation Pass@1 at the end of each grid run (seed 0); the test figure is 0.1 * seed + method offset
  "DistIL": {1e-4: 0.30, 3e-4: 0.50, 1e-3: 0.40},
  "GRPO": {1e-4: 0.45, 3e-4: 0.45, 1e-3: 0.20},  # a tie: the smaller rate wins
  "SFT": {1e-4: 0.10, 3e-4: 0.20, 1e-3: 0.60},
}
OFFSET = {"DistIL": 0.3, "GRPO": 0.1, "SFT": 0.35}


def _fake_main(calls):
  def fake(args, log, core=None, elapsed=None, on_start=None):
    if on_start is not None:
      on_start()
    calls.append(args)
    flag = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    wd, seed = flag["--workdir"], int(flag["--config.seed"])
    os.makedirs(os.path.join(wd, "checkpoints"), exist_ok=True)
    if flag.get("--config.train.iterations") == "0":
      return 1.0
    method = next(m for m, f in comparison_tasks.METHODS.items() if f[0] in args)
    lr = float(flag["--config.optim.lr"])
    if flag.get("--mode") == "eval":
      assert flag["--config.eval.split"] == "test"
      figure = OFFSET[method] + 0.1 * seed
      with open(os.path.join(wd, "eval.jsonl"), "a") as f:
        f.write(json.dumps({"eval/pass@1": figure, "eval/pass@2": figure + 0.05, "iteration": 2}) + "\n")
      return 1.0
    val = PLANTED[method][lr] if seed == 0 else 0.5
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
      for it in range(3):
        f.write(json.dumps({"iteration": it, "eval/pass@1": val, "eval/pass@2": val, "samples/train_tokens": it}))
        f.write("\n")
    return 2.0

  return fake


def _protocol_with_fake_runs(tmp_path, monkeypatch, *flags):
  """`arith_comparison` with `flags` and the stand-in trainer: (the JSON it writes, every command it launched)."""
  calls = []
  monkeypatch.setattr(processes, "main_process", _fake_main(calls))
  argv = ["cmp", "--smoke", *flags, "--out", str(tmp_path), "--workdir", str(tmp_path / "runs")]
  monkeypatch.setattr("sys.argv", argv)
  arith_comparison.main()
  return json.loads((tmp_path / "arith_oracle.json").read_text()), calls


def test_protocol_selects_on_validation_and_reports_test_once(tmp_path, monkeypatch, capsys):
  flags = ["--seeds", "0", "1", "2", "--methods", "DistIL", "GRPO", "SFT"]
  out, calls = _protocol_with_fake_runs(tmp_path, monkeypatch, *flags)
  assert {m: out["table"][m]["chosen_lr"] for m in PLANTED} == {"DistIL": 3e-4, "GRPO": 1e-4, "SFT": 1e-3}
  assert all(r["edge_checked"] is None and not r["at_edge"] for r in out["table"].values())  # arith: widened by hand
  tests = [a for a in calls if "--mode=eval" in a]
  assert len(tests) == 9  # once per method and seed, at the chosen rate only
  for args in tests:
    method = next(m for m in PLANTED if comparison_tasks.METHODS[m][0] in args)
    assert f"--config.optim.lr={out['table'][method]['chosen_lr']!r}" in args
  trains = [a for a in calls if "--mode=eval" not in a and "--config.train.iterations=0" not in a]
  assert len(trains) == 3 * 3 + 3 * 2  # the grid on seed 0, then seeds 1 and 2
  for args in trains:  # every run starts from its own seed's behaviour-cloned start
    seed = next(a for a in args if a.startswith("--config.seed=")).split("=")[1]
    assert any(a.startswith("--config.model.init_from=") and a.endswith(f"warmup_seed{seed}") for a in args)
  varying = r"--(workdir|config\.(seed|optim\.lr|loss\.|model\.init_from))"
  shared = {tuple(a for a in args if not re.match(varying, a)) for args in trains}
  assert len(shared) == 1  # same budget, data and evaluation flags for every method, rate and seed
  np.testing.assert_allclose(out["table"]["DistIL"]["test"]["pass@1"]["mean"], 0.4)
  np.testing.assert_allclose(out["table"]["DistIL"]["test"]["pass@1"]["half_width"], 4.302652729749 * 0.1 / 3**0.5 * 1)
  paired = out["paired_DistIL_minus"]
  np.testing.assert_allclose(paired["GRPO"]["pass@1"]["diffs"], [0.2, 0.2, 0.2], atol=1e-12)
  assert paired["GRPO"]["pass@1"]["sign_test"]["p_two_sided"] == 2 / 8
  assert paired["SFT"]["pass@1"]["sign_test"]["negative"] == 3
  assert (tmp_path / "arith_oracle_curves.png").exists() and (tmp_path / "arith_oracle_passk.png").exists()
  text = report.tables(out)  # the README's tables: 0.4 +- t(0.975, 2) * 0.1 / sqrt(3) = 0.4 +- 0.248
  assert (
    "| DistIL | **0.0003** (0.0001: 0.300, 0.0003: 0.500, 0.001: 0.400) | 0.500 [0.500, 0.500] | 0.400 [0.152, 0.648]"
    in text
  )
  assert "| GRPO | +0.200 [+0.200, +0.200]; +0.200 +0.200 +0.200; 3/3 up, p=0.25 |" in text
  capsys.readouterr()
  report.main([str(tmp_path / "arith_oracle.json")])  # the command the README gives prints the same tables
  assert text in capsys.readouterr().out


def test_a_run_killed_with_its_orchestrator_keeps_its_wall_time(tmp_path, monkeypatch):
  """A session's end kills the orchestrator and its run at once: the intervals the run had lived are on disk, each
  resumed part adds to them, and the finished run reports the sum (the record was once written only when the run's
  process returned)."""
  cmp = arith_comparison.Comparison("oracle", str(tmp_path), smoke=True)
  _, wd, _ = cmp.command("DistIL", 0, 1e-4)
  killed, lives = RuntimeError("killed"), [3, 2, 0]  # intervals each start lives before the kill; the last finishes

  class Process:
    def __init__(self, *args, **kwargs):
      self.left = lives.pop(0)
      self.finishes = not lives

    def wait(self, timeout=None):
      if self.finishes:
        with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
          f.write(json.dumps({"iteration": cmp.iterations}) + "\n")
        return 0
      if timeout is None or self.left == 0:  # a wait without a timeout blocks until the kill
        raise killed
      self.left -= 1
      time.sleep(timeout)
      raise subprocess.TimeoutExpired("run", timeout)

  monkeypatch.setattr(processes, "WALL_EVERY", 0.05)
  monkeypatch.setattr(processes.subprocess, "Popen", Process)
  recorded = []
  for _ in range(2):
    with pytest.raises(RuntimeError, match="killed"):
      cmp.train("DistIL", 0, 1e-4)
    recorded.append(json.loads(open(os.path.join(wd, "wall_seconds.json")).read()))
  assert 0.15 <= recorded[0] < 1.0 and 0.25 <= recorded[1] < 2.0  # 3 intervals of 0.05 s, then 3 + 2
  assert cmp.train("DistIL", 0, 1e-4)["wall_seconds"] >= recorded[1]
  assert open(os.path.join(wd, "commits")).read().split() == [cmp.commit] * 3  # one line per part that ran


def test_a_run_declined_at_a_signal_notes_no_commit(tmp_path, monkeypatch):
  """After a SIGTERM the orchestrator starts no run, and the run it declined lists no commit: its `commits` names
  the code each launched part ran at, and no part ran (it once noted the commit, then declined)."""
  cmp = arith_comparison.Comparison("oracle", str(tmp_path), smoke=True)
  _, wd, _ = cmp.command("DistIL", 0, 1e-4)
  monkeypatch.setattr(processes.subprocess, "Popen", lambda *a, **k: pytest.fail("a run started"))
  stopping = threading.Event()
  stopping.set()
  monkeypatch.setattr(processes, "_STOPPING", stopping)
  with pytest.raises(RuntimeError, match="stopping at a signal: not started"):
    cmp.train("DistIL", 0, 1e-4)
  assert not os.path.exists(os.path.join(wd, "commits"))


def test_a_signal_reaches_a_run_that_was_starting_when_it_came(tmp_path, monkeypatch):
  """A SIGTERM to the orchestrator while a worker thread is starting a run: the run gets the signal once (so it
  stops at its safe point, not at a second signal's hard exit) and no later run starts."""
  signals, started = [], threading.Event()

  class Process:  # a run whose start takes a while
    def __init__(self, *args, **kwargs):
      started.set()
      time.sleep(0.3)

    def send_signal(self, signum):
      signals.append(signum)

    def wait(self, timeout=None):
      if not signals:
        time.sleep(timeout or 0)
        raise subprocess.TimeoutExpired("run", timeout)
      return 0

  monkeypatch.setattr(processes.subprocess, "Popen", Process)
  monkeypatch.setattr(processes, "WALL_EVERY", 0.01)
  monkeypatch.setattr(processes, "_STOPPING", threading.Event())
  run = lambda name: processes.main_process([f"--workdir={tmp_path / name}"], str(tmp_path / f"{name}.log"))
  worker = threading.Thread(target=run, args=("a",), daemon=True)
  worker.start()
  started.wait()
  with pytest.raises(SystemExit):
    processes.pass_signal_on(signal.SIGTERM, None)
  worker.join(5)  # a run the signal missed would go on: the suite waits for it no longer than this
  assert signals == [signal.SIGTERM]
  noted = []
  with pytest.raises(RuntimeError, match="stopping at a signal: not started"):
    processes.main_process([f"--workdir={tmp_path / 'b'}"], str(tmp_path / "b.log"), on_start=lambda: noted.append(1))
  assert noted == []  # a run that never started notes no commit


def test_a_freed_run_slot_goes_to_the_method_that_asked_first():
  """Two methods share one slot: the one that freed it and asks again at once waits behind the one already waiting,
  so the methods of a stage take turns (a plain queue gave it back to the thread that freed it)."""
  cores = processes.Cores([None])
  order = []
  core = cores.get()  # method a runs

  def method_b():
    order.append(("b", cores.get()))
    cores.put(None)

  b = threading.Thread(target=method_b, daemon=True)
  b.start()
  for _ in range(500):  # until b waits for the slot
    if cores._waiting:
      break
    time.sleep(0.01)
  cores.put(core)
  order.append(("a", cores.get()))  # a's next run
  b.join(5)
  assert order == [("b", None), ("a", None)]


def test_commands_resolve_on_many_threads_at_once():
  """The protocol's methods resolve their commands on threads of their own. Unserialised, CPython 3.11's AST
  constructor (one recursion counter per interpreter: python/cpython#106905) and ml_collections' config loader (one
  module name in sys.modules) fail under threads at different stack depths: "SystemError: AST constructor recursion
  depth mismatch" or "ImportError: module 'config_config' not in sys.modules", in 3 of 5 tries of 8 threads x 25
  here. With thread switches forced every microsecond, 8 threads x 100 must each give the config a lone resolve
  gives."""
  cmd = ["--config=configs/math.py:smollm2_sibling", "--config.eval.pass_at=(1,2)", "--config.optim.lr=3e-05"]
  alone = arith_comparison.resolve(cmd).to_dict()
  results, errors = [], []

  def resolve_at(depth):
    if depth:
      return resolve_at(depth - 1)
    for _ in range(100):
      try:
        results.append(arith_comparison.resolve(cmd).to_dict() == alone)
      except Exception as e:  # any failure is the finding
        errors.append(repr(e))

  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)
  try:
    threads = [threading.Thread(target=resolve_at, args=(7 * i,)) for i in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    sys.setswitchinterval(interval)
  assert errors == [] and results == [True] * 800


def test_method_flags_cannot_change_the_budget(monkeypatch):
  monkeypatch.setitem(comparison_tasks.METHODS, "cheat", ["--config.loss.kind=sft", "--config.train.iterations=80"])
  with pytest.raises(ValueError, match="cheat: --config.train.iterations=80"):
    arith_comparison.check_budget_is_shared()


def test_a_variant_runs_at_its_methods_rate_and_each_run_once(tmp_path, monkeypatch):
  """Two jobs, DistIL and a variant of it asking for the same grid at once: every grid run is made once, and the
  variant trains and is tested at DistIL's chosen rate (3e-4, planted) with its own regrouping of the responses."""
  flags = ["--seeds", "0", "1", "--methods", "DistIL", "DistIL, 16 per prompt", "--jobs", "2"]
  out, calls = _protocol_with_fake_runs(tmp_path, monkeypatch, *flags)
  assert out["table"]["DistIL, 16 per prompt"]["chosen_lr"] == 3e-4
  workdirs = [next(a for a in args if a.startswith("--workdir=")) for args in calls if "--mode=eval" not in args]
  assert len(workdirs) == len(set(workdirs)) == 2 + 3 + 1 + 2  # BC runs, DistIL's grid and seed 1, the variant's
  variant = [args for args in calls if "--config.train.group_size=16" in args]
  assert len(variant) == 4 and all("--config.optim.lr=0.0003" in args for args in variant)
  assert out["paired_DistIL_minus"]["DistIL, 16 per prompt"]["pass@1"]["seeds"] == [0, 1]


@pytest.mark.parametrize("expert", list(comparison_tasks.PRESETS))
def test_every_runs_command_passes_validation(expert, tmp_path):
  """Every method's (and variant's) command in every expert setting is a config the run accepts: GRPO and SFT in a
  self-expert setting once failed at start, because the preset's reference feedback does not go with their oracle."""
  cmp = arith_comparison.Comparison(expert, str(tmp_path))
  cmp.warmup = lambda seed: str(tmp_path / f"warmup_seed{seed}")
  for method in [*comparison_tasks.METHODS, *comparison_tasks.VARIANTS]:
    _, _, cmd = cmp.command(method, 0, 1e-4)
    flags = [f for f in cmd if f.startswith("--config.") and not f.startswith("--config.model.init_from=")]
    validate.config(_with_flags(load_config("arith", comparison_tasks.PRESETS[expert]), flags), devices=1, processes=1)


def test_a_variant_may_regroup_the_responses_but_not_add_any(monkeypatch):
  monkeypatch.setitem(comparison_tasks.VARIANTS, "more", ("DistIL", ["--config.train.group_size=16"]))
  with pytest.raises(ValueError, match=r"more: \[256, 128\] responses per \(iteration, update\)"):
    arith_comparison.check_budget_is_shared()


def _fake_real_main(calls):
  """A stand-in trainer for the real-model protocol: every run ends at its configured length; validation Pass@1 is
  the rate (so the largest wins), the test figure 0.1 x the seed (the start's 0.05 x the seed)."""

  def fake(args, log, core=None, elapsed=None, on_start=None):
    if on_start is not None:
      on_start()
    calls.append(args)
    flag = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    wd = flag["--workdir"]
    os.makedirs(wd, exist_ok=True)
    if flag.get("--mode") == "eval":
      scale = 0.05 if os.path.basename(wd).startswith("start_") else 0.1  # the start below every run but seed 0's
      with open(os.path.join(wd, "eval.jsonl"), "a") as f:
        f.write(json.dumps({"eval/pass@1": scale * int(flag["--config.seed"]), "eval/pass@2": 0.5}) + "\n")
      return 1.0
    lr = float(flag.get("--config.optim.lr", "0"))  # the start (train.iterations=0) has no rate
    os.makedirs(os.path.join(wd, "checkpoints"), exist_ok=True)
    iterations = sorted({0, int(flag.get("--config.train.iterations", comparison_tasks.SMOKE_ITERATIONS))})
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
      for it in iterations:
        f.write(json.dumps({"iteration": it, "eval/pass@1": lr, "eval/pass@2": lr, "samples/train_tokens": it}) + "\n")
    with open(os.path.join(wd, "samples.jsonl"), "w") as f:  # a wrong answer at the start; none, cut, at the end
      for it, response, stopped in zip(iterations, ("The answer is 3.", "Three"), (True, False), strict=False):
        f.write(json.dumps({"iteration": it, "response": response, "correct": False, "stopped": stopped}) + "\n")
    return 2.0

  return fake


def test_real_model_protocol_without_warmup_shares_the_teacherless_runs(tmp_path, monkeypatch):
  """`--task smollm2 --smoke`, both feedback settings in turn, with the stand-in trainer: no behaviour cloning (the
  presets have none), every command a config the run accepts on the tiny smoke model, the hybrid's weight decaying
  over the run's length, GRPO / SFT and the start's test taken once for both settings (the second invocation
  launches only the teacher methods), and no run's weights left behind once its figures are written."""
  calls = []
  monkeypatch.setattr(processes, "main_process", _fake_real_main(calls))
  methods = ["DistIL", "SDPO", "OPSD", "GRPO", "SFT", "DistIL+GRPO"]
  variants = list(comparison_tasks.REAL_VARIANTS)  # DistIL's rate, both seeds; no grid of their own
  base = ["cmp", "--task", "smollm2", "--smoke", "--seeds", "0", "1", "--lrs", "1e-4", "3e-4", "--methods", *methods]
  base += variants
  base += ["--out", str(tmp_path), "--workdir", str(tmp_path / "runs")]
  launched = {}
  for expert in ("sibling", "reference"):
    monkeypatch.setattr("sys.argv", [*base, "--expert", expert])
    arith_comparison.main()
    launched[expert], calls[:] = list(calls), []
  sibling, reference = (json.loads((tmp_path / f"smollm2_{e}.json").read_text()) for e in ("sibling", "reference"))
  assert sibling["protocol"]["warmup"] is False
  grpo = sibling["table"]["GRPO"]  # the grid's largest rate won, so one step beyond it was tried, and won again
  assert (grpo["edge_checked"], grpo["chosen_lr"], grpo["at_edge"]) == (1e-3, 1e-3, True)
  assert grpo["validation_pass@1"] == {"0.0001": 1e-4, "0.0003": 3e-4, "0.001": 1e-3}
  row = "| GRPO | **0.001**, still at the edge (0.0001: 0.000, 0.0003: 0.000, 0.001: 0.001) |"
  assert row in report.tables(sibling)
  trains = lambda cs: [a for a in cs if "--mode=eval" not in a and "--config.train.iterations=0" not in a]
  runs = 6 * 3 + 6 + 2 * len(variants)
  assert len(trains(launched["sibling"])) == runs and len(launched["sibling"]) == 2 * (2 + runs)  # all tested
  start = [a for a in launched["sibling"] if "--config.train.iterations=0" in a]  # the model as loaded, then its test
  assert len(start) == 4 and start[0][-1] == "--config.train.iterations=0"  # per seed; the last flag wins
  assert not any("model.init_from" in " ".join(a) for a in launched["sibling"])
  assert reference["start"] == sibling["start"] and sibling["start"]["test"]["eval/pass@1"] == 0.0  # seed 0's
  for method, minus in sibling["minus_start"].items():  # runs 0.1 x seed, the start 0.05 x seed (the stand-in's)
    np.testing.assert_allclose(minus["pass@1"]["diffs"], [0.0, 0.05], atol=1e-12, err_msg=method)
  assert "| the start (no training) | - | - | 0.025 [-0.293, 0.343] | 0 | - |" in report.tables(sibling)
  assert "| DistIL | +0.025 [-0.293, +0.343]; +0.000 +0.050; 1/1 up, p=1 |" in report.tables(sibling)
  teachers = {"DistIL", "SDPO", "OPSD", "DistIL+GRPO"}
  assert len(launched["reference"]) == 2 * (len(teachers) * 4 + 2 * len(variants))  # GRPO, SFT, the start: read
  for name, (method, flags) in comparison_tasks.REAL_VARIANTS.items():  # its method's rate, with its own flags
    mine = [r for r in sibling["runs"] if r["method"] == name]
    assert [r["lr"] for r in mine] == [sibling["table"][method]["chosen_lr"]] * 2
    assert all(f in r["command"] for r in mine for f in flags)
  for run in reference["runs"]:
    setting = "smollm2_reference" if run["method"] in teachers | set(variants) else "smollm2_sibling"
    assert f"/{setting}/" in run["workdir"] and f"--config=configs/math.py:{setting}" in run["command"]
  hybrid = next(a for a in launched["sibling"] if "--config.loss.kind=distil_grpo" in a)
  assert f"--config.loss.distil_weight_decay_iterations={comparison_tasks.SMOKE_ITERATIONS}" in hybrid
  for args in trains(launched["sibling"] + launched["reference"]) + start[:1]:
    preset = next(a for a in args if a.startswith("--config=")).split(":")[1]
    flags = [f for f in args if f.startswith("--config.")]
    validate.config(_with_flags(load_config("math", preset), flags), devices=1, processes=1)
  assert reference["paired_DistIL_minus"]["GRPO"]["pass@1"]["diffs"] == [0.0, 0.0]  # the same GRPO runs, read back
  assert not list((tmp_path / "runs").glob("*/*/checkpoints"))  # weights dropped once tested or not chosen


def test_real_model_runs_recorded_outside_the_machine_are_read_back_on_a_fresh_one(tmp_path, monkeypatch):
  """A session may end on a machine that the next one does not get: every run is tested as it finishes, holding its
  slot (its weights die with the machine), its figures and config go to `--record`, and a fresh workdir launches
  nothing, takes no run slot (a method done reads its runs back without waiting its turn) and reports the same; a
  record of another config is refused, not read as the run."""
  calls = []
  monkeypatch.setattr(processes, "main_process", _fake_real_main(calls))
  argv = ["cmp", "--task", "smollm2", "--smoke", "--seeds", "0", "1", "--lrs", "1e-4", "3e-4"]
  argv += ["--methods", "DistIL", "GRPO", "--out", str(tmp_path), "--workdir", str(tmp_path / "runs")]
  monkeypatch.setattr("sys.argv", [*argv, "--record", str(tmp_path / "record")])
  arith_comparison.main()
  first = json.loads((tmp_path / "smollm2_sibling.json").read_text())
  workdir = lambda a: next(f for f in a if f.startswith("--workdir="))
  tested = [i for i, a in enumerate(calls) if "--mode=eval" in a]  # 2 starts and 2 x 4 runs, grid and edge included
  assert len(calls) == 20 and tested == list(range(1, 20, 2))  # each right after its training, no run between
  assert all(workdir(calls[i]) == workdir(calls[i - 1]) for i in tested)
  recorded = sorted(str(p.relative_to(tmp_path / "record")) for p in (tmp_path / "record").rglob("*") if p.is_file())
  lrs = (("0.0001", 0), ("0.0003", 0), ("0.001", 0), ("0.001", 1))  # 3e-4 won at the edge: 1e-3 tried, and won
  runs = [f"{m}_lr{lr}_seed{s}" for m in ("DistIL", "GRPO") for lr, s in lrs]
  files = ("commits", "config.json", "eval.jsonl", "metrics.jsonl", "samples.jsonl", "wall_seconds.json")
  assert recorded == [f"smollm2_sibling/{r}/{f}" for r in [*runs, "start_seed0", "start_seed1"] for f in files]
  config = json.loads((tmp_path / "record/smollm2_sibling/GRPO_lr0.001_seed1/config.json").read_text())
  assert (config["loss"]["kind"], config["optim"]["lr"], config["seed"]) == ("grpo", 1e-3, 1)
  rows = report.runs_table(str(tmp_path / "record")).splitlines()
  assert rows[-3].startswith("| smollm2_sibling | GRPO_lr0.001_seed1 | 0.001 -> 0.001 | - -> - | - -> - |")
  assert "| 0.100 | - | - | 0 min |" in rows[-3]  # the test figure the stand-in wrote for seed 1; no pass@8
  assert "| 0.050 | - | - | 0 min |" in rows[-1]  # the start's, seed 1
  answers = report.answers_table(str(tmp_path / "record")).splitlines()  # the recorded samples, read back
  assert answers[-3] == "| smollm2_sibling | GRPO_lr0.001_seed1 | 1 | 0 / 1 / 0 (0 cut) | 0 / 0 / 1 (1 cut) | - | - |"
  untrained = "| smollm2_sibling | start_seed1 | 1 | 0 / 1 / 0 (0 cut) | 0 / 1 / 0 (0 cut) | - | - |"
  assert answers[-1] == untrained  # rows without the question and its answer: no regrading
  by_rate = report.answers_by_rate_table(str(tmp_path / "record")).splitlines()  # seeds 0 and 1 at 1e-3: summed
  assert "| smollm2_sibling | GRPO_lr0.001 | 2 | 2 | 0 / 2 / 0 (0 cut) | 0 / 0 / 2 (2 cut) | - | - |" in by_rate
  shutil.rmtree(tmp_path / "runs")
  calls.clear()
  no_slot = lambda self: pytest.fail("a run read back waited for a run slot")  # behind other methods' runs
  monkeypatch.setattr(processes.Cores, "get", no_slot)
  arith_comparison.main()
  assert calls == []
  again = json.loads((tmp_path / "smollm2_sibling.json").read_text())
  assert again["table"] == first["table"] and [r["test"] for r in again["runs"]] == [r["test"] for r in first["runs"]]
  assert again["start"] == first["start"]
  assert (tmp_path / "runs/smollm2_sibling/GRPO_lr0.001_seed1/samples.jsonl").exists()  # copied back too
  stale = tmp_path / "record/smollm2_sibling/DistIL_lr0.0001_seed0/config.json"  # as if the preset changed since
  stale.write_text(stale.read_text().replace('"batch_groups": 2', '"batch_groups": 4'))
  shutil.rmtree(tmp_path / "runs")
  with pytest.raises(RuntimeError, match=r"DistIL_lr0.0001_seed0 was trained under another config \(train.batch_g"):
    arith_comparison.main()


def test_signal_table_weights_each_iteration_by_its_loss_tokens(tmp_path):
  """Token means over the iterations that trained (hand-computed: 100 and 300 tokens; the last iteration, with no
  labelled row, counts for nothing, its entropy included), '-' for what a run does not log (GRPO has no teacher), and
  no row for a run that never trained (the start)."""
  runs = {
    "DistIL_lr1e-05_seed0": [
      {"train/loss_tokens": 100, "train/ce_per_token": 1.0, "train/teacher_entropy_per_token": 0.8},
      {"train/loss_tokens": 300, "train/ce_per_token": 2.0, "train/teacher_entropy_per_token": 1.0},
      {"train/loss_tokens": 0, "train/ce_per_token": 0.0, "train/teacher_entropy_per_token": 0.0},  # as logged
    ],
    "GRPO_lr1e-05_seed0": [{"train/loss_tokens": 50, "train/entropy": 0.7}, {"train/loss_tokens": 50}],
    "start_seed0": [],
  }
  for update in runs["DistIL_lr1e-05_seed0"]:
    update["train/kl_per_token"] = update["train/ce_per_token"] - update["train/teacher_entropy_per_token"]
    update["train/advantage_abs"] = 10 * update["train/ce_per_token"] ** 2
    update["train/entropy"] = update["train/teacher_entropy_per_token"] / 2
  runs["GRPO_lr1e-05_seed0"][1]["train/entropy"] = 0.6
  for run, curve in runs.items():
    (tmp_path / "s" / run).mkdir(parents=True)
    lines = [{"iteration": 0, "eval/pass@1": 0.1}] + [{"iteration": i + 1, **m} for i, m in enumerate(curve)]
    (tmp_path / "s" / run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (tmp_path / "s" / run / "eval.jsonl").write_text("{}\n")  # a whole record
  rows = report.signal_table(str(tmp_path)).splitlines()[2:]
  # CE (100 * 1 + 300 * 2) / 400 = 1.75; H (80 + 300) / 400 = 0.95; KL 0.8; H / CE 0.543; weight (1000 + 12000) / 400
  assert rows == [
    "| s | DistIL_lr1e-05_seed0 | 2 of 3 | 1.750 | 0.950 | 0.800 | 0.54 | 32.5 | 0.400 -> 0.500 |",
    "| s | GRPO_lr1e-05_seed0 | 2 of 2 | - | - | - | - | - | 0.700 -> 0.600 |",
  ]


def test_the_hybrid_minus_grpo_is_read_seed_by_seed_from_the_summarys_runs():
  """Test Pass@1 by seed written out by hand: GRPO 0.2 0.1 0.3 and the hybrid 0.4 0.5 0.2 on seeds 0-2: hybrid minus
  GRPO +0.2 +0.4 -0.1, mean 1/6, sd 0.2517, half-width t(0.975, 2) 4.3027 x 0.2517 / sqrt(3) = 0.625. DistIL's
  missing seed 2 does not drop it; a seed the hybrid lacks is left out; no table without both methods."""
  tests = {"GRPO": {0: 0.2, 1: 0.1, 2: 0.3}, "DistIL+GRPO": {0: 0.4, 1: 0.5, 2: 0.2}, "DistIL": {0: 0.5, 1: 0.6}}
  runs = [{"method": m, "seed": s, "test": {"eval/pass@1": v}} for m, by in tests.items() for s, v in by.items()]
  d = report.between(runs, "DistIL+GRPO", "GRPO", ["pass@1"])["pass@1"]
  assert d["seeds"] == [0, 1, 2] and d["sign_test"]["positive"] == 2
  np.testing.assert_allclose(d["diffs"], [0.2, 0.4, -0.1], atol=1e-12)
  ci = lambda values: stats.mean_ci(values)
  row = {"chosen_lr": 1e-5, "validation_pass@1": {"1e-05": 0.5}, "validation_pass@1_start": ci([0.1, 0.1, 0.1])}
  row |= {"test": {"pass@1": ci([0.5, 0.6])}, "sampled_tokens_mean": 1000.0, "wall_seconds_mean": 60.0}
  summary = {"table": {m: row for m in tests}, "runs": runs}
  text = report.tables(summary)
  assert "| DistIL+GRPO minus GRPO | pass@1: mean [95% CI]; per seed; sign test |" in text
  assert "| DistIL+GRPO | +0.167 [-0.458, +0.792]; +0.200 +0.400 -0.100; 2/3 up, p=1 |" in text
  assert "minus GRPO" not in report.tables({"table": {"DistIL": row, "GRPO": row}, "runs": runs})
  runs = [r for r in runs if not (r["method"] == "DistIL+GRPO" and r["seed"] == 2)]
  assert report.between(runs, "DistIL+GRPO", "GRPO", ["pass@1"])["pass@1"]["seeds"] == [0, 1]


def test_curves_table_lists_each_iterations_reward_and_length_against_the_cap(tmp_path):
  """Rows written out by hand from hand-written curves: validation-only lines (iteration 0) are skipped, a run that
  never trained (the start) has no row, and the cap is the run's own `sampling.max_new_tokens`."""
  runs = {
    "GRPO_lr3e-05_seed1": ([(0.0469, 63.06), (0.0, 95.2)], 96),
    "SFT_lr3e-05_seed0": ([(0.125, 12.5)], 48),
    "start_seed0": ([], 96),
  }
  for run, (curve, cap) in runs.items():
    folder = tmp_path / "smollm2_sibling" / run
    folder.mkdir(parents=True)
    (folder / "eval.jsonl").write_text("{}\n")
    (folder / "config.json").write_text(json.dumps({"sampling": {"max_new_tokens": cap}}))
    rows = [{"iteration": 0, "eval/pass@1": 0.1}]
    rows += [{"iteration": i + 1, "rollout/reward": r, "rollout/length": n} for i, (r, n) in enumerate(curve)]
    if run.startswith("SFT"):  # a run that logs the share cut at the cap
      rows[1]["rollout/cut"] = 0.25
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
  assert report.curves_table(str(tmp_path)).splitlines()[2:] == [
    "| smollm2_sibling | GRPO_lr3e-05_seed1 | 0.05 0.00 | 63 95 | 96 | - |",
    "| smollm2_sibling | SFT_lr3e-05_seed0 | 0.12 | 12 | 48 | 0.25 |",
  ]


def test_answer_forms_separate_a_wrong_answer_from_no_answer():
  """Counted by hand: the grader reads the last answer written in the run's formats; prose with the right number but
  no cue has no answer, and a form the run's config leaves out does not count as one."""
  samples = [
    {"iteration": 0, "response": "1 + 8 = 9. The answer is 9.", "correct": True},
    {"iteration": 0, "response": "So there are 7 books in total.", "correct": False},
    {"iteration": 0, "response": "#### 5", "correct": False},
    {"iteration": 10, "response": "\\boxed{9}", "correct": True},
    {"iteration": 10, "response": "It is \\boxed{} with 7", "correct": False},  # an empty box is no answer
    {"iteration": 10, "response": "Answer: 4", "correct": False},
    {"iteration": 10, "response": "Answer: 4 \\boxed{5}", "correct": False},
  ]
  assert report.answer_forms(samples, math_task.FORMATS) == {0: (1, 1, 1, None), 10: (1, 2, 1, None)}
  assert report.answer_forms(samples, ["boxed", "the answer is"]) == {0: (1, 0, 2, None), 10: (1, 1, 2, None)}
  for row, stopped in zip(samples, (True, False, False, True, False, False, True), strict=True):  # since 'stopped'
    row["stopped"] = stopped
  assert report.answer_forms(samples, math_task.FORMATS) == {0: (1, 1, 1, 1), 10: (1, 2, 1, 1)}  # a wrong one cut: 0


def test_a_constant_answer_scores_its_frequency_under_the_graders_equivalence():
  """Hand-counted on five problems: '1/2' and '0.5' are one value to the grader, so each scores 2 of 5, as does '10';
  all three tie as the best constant; no answer scores nothing."""
  problems = [Problem(f"q{i}", a) for i, a in enumerate(["10", "10", "8", "1/2", "0.5"])]
  assert report.constant_pass(problems, "10") == report.constant_pass(problems, "0.50") == 0.4
  assert report.constant_pass(problems, "8") == 0.2 and report.constant_pass(problems, None) == 0.0
  assert report.best_constants(problems) == (["10", "1/2", "0.5"], 0.4)


def test_a_tagged_rerun_trains_every_run_again_beside_the_first_records(tmp_path, monkeypatch):
  """`--tag`: the setting's runs again under other code (a mended grader gives the same configs other rewards). With
  every run of the setting recorded, the tagged invocation still launches all of them, the same commands in
  workdirs, records and a summary named `<setting>-<tag>`; the first records stay byte for byte; run again, it reads
  its own runs back; the report tests a tagged setting's runs on its preset's test prompts. A tag that could not
  name a folder is refused before any run."""
  calls = []
  monkeypatch.setattr(processes, "main_process", _fake_real_main(calls))
  argv = ["cmp", "--task", "smollm2", "--smoke", "--seeds", "0", "--lrs", "1e-4", "3e-4", "--methods", "GRPO"]
  argv += ["--out", str(tmp_path), "--workdir", str(tmp_path / "runs"), "--record", str(tmp_path / "record")]
  monkeypatch.setattr("sys.argv", argv)
  arith_comparison.main()
  files = lambda: {p: p.read_bytes() for p in (tmp_path / "record/smollm2_sibling").rglob("*") if p.is_file()}
  first, untagged = files(), list(calls)
  calls.clear()
  monkeypatch.setattr("sys.argv", [*argv, "--tag", "mended"])
  arith_comparison.main()
  tagged = lambda a: a.replace("/smollm2_sibling/", "/smollm2_sibling-mended/")
  assert calls == [[tagged(f) for f in a] for a in untagged] and len(calls) == 8  # the start, 3 rates: each tested
  assert files() == first
  recorded = lambda name: sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*"))
  assert recorded("record/smollm2_sibling-mended") == recorded("record/smollm2_sibling")
  assert json.loads((tmp_path / "smollm2_sibling-mended.json").read_text())["protocol"]["tag"] == "mended"
  calls.clear()
  arith_comparison.main()
  assert calls == []
  config = json.loads((tmp_path / "record/smollm2_sibling-mended/GRPO_lr0.001_seed0/config.json").read_text())
  assert report._test_prompts("smollm2_sibling-mended", config) == 64 != config["eval"]["num_prompts"]
  monkeypatch.setattr("sys.argv", [*argv, "--tag", "../x"])
  with pytest.raises(SystemExit):
    arith_comparison.main()
  assert calls == [] and not (tmp_path / "x").exists()


def test_constants_table_reads_a_collapsed_run_against_the_prompts_it_was_tested_on(tmp_path):
  """A run whose last validation says 10 in two of four responses (one more answers 7, one has no answer): its
  commonest answer is 10 at 0.50, scored as a constant on the first 32 validation and the first 64 test prompts of
  its task (64: the SmolLM2 protocol's test size, `REAL_FINAL`), counted here by plain string match, as is each
  split's best constant; a setting no protocol names is tested on its own `eval.num_prompts`. A tie goes to the
  answer written first ("10.0" is not "10" there), and a run with no answer scores nothing."""
  config = load_config("math", "smollm2_reference").to_dict()
  task = tasks.make_task(load_config("math", "smollm2_reference").task)
  validation, test = (evaluate.held_out(task, split) for split in ("validation", "test"))
  count = lambda problems, answer: sum(p.answer == answer for p in problems) / len(problems)
  runs = {
    "DistIL_lr1e-06_seed0": ["The answer is 10.", "So \\boxed{10}", "There are some.", "The answer is 7."],
    "OPSD_lr1e-06_seed0": ["The answer is 8.", "The answer is 10.", "The answer is 10.0.", "No idea."],
    "SDPO_lr1e-06_seed0": ["There are some.", "None."],
  }
  for setting in ("smollm2_reference", "elsewhere"):
    for run, last in runs.items() if setting == "smollm2_reference" else list(runs.items())[:1]:
      folder = tmp_path / setting / run
      folder.mkdir(parents=True)
      (folder / "config.json").write_text(json.dumps(config))
      (folder / "eval.jsonl").write_text(json.dumps({"eval/pass@1": 0.25}) + "\n")
      rows = [{"iteration": 0, "response": "The answer is 3."}] + [{"iteration": 10, "response": r} for r in last]
      (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  lines = report.constants_table(str(tmp_path)).splitlines()[2:]
  n = config["eval"]["num_prompts"]
  assert (n, comparison_tasks.REAL_FINAL["num_prompts"]) == (32, 64)
  scored = lambda answer, tested: f"{count(validation[:n], answer):.3f} / {count(test[:tested], answer):.3f}"
  for setting, tested, at in (("elsewhere", n, 0), ("smollm2_reference", 64, 2)):
    best = []
    for problems in (validation[:n], test[:tested]):
      scores = {a: count(problems, a) for a in dict.fromkeys(p.answer for p in problems)}
      best.append(([a for a, x in scores.items() if x == max(scores.values())], max(scores.values())))
    (val_best, val_pass), (test_best, test_pass) = best
    answers = f"val. {', '.join(val_best)}; test {', '.join(test_best)}"
    assert lines[at] == f"| {setting} | best constant | {answers} | {val_pass:.3f} / {test_pass:.3f} | - |"
    assert lines[at + 1] == f"| {setting} | DistIL_lr1e-06_seed0 | 10 (0.50) | {scored('10', tested)} | 0.250 |"
  assert lines[4] == f"| smollm2_reference | OPSD_lr1e-06_seed0 | 8 (0.25) | {scored('8', 64)} | 0.250 |"
  assert lines[5] == "| smollm2_reference | SDPO_lr1e-06_seed0 | - (0.00) | 0.000 / 0.000 | 0.250 |"
  assert len(lines) == 6


def test_answers_table_regrades_logged_responses_and_reads_the_value_in_any_form(tmp_path):
  """Three validation prompts of the real preset, their verdicts stored as a grader that read the first number after
  the cue gave them: at the start, 'The answer is a + 8 = a+8.' (stored correct; it states a+8: graded now, wrong,
  and its last number is not a), a right value with no cue (stored wrong; right value, no answer), a plain right
  answer; at the end, a boxed right answer, no number at all, and 'The answer is a-1 + 1 = a.' (stored wrong, now
  right). Counted by hand: right value 2 -> 2, graded now 1 -> 2."""
  config = load_config("math", "smollm2_sibling").to_dict()
  problems = evaluate.held_out(tasks.make_task(load_config("math", "smollm2_sibling").task), "validation")[:3]
  a = [int(p.answer) for p in problems]
  responses = {
    0: [(f"The answer is {a[0]} + 8 = {a[0] + 8}.", True), (f"So {a[1] - 1} + 1 = {a[1]} shells.", False),
        (f"The answer is {a[2]}.", True)],
    10: [(f"\\boxed{{{a[0]}}}", True), ("I do not know.", False), (f"The answer is {a[2] - 1} + 1 = {a[2]}.", False)],
  }  # fmt: skip
  folder = tmp_path / "smollm2_sibling" / "DistIL_lr3e-06_seed0"
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(config))
  (folder / "eval.jsonl").write_text("{}\n")
  rows = [
    {"iteration": it, "question": p.prompt, "answer": p.answer, "response": text, "correct": correct}
    for it, said in responses.items()
    for p, (text, correct) in zip(problems, said, strict=True)
  ]
  (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  line = report.answers_table(str(tmp_path)).splitlines()[2]
  assert line == "| smollm2_sibling | DistIL_lr3e-06_seed0 | 3 | 2 / 0 / 1 | 1 / 1 / 1 | 2 -> 2 | 1 -> 2 |"


def test_runs_table_grades_a_runs_kept_test_responses_again(tmp_path):
  """A run tested on the real preset's first 64 test prompts, 2 responses kept per position with the verdicts a
  grader that read the first number after the cue gave them: position 0, 'The answer is a-1 + 1 = a.' twice (stored
  wrong, right now); position 1, a plain right answer and 'The answer is b + 8 = b+8.' (stored right, wrong now); of
  two positions that hold the same question, the first two right answers, the second none; every other position
  none. By hand, per position then averaged (as the reported figure is): Pass@1 = (1 + 1/2 + 1) / 64 = 0.039, Pass@2
  = 3 / 64 = 0.047 (grouped by question text, the repeated pair would read 2 of 4); Pass@4 needs 4 responses a
  position: none shown. An earlier test's rows and a later validation's are not read. A run that kept no test
  responses, or kept them for 63 of the 64 positions, shows its reported figures alone."""
  config = load_config("math", "smollm2_sibling").to_dict()
  problems = evaluate.held_out(tasks.make_task(load_config("math", "smollm2_sibling").task), "test")[:64]
  texts = [p.prompt for p in problems]
  j, k = next((j, k) for j in range(2, 64) for k in range(j + 1, 64) if texts[j] == texts[k])
  a, b, c = (int(problems[i].answer) for i in (0, 1, j))
  kept = {i: [("I do not know.", False)] * 2 for i in range(64)}
  kept[0] = [(f"The answer is {a - 1} + 1 = {a}.", False)] * 2
  kept[1] = [(f"The answer is {b}.", True), (f"The answer is {b} + 8 = {b + 8}.", True)]
  kept[j] = [(f"The answer is {c}.", True)] * 2
  row = lambda it, split, i, r, ok: {"iteration": it, "split": split, "prompt_index": i, "question": texts[i],
                                     "response": r, "correct": ok}  # fmt: skip
  earlier = [row(0, "test", i, f"The answer is {p.answer}.", True) for i, p in enumerate(problems) for _ in "ab"]
  test = [row(2, "test", i, r, ok) for i, said in kept.items() for r, ok in said]
  later = [row(2, "validation", i, f"The answer is {p.answer}.", True) for i, p in enumerate(problems)]
  for run in ("GRPO_lr3e-05_seed0", "OPSD_lr3e-05_seed0", "SFT_lr3e-05_seed0"):
    folder = tmp_path / "smollm2_sibling-mended" / run
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text(json.dumps({"iteration": 0}) + "\n" + json.dumps({"iteration": 2}) + "\n")
    (folder / "wall_seconds.json").write_text("60.0")
    reported = {"iteration": 2, "eval/pass@1": 0.25, "eval/pass@2": 0.5, "eval/pass@4": 0.75}
    (folder / "eval.jsonl").write_text(json.dumps(reported) + "\n")
    rows = earlier + (test if run.startswith("GRPO") else test[:-2]) + later
    if not run.startswith("SFT"):
      (folder / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  lines = report.runs_table(str(tmp_path), ks=("pass@1", "pass@2", "pass@4")).splitlines()
  assert "| test pass@1 (graded now) | test pass@2 (graded now) | test pass@4 (graded now) |" in lines[0]
  assert "| 0.250 (0.039) | 0.500 (0.047) | 0.750 | - | 1 min |" in lines[2]
  assert "| 0.250 | 0.500 | 0.750 | - | 1 min |" in lines[3] and "| 0.250 | 0.500 | 0.750 | - | 1 min |" in lines[4]


def test_answers_by_rate_sum_the_seeds_and_keep_a_cut_count_only_where_every_seed_says_it(tmp_path):
  """Two seeds of one method and rate, one whose rows say `stopped` and one whose rows predate it, and a run of
  another rate: counts written out by hand."""
  right, wrong, none = "The answer is 9.", "The answer is 7.", "So there are some."
  runs = {
    "DistIL_lr3e-06_seed0": [(0, right, True), (0, none, False), (10, none, True), (10, none, False)],
    "DistIL_lr3e-06_seed1": [(0, wrong, None), (0, none, None), (10, right, None), (10, wrong, None)],
    "DistIL_lr1e-05_seed0": [(0, wrong, True), (10, none, False)],
  }
  for run, rows in runs.items():
    folder = tmp_path / "smollm2_sibling" / run
    folder.mkdir(parents=True)
    (folder / "eval.jsonl").write_text("{}\n")
    (folder / "config.json").write_text(json.dumps({"task": {"name": "math"}}))
    samples = [{"iteration": i, "response": r, "correct": r == right} for i, r, _ in rows]
    for row, (*_, stopped) in zip(samples, rows, strict=True):
      if stopped is not None:
        row["stopped"] = stopped
    (folder / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
  assert report.answers_by_rate_table(str(tmp_path)).splitlines()[2:] == [
    "| smollm2_sibling | DistIL_lr1e-05 | 1 | 1 | 0 / 1 / 0 (0 cut) | 0 / 0 / 1 (1 cut) | - | - |",
    "| smollm2_sibling | DistIL_lr3e-06 | 2 | 4 | 1 / 1 / 2 | 1 / 1 / 2 | - | - |",
  ]


def test_cost_table_groups_a_methods_rates_and_seeds_and_takes_medians(tmp_path):
  """Three runs of one method (two rates, two seeds), a variant, another setting's run and the start, medians and
  sums worked out by hand; for DistIL: iterations 10, 20, 30, 40, 400 s -> median 30; runs 600, 900, 3300 s ->
  median 15 min, range 10-55 min, 4800 s = 1.3 h. A folder without eval.jsonl is no record yet."""
  runs = {
    "DistIL_lr3e-06_seed0": (600, [10, 20]),
    "DistIL_lr3e-06_seed1": (900, [30]),
    "DistIL_lr1e-05_seed0": (3300, [40, 400]),
    "start_seed0": (60, []),
    "DistIL_held_terminal_lr0.0001_seed0": (120, [5]),  # a variant: its own method, whatever its rate's form
    "hard/GRPO_lr3e-05_seed0": (1200, [100]),  # another setting: its own row
  }
  for run, (wall, its) in runs.items():
    folder = tmp_path / (run if "/" in run else f"smollm2_sibling/{run}")
    folder.mkdir(parents=True)
    (folder / "eval.jsonl").write_text("{}\n")
    (folder / "wall_seconds.json").write_text(json.dumps(wall))
    rows = [{"iteration": 0}] + [{"iteration": i + 1, "time/iteration_s": t} for i, t in enumerate(its)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
  (tmp_path / "smollm2_sibling" / "DistIL_lr3e-05_seed0").mkdir()  # no eval.jsonl: not a whole record yet
  assert report.cost_table(str(tmp_path)).splitlines()[2:] == [
    "| hard | GRPO | 1 | 100 [100, 100] | 20 [20, 20] | 0.3 |",
    "| smollm2_sibling | DistIL_held_terminal | 1 | 5 [5, 5] | 2 [2, 2] | 0.0 |",  # sorts before DistIL_lr...
    "| smollm2_sibling | DistIL | 3 | 30 [10, 400] | 15 [10, 55] | 1.3 |",
    "| smollm2_sibling | start | 1 | - | 1 [1, 1] | 0.0 |",
  ]


def test_teacher_table_rows_from_teacher_quality_figures():
  """Rows written out by hand from a teacher-quality file's keys; a group with no response (student None) and the
  continuation figures a file predates are left out."""
  ci = lambda mean, lo, hi, n: {"n": n, "mean": mean, "ci": [lo, hi]}
  out = {
    "at_student_states/states": 12,
    "at_student_states/student_pass": 0.25,
    "at_student_states/teacher_pass": 0.5,
    "at_student_states/teacher_minus_student": ci(0.2, -0.1, 0.5, 3),
    "stopping/stopped_without_answer/responses": 0,
    "stopping/stopped_without_answer/student": None,
    "stopping/going_on/responses": 12,
    "stopping/going_on/student": 0.01,
    "stopping/going_on/teacher": 0.002,
    "stopping/going_on/teacher_minus_student": ci(-0.008, -0.01, -0.006, 3),
  }
  assert report.teacher_table(out).splitlines()[2:] == [
    "| continuing from one state of each: finished correctly | 12 | 0.250 | 0.500 | +0.200 [-0.100, +0.500] (3) |",
    "| probability of stopping: going on | 12 | 0.0100 | 0.0020 | -0.0080 [-0.0100, -0.0060] (3) |",
  ]


def test_summary_start_is_the_selection_seeds_and_differences_pair_by_seed():
  """Runs score 0.3 and 0.5 on seeds 0 and 1, the start 0.1 and 0.4: minus the start is +0.2 and +0.1 seed by seed;
  `start` is the selection seed's test (seed 1 here), not the first seed's."""

  def run(seed, p):
    metrics = [{"eval/pass@1": 0.0, "samples/train_tokens": 0}]
    return {"method": "DistIL", "seed": seed, "test": {"eval/pass@1": p}, "wall_seconds": 1.0, "metrics": metrics}

  starts = {s: {"seed": s, "test": {"eval/pass@1": p}, "test_command": f"start {s}"} for s, p in ((0, 0.1), (1, 0.4))}
  summary = arith_comparison.summarize({"DistIL": {}}, [run(0, 0.3), run(1, 0.5)], starts=starts, select_seed=1)
  assert summary["start"] == {"seed": 1, "test": {"eval/pass@1": 0.4}, "test_command": "start 1"}
  np.testing.assert_allclose(summary["minus_start"]["DistIL"]["pass@1"]["diffs"], [0.2, 0.1], atol=1e-12)
  alone = arith_comparison.summarize({"DistIL": {}}, [run(0, 0.3)], starts={0: starts[0]}, select_seed=1)
  assert alone["start"]["seed"] == 0  # the selection seed's start missing: the first one


def test_a_rate_chosen_at_the_grid_edge_is_checked_one_step_beyond():
  """Along the 1-3-10 ladder where the grid steps along it; otherwise one more of the grid's own ratio; inside the
  grid, nothing."""
  smollm2, arith = (3e-6, 1e-5, 3e-5), (1e-4, 3e-4, 1e-3)
  cases = [(smollm2, 3e-6, 1e-6), (smollm2, 3e-5, 1e-4), (smollm2, 1e-5, None), (arith, 1e-4, 3e-5)]
  cases += [(arith, 1e-3, 3e-3), ((2e-4, 4e-4, 8e-4), 2e-4, 1e-4), ((2e-4, 4e-4, 8e-4), 8e-4, 1.6e-3)]
  decades = (1e-5, 1e-4, 1e-3)  # on the ladder's values but not its steps: the grid's own ratio
  cases += [
    (decades, 1e-3, 1e-2),
    (decades, 1e-5, 1e-6),
    ((1e-4, 2e-4, 4e-4), 1e-4, 5e-5),
    ((3e-6, 3e-5, 3e-4), 3e-4, 3e-3),
  ]
  assert [arith_comparison.beyond_edge(lrs, lr) for lrs, lr, _ in cases] == [want for *_, want in cases]


@pytest.mark.parametrize("expert", list(comparison_tasks.REAL_SETTINGS))
def test_every_real_model_command_passes_validation(expert, tmp_path):
  """The full-size commands of every method in every real-model setting (the checkpoint's shape is not read)."""
  cmp = arith_comparison.Comparison(expert, str(tmp_path), task="smollm2")
  assert not cmp.warm and cmp.iterations == cmp.config.train.iterations
  for method in comparison_tasks.REAL_METHODS:
    _, wd, cmd = cmp.command(method, 0, 1e-5)
    flags = [f for f in cmd if f.startswith("--config.")]
    preset = next(a for a in cmd if a.startswith("--config=")).split(":")[1]
    validate.config(_with_flags(load_config("math", preset), flags), devices=1, processes=1)
    if method in ("GRPO", "SFT"):
      assert preset == comparison_tasks.REAL_SETTINGS[cmp.shared]


def test_gradient_part_statistics_by_hand():
  """Rows (1, 0), (3, 0): mean (2, 0); variance ((1)^2 + (1)^2) / 1 = 2; |E g|^2 estimate 4 - 2 / 2 = 3."""
  s = gradient_variance.part_stats(np.array([[1.0, 0.0], [3.0, 0.0]]))
  assert (s["mean_norm"], s["variance"], s["signal"], s["signal_to_noise"]) == (2.0, 2.0, 3.0, 1.5)


def test_stop_probability_against_a_plain_forward_and_the_samplers_draws(tmp_path):
  """teacher_quality's probability of ending the turn at each response position (left-padded prompts, the update's
  `response_hidden`) against the model called on each unpadded prompt + response, softmax(logits / 0.7) over the
  tokenizer's ids, and, where a response stopped, against the sampler's own log-probability of the stop it drew
  (its cached decode). A random 1-layer model with the math task's tokenizer (one stop id), the sibling preset's
  T = 0.7; float32, 2e-6 apart."""
  config = _with_flags(load_config("math", "smollm2_sibling"), comparison_tasks.REAL_SMOKE)
  run = build.Run.build(config, str(tmp_path))
  temperature, (stop,) = config.sampling.temperature, run.tok.stop_ids
  problems = evaluate.held_out(run.task, "validation")[:4]
  with sharding.use(run.mesh, run.rules):
    r = rollout.rollout(
      run.graphdef, run.params, problems, jax.random.key(0), tok=run.tok, add_bos=config.tokenizer.add_bos,
      task=run.task, mesh=run.mesh, samples_per_prompt=4,
      sampling_cfg=rollout.sampling_config(config.sampling, run.tok),
    )  # fmt: skip
    prompts = [run.tok.prompt_ids(p.prompt, config.tokenizer.add_bos) for p in problems for _ in range(4)]
    responses, lengths = r.tokens.reshape(16, -1), r.mask.reshape(16, -1).sum(1)
    got = teacher_quality.stop_probability(run, run.params, prompts, responses, temperature, chunk=6)
  model = nnx.merge(run.graphdef, run.params)

  def want(i, stop_ids):  # the unpadded forward: log-probabilities of every id at each response position
    z = np.asarray(model(np.array([prompts[i] + list(responses[i])]))[0, len(prompts[i]) - 1 : -1])
    z = z[: lengths[i], : run.tok.vocab_size] / temperature
    return np.exp(jax.nn.logsumexp(z[:, list(stop_ids)], -1) - jax.nn.logsumexp(z, -1))

  for i in range(16):
    np.testing.assert_allclose(got[i, : lengths[i]], want(i, [stop]), atol=2e-6)
  stopped = [i for i in range(16) if responses[i, lengths[i] - 1] == stop]
  assert stopped  # this draw ends 2 of the 16 responses within their 16 tokens
  for i in stopped:
    np.testing.assert_allclose(got[i, lengths[i] - 1], np.exp(r.logprobs.reshape(16, -1)[i, lengths[i] - 1]), atol=2e-6)
  run.tok.__dict__["stop_ids"] = (stop, 7)  # a second stop id (a template's end of turn): their mass is summed
  with sharding.use(run.mesh, run.rules):
    both = teacher_quality.stop_probability(run, run.params, prompts[:2], responses[:2], temperature, chunk=2)
  for i in range(2):
    np.testing.assert_allclose(both[i, : lengths[i]], want(i, [stop, 7]), atol=2e-6)


def test_stop_figures_by_hand():
  """Three responses of a 4-token horizon, the probabilities written so that each state is recognisable: the student's
  at position t is t / 10 + row / 100, the teacher's half of it. Row 0 (prompt 0) stopped at its 3rd token with an
  answer, row 1 (prompt 0) stopped at its 2nd without one, row 2 (prompt 1) was cut at the horizon. Going on: rows 0
  and 1 before their stop (positions 0-1, and 0), row 2 at all 4 positions."""
  student = np.arange(4)[None, :] / 10 + np.arange(3)[:, None] / 100
  got = teacher_quality.stop_figures(
    np.array([0, 0, 1]), np.array([3, 2, 4]), np.array([True, True, False]), np.array([True, False, False]),
    student, student / 2,
  )  # fmt: skip
  assert got["stopping/stopped_with_answer/responses"] == 1 and math.isclose(
    got["stopping/stopped_with_answer/student"], 0.2
  )
  assert math.isclose(got["stopping/stopped_without_answer/student"], 0.11)
  assert math.isclose(got["stopping/stopped_without_answer/teacher_minus_student"]["mean"], -0.055)
  going_on = [0.05, 0.01, 0.17]  # row means: (0 + 0.1) / 2, 0.01, (0.02 + 0.12 + 0.22 + 0.32) / 4
  assert got["stopping/going_on/responses"] == 3 and math.isclose(got["stopping/going_on/student"], np.mean(going_on))
  diffs = [-(0.05 + 0.01) / 2 / 2, -0.17 / 2]  # per prompt: its rows' mean, teacher (half) minus student
  assert math.isclose(got["stopping/going_on/teacher_minus_student"]["mean"], np.mean(diffs))
  assert "stopping/stopped/responses" not in got
  plain = teacher_quality.stop_figures(np.array([0]), np.array([2]), np.array([True]), None, student[:1], student[:1])
  assert plain["stopping/stopped/responses"] == 1 and math.isclose(plain["stopping/stopped/student"], 0.1)


def test_stopping_figures_average_within_each_prompt_first():
  """Prompt 0 holds two responses, prompt 1 one; the third's figures are left out. Pooled means over the kept
  responses; the difference per prompt (teacher minus student): prompt 0 (0.2 + 0.2) / 2 - (0.1 + 0.3) / 2 = 0,
  prompt 1 0.9 - 0.5 = 0.4, mean 0.2."""
  got = teacher_quality._by_prompt(
    np.array([0, 0, 1, 1]), np.array([True, True, True, False]), np.array([0.1, 0.3, 0.5, 9.0]),
    np.array([0.2, 0.2, 0.9, 9.0]),
  )  # fmt: skip
  assert got["responses"] == 3 and math.isclose(got["student"], 0.3) and math.isclose(got["teacher"], 1.3 / 3)
  assert got["teacher_minus_student"]["n"] == 2 and math.isclose(got["teacher_minus_student"]["mean"], 0.2)


# -- The scripts end to end on tiny settings ---------------------------------------------------------------------------


def _with_flags(config, flags):
  """`config` with `--config.a.b=value` flags applied as the command line applies them (a value that is not a
  Python literal is a string: "self", "oracle", "any")."""
  for flag in flags:
    key, value = flag.removeprefix("--config.").split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    config.update_from_flattened_dict({key: value})
  return config


def _smoke_config(preset):
  return _with_flags(load_config("arith", preset), comparison_tasks.SMOKE)


@pytest.mark.slow
def test_scripts_smoke_privileged_feedback(tmp_path, monkeypatch):
  """The protocol on tiny settings with the reference-feedback self expert (behaviour cloning with re-prompts, a DistIL
  run whose teacher reads the reference, the test evaluation), then the teacher-quality check on the behaviour-cloned
  start and the gradient-variance measurement on the run."""
  argv = ["cmp", "--smoke", "--expert", "self_reference", "--seeds", "0", "--lrs", "1e-3", "--methods", "DistIL"]
  monkeypatch.setattr("sys.argv", [*argv, "--out", str(tmp_path), "--workdir", str(tmp_path / "runs")])
  arith_comparison.main()
  out = json.loads((tmp_path / "arith_self_reference.json").read_text())
  run = out["runs"][0]
  assert "--config.expert.kind=self" in run["command"] and 0 <= run["test"]["eval/pass@1"] <= 1
  assert run["metrics"][-1]["rollout/feedback_valid"] > 0  # the reference labels responses, right or wrong
  warm = tmp_path / "runs" / "self_reference" / "warmup_seed0"
  cmd = [sys.executable, "-m", "experiments.teacher_quality", "--config=configs/arith.py:compare_self_reference"]
  cmd += [*comparison_tasks.SMOKE, f"--workdir={warm}", f"--out={tmp_path / 'tq.json'}", "--samples=4", "--chunk=16"]
  subprocess.run(cmd, check=True, cwd=ROOT, env=child_env(), capture_output=True)
  tq = json.loads((tmp_path / "tq.json").read_text())
  assert tq["prompts"] == 4 and tq["at_student_states/feedback"] == "reference"
  assert all(0 <= v <= 1 for k, v in tq.items() if k.endswith(("pass@1", "_pass")))
  assert isinstance(tq["teacher_better_at_student_states"], bool)
  assert tq["stopping/going_on/responses"] > 0 and "stopping/stopped/responses" in tq  # arith: no answer split
  assert all(0 <= tq[f"stopping/going_on/{who}"] <= 1 for who in ("student", "teacher"))
  config = _smoke_config("compare_self_reference")
  most = config.sampling.max_new_tokens
  for who in ("student", "teacher"):  # cut where a training response would be: the prefix and what follows it
    assert 0 <= tq["at_student_states/prefix_tokens"] + tq[f"at_student_states/{who}_tokens"] <= most
    assert 0 <= tq[f"at_student_states/{who}_stopped"] <= 1
  config.update_from_flattened_dict({"expert.kind": "self", "mesh.num_devices": 1})
  figures = gradient_variance.measure(config, run["workdir"], minibatches=2)
  assert sorted(figures) == [1, 2]  # every kept checkpoint (smoke: one per iteration, two kept)
  for f in figures.values():
    assert f["local"]["variance"] > 0 and f["score"]["variance"] > 0 and -1 <= f["cosine_local_score"] <= 1
  jax.clear_caches()


def test_a_second_signal_while_stopping_does_not_hang_the_orchestrator(tmp_path):
  """The orchestrator itself (its CLI) over a stub run that takes a second to stop: a second SIGTERM while the first
  is waiting for the run changes nothing, and the orchestrator exits once the run has. A handler that ran again
  inside its own `Popen.wait` would block on that wait's lock, which is not reentrant, for good."""
  stub = tmp_path / "run"
  stub.write_text(
    f"#!{sys.executable}\n"
    "import os, signal, sys, time\n"
    "d = os.environ['STUB_DIR']\n"
    "def stop(*_):\n"
    "  open(os.path.join(d, 'signalled'), 'a').write('TERM\\n')\n"
    "  time.sleep(1.0)\n"
    "  sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "open(os.path.join(d, 'started'), 'w').close()\n"
    "while True:\n"
    "  time.sleep(0.05)\n"
  )
  stub.chmod(0o755)
  argv = ["arith_comparison", "--task", "arith", "--smoke", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path)]
  driver = (
    f"import runpy, sys; sys.executable = {str(stub)!r}; sys.argv = {argv!r}; "
    "runpy.run_module('experiments.arith_comparison', run_name='__main__')"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", driver], cwd=ROOT, env=child_env(STUB_DIR=str(tmp_path), PYTHONPATH=ROOT),
    stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    wait_for_file(tmp_path / "started", proc)
    proc.send_signal(signal.SIGTERM)
    wait_for_file(tmp_path / "signalled", proc)
    time.sleep(0.3)  # the handler is now inside the run's wait
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert (tmp_path / "signalled").read_text() == "TERM\n"  # the run got the signal once: it stopped at its safe point
  assert "already stopping" in err
