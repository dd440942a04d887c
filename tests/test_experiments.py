"""The evidence experiments: signs of the bandit claim, the credit-assignment claim, and smoke runs of the scripts."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from run_helpers import ROOT

from experiments import bandit, credit_assignment


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


def test_comparison_script_smoke(tmp_path, monkeypatch):
  """The arith comparison end to end on tiny settings, one method: warm-up, run from it, Pass@N sweep, plots."""
  from experiments import arith_comparison

  argv = [
    "cmp",
    "--smoke",
    "--seeds",
    "0",
    "--methods",
    "DistIL",
    "--out",
    str(tmp_path),
    "--workdir",
    str(tmp_path / "runs"),
  ]
  monkeypatch.setattr("sys.argv", argv)
  arith_comparison.main()
  table = json.loads((tmp_path / "arith_oracle.json").read_text())["table"]
  assert set(table) == {"DistIL"} and 0 <= table["DistIL"]["pass@1_end_mean"] <= 1
  assert (tmp_path / "arith_oracle_curves.png").exists() and (tmp_path / "arith_oracle_passk.png").exists()
  # The self-expert diagnostic on that warm-up (same tiny model flags): four figures, each a probability.
  out = tmp_path / "teacher.json"
  cmd = [sys.executable, "-m", "experiments.teacher_quality", "--config=configs/arith.py:compare_self"]
  cmd += [*arith_comparison.SMOKE, f"--workdir={tmp_path / 'runs' / 'oracle' / 'warmup_seed0'}", f"--out={out}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run([*cmd, "--samples=2"], check=True, cwd=ROOT, env=env, capture_output=True)
  figures = json.loads(out.read_text())
  assert figures["prompts"] == 4 and all(0 <= v <= 1 for k, v in figures.items() if "pass@1" in k)
