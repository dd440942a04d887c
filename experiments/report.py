"""The README's tables, printed from a comparison's JSON, so every number there is regenerated, never retyped.

  python -m experiments.report experiments/results/arith_oracle.json
prints two markdown tables: per method the chosen rate, test Pass@1/8/32 (mean over seeds [95% t-interval]),
sampled tokens and wall time per run; then DistIL minus each baseline, seed by seed, with the sign test; the
DistIL+GRPO hybrid minus GRPO the same way (`PAIRS`); and where the start was tested on every seed, each method minus
the start, seed by seed.
  python -m experiments.report --runs experiments/results/smollm2_runs
prints every run recorded so far (`arith_comparison --record`), finished table or not: one row per run; then what
each run's training signal was made of (`signal_table`); then its training reward and response length by iteration
(`curves_table`); then how its validation responses failed, how many end on the right value in any form and how
many the grader passes as it now stands (`answers_table`),
and the same summed over each method and rate's seeds (`answers_by_rate_table`); then whether its commonest answer,
given to every prompt, would score as much (`constants_table`); then what each method's runs cost (`cost_table`).
  python -m experiments.report experiments/results/smollm2_sibling_teacher_start.json
prints `experiments.teacher_quality`'s figures at the student's states (`teacher_table`).
"""

import collections
import functools
import json
import os
import re
import statistics
import sys

import ml_collections

from distil_jax import evaluate, tasks
from distil_jax.tasks import math as math_task
from experiments import comparison_tasks, stats


def interval(ci: dict, fmt: str = ".3f") -> str:
  """`mean [lo, hi]`, or the mean alone when there is no interval (one seed); fmt "+.3f" for differences."""
  if ci["ci"] is None:
    return f"{ci['mean']:{fmt}}"
  return f"{ci['mean']:{fmt}} [{ci['ci'][0]:{fmt}}, {ci['ci'][1]:{fmt}}]"


def sign(test: dict) -> str:
  """`4/5 up, p=0.38`: positive differences over non-tied seeds and the two-sided exact p."""
  return f"{test['positive']}/{test['n']} up, p={test['p_two_sided']:.3g}"


def _row(cells) -> str:
  return "| " + " | ".join(cells) + " |"


def _head(cells) -> list:
  """A markdown table's first two lines."""
  return [_row(cells), "|---" * len(cells) + "|"]


def tables(summary: dict, ks=("pass@1", "pass@8", "pass@32")) -> str:
  table = summary["table"]
  ks = [k for k in ks if k in next(iter(table.values()))["test"]]
  head = ["method", "lr (val. Pass@1 per rate)", "val. Pass@1 start"] + [f"test {k}" for k in ks]
  lines = _head([*head, "sampled tokens", "wall per run"])
  for method, row in table.items():
    grid = ", ".join(f"{lr}: {v:.3f}" for lr, v in row["validation_pass@1"].items())
    edge = ", still at the edge" if row.get("at_edge") else ""  # the rate past the edge won too (`beyond_edge`)
    cells = [method, f"**{row['chosen_lr']:g}**{edge} ({grid})", interval(row["validation_pass@1_start"])]
    cells += [interval(row["test"][k]) for k in ks]
    cells += [f"{row['sampled_tokens_mean'] / 1e3:.0f}k", f"{row['wall_seconds_mean']:.0f} s"]
    lines.append(_row(cells))
  if "start" in summary:  # the checkpoint every run started from, tested as the runs are (on every seed, or one)
    by_seed = summary.get("start_by_seed", {str(summary["start"]["seed"]): summary["start"]["test"]})
    figures = [interval(stats.mean_ci([t["eval/" + k] for t in by_seed.values()])) for k in ks]
    lines.append(_row(["the start (no training)", "-", "-", *figures, "0", "-"]))
  paired = next((v for k, v in summary.items() if k.startswith("paired_")), {})
  lines += _paired_table("DistIL minus", paired, ks)
  for a, b in PAIRS:
    if a in table and b in table and "runs" in summary:
      lines += _paired_table(f"{a} minus {b}", {a: between(summary["runs"], a, b, ks)}, ks)
  lines += _paired_table("minus the start", summary.get("minus_start", {}), ks)
  return "\n".join(lines)


PAIRS = (("DistIL+GRPO", "GRPO"),)  # a rival set against another: the hybrid against the RLVR it adds DistIL to


def between(runs: list, a: str, b: str, ks) -> dict:
  """a minus b, seed by seed on the seeds both have, from the summary's runs at their chosen rates (each with its
  test): the comparison the protocol's `DistIL minus` table does not make."""
  by_seed = lambda method, k: {r["seed"]: r["test"][f"eval/{k}"] for r in runs if r["method"] == method}
  return {k: stats.paired(by_seed(a, k), by_seed(b, k)) for k in ks}


def _paired_table(title: str, by_method: dict, ks) -> list:
  """Seed-by-seed differences per method: mean [95% CI], each seed's, and the sign test; no lines when empty."""
  if not by_method:
    return []
  lines = ["", *_head([title, *(f"{k}: mean [95% CI]; per seed; sign test" for k in ks)])]
  for method, by_k in by_method.items():
    cells = [method]
    for k in ks:
      d = by_k[k]
      cells.append(f"{interval(d, '+.3f')}; {' '.join(f'{x:+.3f}' for x in d['diffs'])}; {sign(d['sign_test'])}")
    lines.append(_row(cells))
  return lines


def _figure(row: dict, key: str, fmt: str = ".3f") -> str:
  return f"{row[key]:{fmt}}" if key in row else "-"


def _read(path: str, lines: bool = False):
  with open(path) as f:
    return [json.loads(x) for x in f] if lines else f.read()


def _records(record: str):
  """(setting, run, folder) of every whole record under `record`, in order: a record is whole once its eval.jsonl is
  written (`arith_comparison.Comparison.keep` writes its other files before it)."""
  for setting in sorted(d for d in os.listdir(record) if os.path.isdir(os.path.join(record, d))):
    for run in sorted(os.listdir(os.path.join(record, setting))):
      folder = os.path.join(record, setting, run)
      if os.path.exists(os.path.join(folder, "eval.jsonl")):
        yield setting, run, folder


def tested_now(folder: str, setting: str, test: dict, ks) -> dict:
  """{k: test Pass@k} of the responses a run's test graded (`eval_samples.jsonl`: the rows of the test split at the
  checkpoint `test`, eval.jsonl's last line, reports), each graded again by its task as the grader now stands,
  averaged as `evaluate.summarize` averages them: over prompt positions (held-out prompts repeat), each position's
  responses together. Empty where the run kept no such rows (tested before 3d52d6a, or before rows named their
  prompt's position), or they do not cover every position the run was tested on once (a multi-process test keeps
  process 0's share); a k above the responses kept per position is left out. Why: a grader mended since the test
  (381c20a) would leave the reported figure standing on the old verdicts."""
  path = os.path.join(folder, "eval_samples.jsonl")
  if not os.path.exists(path):
    return {}
  rows = [r for r in _read(path, lines=True) if (r["iteration"], r["split"]) == (test.get("iteration"), "test")]
  config = json.loads(_read(f"{folder}/config.json"))
  task_json = json.dumps(config["task"], sort_keys=True)
  problems = _held_out(task_json, "test")[: _test_prompts(setting, config)]
  verdicts = {}
  for r in rows:
    position = r.get("prompt_index")
    if position not in range(len(problems)) or problems[position].prompt != r["question"]:
      return {}
    verdicts.setdefault(position, []).append(_task(task_json).verify(problems[position], r["response"]).correct)
  if len(verdicts) != len(problems):
    return {}
  fewest = min(len(v) for v in verdicts.values())
  mine = [int(k.split("@")[1]) for k in ks if int(k.split("@")[1]) <= fewest]
  return evaluate.summarize([verdicts[i] for i in range(len(problems))], mine)


def runs_table(record: str, ks=("pass@1", "pass@8")) -> str:
  """One row per recorded run: validation at the start and the end of training (T = 0.7 samples, and greedy), the
  test figures (in brackets, its kept test responses graded again as the grader now stands: `tested_now`), the mean
  labelled fraction of its rollouts (for GRPO and SFT, what a teacher would have labelled), its wall time and the
  commits its parts ran at. Folders without a whole record are left out."""
  head = ["setting", "run", "val. Pass@1", "val. Pass@4", "greedy acc.", "greedy length"]
  head += [f"test {k} (graded now)" for k in ks] + ["labelled", "wall", "commits"]
  lines = _head(head)
  for setting, run, folder in _records(record):
    curve, test = _read(f"{folder}/metrics.jsonl", lines=True), _read(f"{folder}/eval.jsonl", lines=True)[-1]
    start, end = curve[0], curve[-1]
    labelled = [m["rollout/feedback_valid"] for m in curve if "rollout/feedback_valid" in m]
    cells = [setting, run]
    cells += [
      f"{_figure(start, f'eval/{k}', f)} -> {_figure(end, f'eval/{k}', f)}"
      for k, f in (("pass@1", ".3f"), ("pass@4", ".3f"), ("greedy_accuracy", ".3f"), ("greedy_length", ".1f"))
    ]
    now = tested_now(folder, setting, test, ks)
    cells += [_figure(test, f"eval/{k}") + (f" ({now[k]:.3f})" if k in now and f"eval/{k}" in test else "") for k in ks]
    cells += [f"{sum(labelled) / len(labelled):.2f}" if labelled else "-"]
    cells += [f"{json.loads(_read(f'{folder}/wall_seconds.json')) / 60:.0f} min"]
    commits = _read(f"{folder}/commits").split() if os.path.exists(f"{folder}/commits") else []
    cells += [" ".join(dict.fromkeys(c[:7] for c in commits)) or "-"]
    lines.append(_row(cells))
  return "\n".join(lines)


def _spread(values, scale=1.0, fmt=".0f") -> str:
  """`median [min, max]` of values / scale."""
  v = sorted(x / scale for x in values)
  return f"{statistics.median(v):{fmt}} [{v[0]:{fmt}}, {v[-1]:{fmt}}]"


def cost_table(record: str) -> str:
  """What each method's recorded runs cost on the machines that ran them, per setting: the median [min, max] of one
  iteration (rollout, labels and updates; `time/iteration_s`) and of a whole run (`wall_seconds.json`: from loading
  to the last validation, the test evaluation not included), and their sum. A method is a run's name less its rate
  and seed. Why: the protocol's budget is read from these; a run restarted from its checkpoint counts its restart,
  which the medians see past."""
  groups = {}
  for setting, run, folder in _records(record):
    curve = _read(f"{folder}/metrics.jsonl", lines=True)
    its = [m["time/iteration_s"] for m in curve if "time/iteration_s" in m]
    runs, iterations = groups.setdefault((setting, re.sub(r"(_lr[^_]+)?_seed\d+$", "", run)), ([], []))
    runs.append(json.loads(_read(f"{folder}/wall_seconds.json")))
    iterations += its
  lines = _head(["setting", "method", "runs", "one iteration, s", "one run, min", "all runs, h"])
  for (setting, method), (runs, iterations) in groups.items():
    cells = [setting, method, str(len(runs)), _spread(iterations) if iterations else "-", _spread(runs, 60)]
    lines.append(_row([*cells, f"{sum(runs) / 3600:.1f}"]))
  return "\n".join(lines)


def _token_mean(curve: list, key: str):
  """A per-token figure's mean over iterations, weighted by their loss tokens; None unless every one logs it."""
  if not all(key in m for m in curve):
    return None
  return sum(m[key] * m["train/loss_tokens"] for m in curve) / sum(m["train/loss_tokens"] for m in curve)


def signal_table(record: str) -> str:
  """What each recorded run trained on, as token means over the iterations that had loss tokens (weighted by them).

  Why: a forward cross-entropy cost is c_t = H(q_t) + KL(q_t || pi_t). The teacher's entropy H(q_t) is no
  disagreement any policy can remove, yet it is summed into the reward-to-go that DistIL's score term weights, where
  it rewards writing fewer tokens. The table shows how much of the cross-entropy that is (with `loss.cost="kl"` the
  cost is the KL part alone), how large the score term's weights |R_t - b_t| were, and where the student's entropy
  went at the states it trained on (the labelled rows for a teacher method, every row for GRPO). Runs without
  trained tokens are left out; a figure a run does not log is "-".
  """
  head = ["setting", "run", "iterations trained", "CE(q, pi) per token", "teacher entropy H(q)", "KL(q || pi)"]
  head += ["H(q) / CE", "score weight abs(R_t - b_t)", "student entropy, first -> last iteration"]
  lines = _head(head)
  for setting, run, folder in _records(record):
    curve = _read(f"{folder}/metrics.jsonl", lines=True)
    trained = [m for m in curve if m.get("train/loss_tokens", 0) > 0]
    if not trained:
      continue
    ce, h, kl, adv = (
      _token_mean(trained, f"train/{k}")
      for k in ("ce_per_token", "teacher_entropy_per_token", "kl_per_token", "advantage_abs")
    )
    show = lambda x, f=".3f": "-" if x is None else f"{x:{f}}"
    iterations = sum(m["iteration"] > 0 for m in curve)
    cells = [setting, run, f"{len(trained)} of {iterations}", show(ce), show(h), show(kl)]
    cells += [show(h / ce if ce and h is not None else None, ".2f"), show(adv, ".1f")]
    entropy = [m["train/entropy"] for m in trained if "train/entropy" in m]
    cells += [f"{entropy[0]:.3f} -> {entropy[-1]:.3f}" if entropy else "-"]
    lines.append(_row(cells))
  return "\n".join(lines)


def curves_table(record: str) -> str:
  """Each recorded run's training rollouts, iteration by iteration: the share rewarded, the mean response length
  against the run's cap (`sampling.max_new_tokens`) and the share cut there ("-" for runs that predate
  `rollout/cut`). Why: a policy whose responses grow to the cap stops writing answers, and GRPO has no gradient on a
  group where none is rewarded; these curves show when a run took off or stalled, which the end figures do not. The
  start (no iterations) has no row."""
  head = ["setting", "run", "reward by iteration", "response length by iteration", "cap", "cut by iteration"]
  lines = _head(head)
  for setting, run, folder in _records(record):
    curve = [m for m in _read(f"{folder}/metrics.jsonl", lines=True) if "rollout/reward" in m]
    if not curve:
      continue
    cap = json.loads(_read(f"{folder}/config.json"))["sampling"]["max_new_tokens"]
    rewards = " ".join(f"{m['rollout/reward']:.2f}" for m in curve)
    lengths = " ".join(f"{m['rollout/length']:.0f}" for m in curve)
    cut = " ".join(f"{m['rollout/cut']:.2f}" for m in curve) if all("rollout/cut" in m for m in curve) else "-"
    lines.append(_row([setting, run, rewards, lengths, str(cap), cut]))
  return "\n".join(lines)


def _by_iteration(samples: list) -> dict:
  """{iteration: the rows logged at that validation}, in the order written."""
  out = {}
  for row in samples:
    out.setdefault(row["iteration"], []).append(row)
  return out


def answer_forms(samples: list, formats) -> dict:
  """{iteration: (correct, answered but wrong, no final answer, of those cut at the horizon)} over the responses
  logged at each validation. "No final answer" is what the task's grader reads as none (`extract_answer` in the
  run's `task.answer_formats`); "cut" is a response that never stopped (None where the rows do not say: samples
  logged before `stopped` was)."""
  out = {}
  for it, rows in _by_iteration(samples).items():
    forms = [0 if r["correct"] else 1 if math_task.extract_answer(r["response"], formats) else 2 for r in rows]
    said = all("stopped" in r for r in rows)
    cut = sum(f == 2 and not r["stopped"] for f, r in zip(forms, rows, strict=True)) if said else None
    out[it] = (forms.count(0), forms.count(1), forms.count(2), cut)
  return out


def values_right(samples: list) -> dict:
  """{iteration: how many of the responses logged at that validation end on the expected value}: their last written
  number is the answer (`math.equivalent`), whatever form carries it; None where the rows predate `answer`. Why: a
  lenient reading beside the grader's, so that a run which computes the value and drops the answer's form ("Cy has 1
  + 8 = 9 shells.") is told from one that computes nothing; lenient, it also counts a response ending on a number
  it restated."""
  out = {}
  for it, rows in _by_iteration(samples).items():
    numbers = [re.findall(r"-?\d+(?:\.\d+)?", r["response"]) for r in rows]
    said = all("answer" in r for r in rows)
    out[it] = (
      sum(bool(n) and math_task.equivalent(n[-1], r["answer"]) for n, r in zip(numbers, rows, strict=True))
      if said
      else None
    )
  return out


def _forms(counts) -> str:
  correct, wrong, none, cut = counts[:4]
  return f"{correct} / {wrong} / {none}" + ("" if cut is None else f" ({cut} cut)")


def _math_runs(record: str):
  """(setting, run, folder, config, samples) per recorded math run with logged responses. Runs without them
  (recorded before 730aa2b, or `eval.log_samples=0`, which writes an empty file) or of a task other than math are
  left out."""
  for setting, run, folder in _records(record):
    if not all(os.path.exists(os.path.join(folder, f)) for f in ("samples.jsonl", "config.json")):
      continue
    config = json.loads(_read(f"{folder}/config.json"))
    samples = _read(f"{folder}/samples.jsonl", lines=True)
    if config["task"]["name"] == "math" and samples:
      yield setting, run, folder, config, samples


def _formats(config: dict) -> tuple:
  """The answer forms the run's grader read (`task.answer_formats`)."""
  return tuple(config["task"].get("answer_formats", math_task.FORMATS))


def graded_now(samples: list, config: dict) -> dict:
  """{iteration: how many of the responses logged at that validation the run's task passes as its grader now
  stands}; None where the rows are not of the task's validation prompts (or predate `question`). Why: a row's
  `correct` is its grader's verdict when the run ran; a grader mended since (381c20a: the value an equation after
  the cue states) grades the same text again here, so a figure that rested on a grader's leniency shows."""
  if not all("question" in r for r in samples):
    return {row["iteration"]: None for row in samples}
  task_json = json.dumps(config["task"], sort_keys=True)
  task, problems = _task(task_json), {p.prompt: p for p in _held_out(task_json, "validation")}
  out = {}
  for it, rows in _by_iteration(samples).items():
    said = all(r.get("question") in problems for r in rows)
    out[it] = sum(task.verify(problems[r["question"]], r["response"]).correct for r in rows) if said else None
  return out


def _run_forms(record: str):
  """(setting, run, first, last) per recorded math run with logged responses: `answer_forms` at its first and last
  validation, each followed by its `values_right` and its `graded_now`."""
  for setting, run, _, config, samples in _math_runs(record):
    forms, values, now = answer_forms(samples, _formats(config)), values_right(samples), graded_now(samples, config)
    first, last = min(forms), max(forms)
    yield setting, run, (*forms[first], values[first], now[first]), (*forms[last], values[last], now[last])


def _change(first, last, i) -> str:
  """`first -> last` of the count at index i of two `_run_forms` counts, "-" where either lacks it."""
  return "-" if None in (first[i], last[i]) else f"{first[i]} -> {last[i]}"


_MORE = ("right value last, any form: first -> last", "correct, graded now: first -> last")


def answers_table(record: str) -> str:
  """How each run's validation responses (`eval.log_samples` per prompt) went, at its first and last validation:
  correct / a final answer that is wrong / no final answer the grader could read, and how many of the last were cut
  at the horizon rather than stopped. Why: a verifiable reward pays for the answer's form as much as for its value,
  and a teacher's next-token distribution may not; this separates the two, and a response that stops before its
  answer from one that runs out of tokens. Then how many ended on the right value in any form (`values_right`), and
  how many the grader passes as it now stands (`graded_now`), first -> last."""
  head = ["setting", "run", "responses", "first: correct / wrong / no answer", "last: correct / wrong / no answer"]
  lines = _head([*head, *_MORE])
  for setting, run, first, last in _run_forms(record):
    cells = [setting, run, str(sum(first[:3])), _forms(first), _forms(last)]
    lines.append(_row([*cells, _change(first, last, 4), _change(first, last, 5)]))
  return "\n".join(lines)


def _sum_forms(a, b):
  """Two `_run_forms` counts added; the cut and right-value counts only where both say them."""
  return (
    *(x + y for x, y in zip(a[:3], b[:3], strict=True)),
    *(None if None in (x, y) else x + y for x, y in zip(a[3:], b[3:], strict=True)),
  )


def answers_by_rate_table(record: str) -> str:
  """`answers_table` summed over the seeds of each method and rate (a run's name less its `_seed<n>`): the counts a
  single seed's 32 responses are too few to read. A cut count is summed only where every seed's rows say it."""
  sums = {}
  for setting, run, first, last in _run_forms(record):
    key = (setting, re.sub(r"_seed\d+$", "", run))
    seeds, *counts = sums.get(key, (0, (0,) * 6, (0,) * 6))
    sums[key] = (seeds + 1, _sum_forms(counts[0], first), _sum_forms(counts[1], last))
  head = ["setting", "method and rate", "seeds", "responses"]
  head += ["first: correct / wrong / no answer", "last: correct / wrong / no answer"]
  lines = _head([*head, *_MORE])
  for (setting, name), (seeds, first, last) in sums.items():
    cells = [setting, name, str(seeds), str(sum(first[:3])), _forms(first), _forms(last)]
    lines.append(_row([*cells, _change(first, last, 4), _change(first, last, 5)]))
  return "\n".join(lines)


def constant_pass(problems: list, answer: str | None) -> float:
  """Pass@1 of a policy that gives `answer` to every problem, graded as the task grades a final answer
  (`math.equivalent`); 0 for no answer."""
  if answer is None:
    return 0.0
  return sum(math_task.equivalent(answer, p.answer) for p in problems) / len(problems)


def best_constants(problems: list) -> tuple[list, float]:
  """The answers that score most as a constant on `problems` (ties all listed, in order), and their Pass@1."""
  scores = {a: constant_pass(problems, a) for a in dict.fromkeys(p.answer for p in problems)}
  top = max(scores.values())
  return [a for a, s in scores.items() if s == top], top


def _test_prompts(setting: str, config: dict) -> int:
  """How many test prompts a run of `setting` was tested on: its protocol's (`comparison_tasks`), else the run's
  own evaluation size, as `arith_comparison.Comparison._test` sets it."""
  preset = setting.split("-")[0]  # a tagged rerun's folder is <setting>-<tag> (`arith_comparison --tag`)
  finals = [t.final for t in comparison_tasks.TASKS.values() if preset in t.settings.values()]
  own = config["eval"]["num_prompts"]
  return finals[0].get("num_prompts", own) if finals else own


@functools.cache
def _task(task_json: str):
  """The task a run's config section (as JSON) makes."""
  return tasks.make_task(ml_collections.ConfigDict(json.loads(task_json)))


@functools.cache
def _held_out(task_json: str, split: str) -> tuple:
  """The held-out problems of `split` of the task a run's config section (as JSON) makes."""
  return tuple(evaluate.held_out(_task(task_json), split))


def _splits(task_json: str, validation: int, test: int) -> tuple:
  """The validation and test prompts a run with this task section was validated and tested on."""
  return list(_held_out(task_json, "validation")[:validation]), list(_held_out(task_json, "test")[:test])


def constants_table(record: str) -> str:
  """Whether a run's gain could be a guess: each math run's commonest final answer at its last validation (as
  written, so "10" and "10.0" are two; responses without one not counted; ties to the first written; "-" where none
  has one), its share of all the logged responses, and that answer's Pass@1 as a constant on the validation and the
  test prompts, beside the run's own test Pass@1; and per setting the best constant on each split (read from its
  first run's task section: a setting is one preset). Why: a policy that collapses to one answer scores that
  answer's frequency among the prompts (on a small split, well above a weak start), which neither the Pass@k figures
  nor `answers_table` tell from reading the problem."""
  head = ["setting", "run", "last: commonest answer (share)", "as a constant: val. / test Pass@1", "test Pass@1"]
  lines, seen = _head(head), set()
  for setting, run, folder, config, samples in _math_runs(record):
    validation, test = _splits(json.dumps(config["task"], sort_keys=True), config["eval"]["num_prompts"],
                               _test_prompts(setting, config))  # fmt: skip
    if setting not in seen:
      seen.add(setting)
      (val_best, val_pass), (test_best, test_pass) = best_constants(validation), best_constants(test)
      lines.append(_row([setting, "best constant", f"val. {', '.join(val_best)}; test {', '.join(test_best)}",
                         f"{val_pass:.3f} / {test_pass:.3f}", "-"]))  # fmt: skip
    by_iteration = _by_iteration(samples)
    last = by_iteration[max(by_iteration)]
    answers = collections.Counter(math_task.extract_answer(r["response"], _formats(config)) for r in last)
    answers.pop(None, None)
    answer, count = answers.most_common(1)[0] if answers else (None, 0)
    said = "-" if answer is None else answer
    figures = f"{constant_pass(validation, answer):.3f} / {constant_pass(test, answer):.3f}"
    tested = _figure(_read(f"{folder}/eval.jsonl", lines=True)[-1], "eval/pass@1")
    lines.append(_row([setting, run, f"{said} ({count / len(last):.2f})", figures, tested]))
  return "\n".join(lines)


def teacher_table(out: dict) -> str:
  """`experiments.teacher_quality`'s figures at the student's states: per row, how many it covers, the student's and
  the teacher's mean, and the teacher minus the student as a mean over prompts [95% t-interval] (n prompts); the
  figures a file predates are left out."""
  at = "at_student_states/"
  rows = [
    ("continuing from one state of each: finished correctly", out[f"{at}states"], "pass", "teacher_minus_student"),
    ("continuing: tokens written after the state", out[f"{at}states"], "tokens", "teacher_minus_student_tokens"),
    ("continuing: stopped within the horizon", out[f"{at}states"], "stopped", "teacher_minus_student_stopped"),
  ]
  lines = _head(["at the student's states", "responses", "student", "teacher", "teacher minus student (prompts)"])
  for name, n, key, diff in rows:
    if at + diff not in out:  # written before teacher_quality measured it
      continue
    d = out[at + diff]
    lines.append(_row([name, str(n), f"{out[f'{at}student_{key}']:.3f}", f"{out[f'{at}teacher_{key}']:.3f}",
                       f"{interval(d, '+.3f')} ({d['n']})"]))  # fmt: skip
  for group in dict.fromkeys(k.split("/")[1] for k in out if k.startswith("stopping/")):
    g = {k.split("/")[2]: v for k, v in out.items() if k.startswith(f"stopping/{group}/")}
    if g["student"] is None:
      continue
    d, name = g["teacher_minus_student"], f"probability of stopping: {group.replace('_', ' ')}"
    lines.append(_row([name, str(g["responses"]), f"{g['student']:.4f}", f"{g['teacher']:.4f}",
                       f"{interval(d, '+.4f')} ({d['n']})"]))  # fmt: skip
  return "\n".join(lines)


def main(paths):
  if paths[:1] == ["--runs"]:
    printers = (
      runs_table,
      signal_table,
      curves_table,
      answers_table,
      answers_by_rate_table,
      constants_table,
      cost_table,
    )
    for table in printers:  # each as it is made: a table that cannot be made leaves the ones before it printed
      print(table(paths[1]) + "\n")
    return
  for path in paths:
    with open(path) as f:
      summary = json.load(f)
    if "at_student_states/states" in summary:  # experiments.teacher_quality's figures
      print(f"{path}: {summary['prompts']} {summary['split']} prompts x {summary['samples']}, checkpoint "
            f"{summary['checkpoint_iteration']}, feedback {summary['at_student_states/feedback']}\n")  # fmt: skip
      print(teacher_table(summary) + "\n")
      continue
    p = summary["protocol"]
    print(
      f"{path}: expert {p['expert']}, size {p['size']}, seeds {p['seeds']}, rates {p['lrs']}, "
      f"{p['wall_seconds_total'] / 60:.0f} min with {p.get('jobs', 1)} job(s)\n"
    )
    print(tables(summary) + "\n")


if __name__ == "__main__":
  main(sys.argv[1:])
