"""Is the `self` expert a better policy than the student? Self-distillation can only help if it is.

For a checkpoint (e.g. the comparison's behaviour-cloned start) and held-out prompts (`eval.split`), with the same
parameters:
  from the prompt   Pass@1 of the student, and of the re-prompted student (as the `self` expert is) shown
                    - own:       the verifier's feedback on one of the student's own responses;
                    - sibling:   a correct solution (what it sees when a sibling succeeded; here the reference);
                    - reference: the reference solution and the verdict on the student's response
                                 (`expert.feedback="reference"`, privileged information as in OPSD);
  at the student's states   DistIL labels the states the student visits, so the question that matters is whether
                    the teacher finishes better than the student *from the student's own prefixes*. For every
                    response the expert would label (the config's `expert.feedback`, exactly `experts.reprompt_texts`),
                    one state y_<t is drawn with t uniform over the response's positions; the student (plain prompt)
                    and the teacher (its re-prompt) each continue from it once, and the completed response is
                    verified. Reported: both success rates, their difference with a 95% t-interval over prompts, and
                    whether the teacher is better (the interval's lower end above 0); and the tokens each writes
                    after the prefix and the share that stops, with their differences (does the teacher end sooner
                    than the student would, so that imitating it shortens the student?). A continuation is cut
                    where a training response would be: `sampling.max_new_tokens` tokens, the prefix included.
  stopping          what DistIL's local term imitates, without sampling: over the same labelled responses, each
                    policy's probability of ending the turn (any stop id) before every response token, at the
                    temperature and vocabulary the loss scores it at. Where the student stopped, split by whether
                    the response holds a final answer (the math grader's reader): does the teacher, shown a correct
                    sibling, put less mass than the student on stopping without an answer? Also over the states
                    where the student went on. Differences are means per prompt with 95% t-intervals. At one
                    checkpoint: a live self teacher changes as the student trains.
Samples at the config's sampling temperature. A re-prompt longer than `expert.max_prompt_tokens` is left out, as the
expert leaves it unlabelled in training (counted). The teacher is the checkpoint's parameters (an EMA teacher equals
them at the end of behaviour cloning).

  python -m experiments.teacher_quality --config=configs/arith.py:compare_self_reference \\
    --workdir=/tmp/distil-compare/self_reference/warmup_seed0 \\
    --out experiments/results/arith_self_reference_teacher_seed0.json

A run without behaviour cloning (the real-model protocol) starts from its checkpoint: `--start` reads the parameters the
run starts from (`model.hf_path`) instead of a workdir's checkpoint, so the check is at the student the comparison
trains. `--skip_from_prompt` measures only at the student's states (what depends on `expert.feedback`; the
from-the-prompt figures are the same for every feedback mode):
  python -m experiments.teacher_quality --config=configs/math.py:smollm2_sibling --start --workdir=/tmp/tq \\
    --config.eval.num_prompts=64 --samples=8 --chunk=32 --skip_from_prompt \\
    --out experiments/results/smollm2_sibling_teacher_start.json
"""

import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from distil_jax import build, data, evaluate, experts, rollout, sampler, sharding, update
from distil_jax import model as model_lib
from distil_jax import token_terms as tt
from distil_jax.tasks import math as math_task
from experiments import stats

FLAGS = flags.FLAGS


def define_flags():
  """The script's flags, defined when it runs (not at import: the tests import its functions beside other scripts
  that define `--config` too)."""
  config_flags.DEFINE_config_file("config", None, "Config file (the run's).", lock_config=True)
  flags.DEFINE_string("workdir", None, "A workdir holding a checkpoint.", required=True)
  flags.DEFINE_string("out", None, "JSON file to write the figures to.")
  flags.DEFINE_integer("samples", 8, "Responses per prompt (even and >= 4 when the expert reads siblings).")
  flags.DEFINE_integer("chunk", 512, "Rows per sampler call (the last call is padded to it).")
  flags.DEFINE_bool("start", False, "The parameters the run starts from (model.hf_path), not a checkpoint.")
  flags.DEFINE_bool("skip_from_prompt", False, "Only the comparison at the student's states.")


def _in_chunks(id_rows, width, chunk, pad_id):
  """(call index, row indices [chunk], prompt [chunk,width], mask) per call over `id_rows` (lists of ids), left-padded
  to `width` and, in the last call, padded to `chunk` rows with copies of the first (index 0): every call one shape,
  so one compilation; a caller indexes its other per-row arrays with the indices and keeps the first len(id_rows)
  rows of what it gathers."""
  index = np.concatenate([np.arange(len(id_rows)), np.zeros(-len(id_rows) % chunk, int)])
  for i, start in enumerate(range(0, len(index), chunk)):
    rows_C = index[start : start + chunk]
    yield i, rows_C, *sampler.left_pad([id_rows[r] for r in rows_C], (width,), pad_id)


def sample_ids(run, params, id_rows, rng, sampling_cfg):
  """Responses (token rows, lengths) to prompts given as id lists, in chunks of `--chunk` rows, every chunk of one
  shape [chunk, the expert's prompt width + the response length] (one compilation for the whole script)."""
  c = run.config
  tokens, lengths = [], []
  width = max(c.expert.max_prompt_tokens, c.sampling.max_prompt_tokens) + c.sampling.max_new_tokens
  for i, _, prompt, mask in _in_chunks(id_rows, width, FLAGS.chunk, run.tok.pad_id):
    glob = data.to_global({"t": prompt, "m": mask}, run.mesh)
    out = sampler.generate(run.graphdef, params, glob["t"], glob["m"], jax.random.fold_in(rng, i), sampling_cfg)
    tokens.append(np.asarray(jax.device_get(out.tokens)))
    lengths.append(np.asarray(jax.device_get(out.lengths)))
  return np.concatenate(tokens)[: len(id_rows)], np.concatenate(lengths)[: len(id_rows)]


def continue_and_verify(run, params, problems, prompts, rng, sampling_cfg, prefixes=None):
  """Per row, the response to `prompts[i]` (text) appended to `prefixes[i]` (ids) and cut where a training response
  would be (`sampling.max_new_tokens` in all, prefix included): ([rows] 1.0 where it solves `problems[i]`, [rows]
  the tokens written after the prefix, [rows] 1.0 where it stopped within that horizon). Sampling is
  autoregressive, so the cut is what sampling with the horizon's budget would have given."""
  prefixes = [[] for _ in prompts] if prefixes is None else [list(p) for p in prefixes]
  ids = [run.tok.prompt_ids(text, run.config.tokenizer.add_bos) + p for text, p in zip(prompts, prefixes, strict=True)]
  tokens, lengths = sample_ids(run, params, ids, rng, sampling_cfg)
  budget = np.array([run.config.sampling.max_new_tokens - len(p) for p in prefixes])
  cut = np.minimum(lengths, budget)
  stopped = [n <= b and int(row[n - 1]) in run.tok.stop_ids for row, n, b in zip(tokens, lengths, budget, strict=True)]
  correct = [
    run.task.verify(p, run.tok.text_of(before) + run.tok.text_of(row[:n])).correct
    for p, before, row, n in zip(problems, prefixes, tokens, cut, strict=True)
  ]
  return np.array(correct, np.float64), cut.astype(np.float64), np.array(stopped, np.float64)


def stop_probability(run, params, prompt_id_rows, responses_RxN, temperature, chunk):
  """[R,N] each row's probability of ending the turn (any of the tokenizer's stop ids) at every response position,
  given its prompt (ids) and the response before that position: the next-token distribution the loss reads at the
  student's states, at `temperature` and the tokenizer's vocabulary (`token_terms.restrict`); `chunk` rows a call."""
  c = run.config
  width = max(c.expert.max_prompt_tokens, c.sampling.max_prompt_tokens)
  stops = np.array(run.tok.stop_ids)

  @jax.jit
  def one_chunk(params, prompt_BxP, mask_BxP, responses_BxN):
    model = model_lib.merge_for_compute(run.graphdef, params)
    hidden_BxNxD = update.response_hidden(model, prompt_BxP, mask_BxP, responses_BxN)
    z_BxNxV = tt.restrict(model.logits(hidden_BxNxD), temperature, run.tok.vocab_size)
    return jax.numpy.exp(jax.nn.logsumexp(z_BxNxV[..., stops], -1) - jax.nn.logsumexp(z_BxNxV, -1))

  out = []
  for _, rows_C, prompt, mask in _in_chunks(prompt_id_rows, width, chunk, run.tok.pad_id):
    out.append(np.asarray(one_chunk(params, prompt, mask, responses_RxN[rows_C])))
  return np.concatenate(out)[: len(prompt_id_rows)]


def _by_prompt(index_R, keep_R, student_R, teacher_R):
  """Per-response figures of the kept responses: their count, each policy's mean, and the teacher minus the student
  as a mean over prompts (each prompt's responses averaged first) with its 95% t-interval."""
  prompts = sorted(set(index_R[keep_R]))
  per_prompt = lambda x_R: np.array([x_R[keep_R & (index_R == b)].mean() for b in prompts])
  return {
    "responses": int(keep_R.sum()),
    "student": float(student_R[keep_R].mean()) if prompts else None,
    "teacher": float(teacher_R[keep_R].mean()) if prompts else None,
    "teacher_minus_student": stats.mean_ci(list(per_prompt(teacher_R) - per_prompt(student_R))) if prompts else None,
  }


def stop_figures(index_R, lengths_R, ended_R, answered_R, student_RxN, teacher_RxN):
  """The stop probabilities ([R,N] per policy) summarised by `_by_prompt`: at the state where the student stopped
  (the last response token), split by whether the response holds a final answer when `answered_R` is given (else
  every stop alike), and each response's mean over the states where the student went on (every state before a
  stop; every state of a response cut at the horizon)."""
  rows = np.arange(len(index_R))
  at_stop = (student_RxN[rows, lengths_R - 1], teacher_RxN[rows, lengths_R - 1])
  groups = [("stopped", ended_R, *at_stop)]
  if answered_R is not None:
    groups = [("stopped_without_answer", ended_R & ~answered_R, *at_stop)]
    groups.append(("stopped_with_answer", ended_R & answered_R, *at_stop))
  went_on = np.where(ended_R, lengths_R - 1, lengths_R)
  going_on_RxN = np.arange(student_RxN.shape[1])[None, :] < went_on[:, None]
  mean_going_on = lambda p_RxN: (p_RxN * going_on_RxN).sum(1) / np.maximum(going_on_RxN.sum(1), 1)
  groups.append(("going_on", going_on_RxN.any(1), mean_going_on(student_RxN), mean_going_on(teacher_RxN)))
  out = {}
  for name, keep_R, student_R, teacher_R in groups:
    out.update({f"stopping/{name}/{k}": v for k, v in _by_prompt(index_R, keep_R, student_R, teacher_R).items()})
  return out


FORWARD_ROWS = 16  # rows per `stop_probability` call: its logits are [rows, N, V] float32 (SmolLM2: 300 MB)


def stopping(run, params, r, labelled, teacher_texts):
  """`stop_figures` for the labelled responses (`labelled`: (prompt index, response index) pairs; `teacher_texts`
  their re-prompts), each policy at the temperature the loss scores it at; a final answer as the math grader reads
  it (other tasks: every stop alike)."""
  c = run.config
  loss = build.loss_config(c, run.tok, experts.make_expert(c.expert, run.task, run.tok, c.tokenizer.add_bos))
  responses = np.stack([r.tokens[b, j] for b, j in labelled])
  lengths = np.array([int(r.mask[b, j].sum()) for b, j in labelled])
  student_ids = [run.tok.prompt_ids(r.problems[b].prompt, c.tokenizer.add_bos) for b, _ in labelled]
  teacher_ids = [run.tok.prompt_ids(t, c.tokenizer.add_bos) for t in teacher_texts]
  p_student = stop_probability(run, params, student_ids, responses, loss.policy_temperature, FORWARD_ROWS)
  p_teacher = stop_probability(run, params, teacher_ids, responses, loss.teacher_temperature, FORWARD_ROWS)
  ended = np.array([int(row[n - 1]) in run.tok.stop_ids for row, n in zip(responses, lengths, strict=True)])
  answered = None
  if c.task.name == "math":
    formats = tuple(c.task.get("answer_formats", math_task.FORMATS))
    answered = np.array([math_task.extract_answer(r.texts[b][j], formats) is not None for b, j in labelled])
  index = np.array([b for b, _ in labelled])
  return stop_figures(index, lengths, ended, answered, p_student, p_teacher)


def main(_):
  c = FLAGS.config
  run = build.Run.build(c, FLAGS.workdir)
  params, meta = (run.params, {"iteration": "start"}) if FLAGS.start else run.restore_params()
  problems = evaluate.held_out(run.task, c.eval.split)[: c.eval.num_prompts]
  g = FLAGS.samples
  base = rollout.sampling_config(c.sampling, run.tok)
  template, width = c.expert.reprompt, c.expert.max_prompt_tokens
  fits = lambda text: len(run.tok.prompt_ids(text, c.tokenizer.add_bos)) <= width
  keys = jax.random.split(jax.random.key(c.seed), 6)
  with sharding.use(run.mesh, run.rules):
    r = rollout.rollout(
      run.graphdef, params, problems, keys[0], tok=run.tok, add_bos=c.tokenizer.add_bos, task=run.task, mesh=run.mesh,
      samples_per_prompt=g, sampling_cfg=base,
    )  # fmt: skip
    student = np.array([[v.correct for v in row] for row in r.verdicts], np.float64)
    out = {"student/pass@1": float(student.mean())}

    # -- From the prompt: the re-prompted student's own solutions ---------------------------------------------------
    shown = {
      "own_feedback": [v[0].feedback for v in r.verdicts],
      "sibling": [experts.SIBLING + p.reference for p in problems],
      "reference": [experts.reference_feedback(p, v[0]) for p, v in zip(problems, r.verdicts, strict=True)],
    }
    first_wrong = np.array([not v[0].correct for v in r.verdicts])
    for i, (name, feedback) in enumerate(() if FLAGS.skip_from_prompt else shown.items()):
      prompts = [template.format(prompt=p.prompt, feedback=f) for p, f in zip(problems, feedback, strict=True)]
      kept = np.array([fits(t) for t in prompts])
      rows = [(p, t) for p, t, k in zip(problems, prompts, kept, strict=True) if k for _ in range(g)]
      solved, *_ = continue_and_verify(run, params, *zip(*rows, strict=True), keys[1 + i], base)
      per_prompt = solved.reshape(-1, g).mean(1)
      out[f"self_expert_{name}/pass@1"] = float(per_prompt.mean())
      out[f"self_expert_{name}/prompts_left_out"] = int(np.sum(~kept))
      if name == "own_feedback" and np.any(first_wrong[kept]):
        out["self_expert_own_feedback/pass@1_after_a_wrong_response"] = float(per_prompt[first_wrong[kept]].mean())

    # -- At the student's states ------------------------------------------------------------------------------------
    texts, valid = experts.reprompt_texts(r, template, c.expert.feedback == "sibling", c.expert.feedback)
    pick = np.random.default_rng(c.seed)
    rows, labelled = [], []  # (prompt index, problem, teacher text, prefix ids); (prompt index, response index)
    for b, p in enumerate(problems):
      for j in range(g):
        length = int(r.mask[b, j].sum())
        if valid[b, j] and length and fits(texts[b][j]):
          rows.append((b, p, texts[b][j], r.tokens[b, j, : int(pick.integers(0, length))]))
          labelled.append((b, j))
    if not rows:
      raise ValueError("the expert labels none of the student's responses here: nothing to compare")
    index, probs, teacher_texts, prefixes = zip(*rows, strict=True)
    s_ok, s_len, s_end = continue_and_verify(run, params, probs, [p.prompt for p in probs], keys[4], base, prefixes)
    t_ok, t_len, t_end = continue_and_verify(run, params, probs, teacher_texts, keys[5], base, prefixes)
    out.update(stopping(run, params, r, labelled, teacher_texts))
  index = np.array(index)
  every = np.ones(len(index), bool)
  by_prompt = lambda t, s: _by_prompt(index, every, s, t)["teacher_minus_student"]
  diff = by_prompt(t_ok, s_ok)
  better = diff["ci"] is not None and diff["ci"][0] > 0
  out.update(
    {
      "at_student_states/feedback": c.expert.feedback,
      "at_student_states/student_pass": float(s_ok.mean()),
      "at_student_states/teacher_pass": float(t_ok.mean()),
      "at_student_states/teacher_minus_student": diff,
      "at_student_states/student_tokens": float(s_len.mean()),
      "at_student_states/teacher_tokens": float(t_len.mean()),
      "at_student_states/teacher_minus_student_tokens": by_prompt(t_len, s_len),
      "at_student_states/student_stopped": float(s_end.mean()),
      "at_student_states/teacher_stopped": float(t_end.mean()),
      "at_student_states/teacher_minus_student_stopped": by_prompt(t_end, s_end),
      "at_student_states/prefix_tokens": float(np.mean([len(x) for x in prefixes])),
      "at_student_states/states": len(rows),
      "at_student_states/responses_unlabelled": int(np.sum(valid == 0)),
      "teacher_better_at_student_states": bool(better),
      "checkpoint_iteration": meta["iteration"],
      "split": c.eval.split,
      "prompts": len(problems),
      "samples": g,
    }
  )
  print(json.dumps(out))
  verdict = "IS" if better else "is NOT (95% interval of the difference reaches 0 or below)"
  print(
    f"The self expert (feedback={c.expert.feedback!r}) {verdict} a better policy than the student at the student's "
    f"own states: it completes {out['at_student_states/teacher_pass']:.3f} of {len(rows)} states, the student "
    f"{out['at_student_states/student_pass']:.3f}."
  )
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
