"""One DAgger iteration on a real checkpoint, ours against the same work in transformers + torch, in one run.

  python -m bench.loop_iteration --hf_path ~/.cache/distil_jax/SmolLM2-135M-Instruct [--prompts 4 --group 4 --new 64]

Ours is the loop's own code (`configs/math.py:smollm2` with the sizes given): a rollout of `--prompts` x `--group`
responses of exactly `--new` tokens (no stop id, so both stacks sample the same number of tokens), the self expert's
labels (sibling feedback), then `--updates` DistIL updates of `--batch_groups` groups each (the teacher forward over
the re-prompts runs inside every update, as in the loop). The first iteration includes compilation; the steady
figures are the median over the `--steady` iterations after it (run-to-run noise on a shared 2-core VM is about 20%).
The torch side (a child process, `--stack torch`) gets the same prompt ids, re-prompt
rows and training rows: `generate` with the same rows, temperature and token count, a teacher forward over the
re-prompts of each update's rows (no grad), and as many AdamW steps of a full-vocabulary forward CE to those
teacher distributions over the same tokens.

Figures, one JSON line each: `loop_<phase>_seconds` (rollout, label, update, iteration) for both stacks and
`loop_<rollout|train|iteration>_speedup_vs_torch` (theirs over ours, steady; train is label + update, since ours
labels inside the update); `loop_compile_seconds` (the first iteration minus the steady one);
`loop_peak_rss_bytes` with `loop_peak_bound_bytes`, what the rows and the model hold:

  params P (float32): 4P masters + 4P gradients + 8P Adam moments + 4P compute copy (the sampler's and the update's)
  + update activations: L x R x (S + Pt) x D x 4 (each layer's input, student rows R of S = prompt + new tokens and
  their teacher rows of Pt = re-prompt + new tokens); with `--remat dots` (the preset's) also the student rows'
  weight matmul outputs L x R x S x (3D + 2KE + 2F) x 4 (q, k, v, o, gate, up, down); + one layer's working set,
  dominated on XLA:CPU by the attention scores and probabilities 2 x R x H x (Pt)^2 x 4 and the MLP's 3 x R x Pt x F x 4
  + the fused loss's chunk of logits R x C x V x 4 (C = loss.chunk_size) for student and teacher
  + the sampler's KV cache 2 x L x rows x (P + N) x K x E x 4
so a run is sized by what its rows hold. The bound leaves out the runtime (jax, XLA's compiler: about 1.5 GB).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES_ENV = "DISTIL_JAX_LOOP_BENCH_ROWS"


def _emit(figure, value, **fields):
  print(json.dumps({"figure": figure, "value": value, **fields}), flush=True)


def ours(args) -> dict:
  import jax
  import jax.numpy as jnp

  jax.config.update("jax_enable_compilation_cache", False)  # compile time is a figure: never load a cached program

  from distil_jax import build, config_base, data, experts, update
  from distil_jax import rollout as rollout_lib

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_base.from_file(
    os.path.join(root, "configs", "math.py:smollm2"),
    **{
      "model.hf_path": args.hf_path,
      "sampling.max_new_tokens": args.new,
      "train.prompts_per_iteration": args.prompts,
      "train.group_size": args.group,
      "train.batch_groups": args.batch_groups,
      "train.updates_per_iteration": args.updates,
      "expert.feedback": "any",  # every row labelled, so both stacks score every re-prompt
      "model.dtype": args.dtype,
      "model.remat": args.remat,
    },
  )
  work = tempfile.mkdtemp()
  run = build.Run.build(config, work)
  tok, mesh = run.tok, run.mesh
  expert = experts.make_expert(config.expert, run.task, tok, config.tokenizer.add_bos)
  tx = update.make_optimizer(config.optim, 2 * args.updates)
  state = update.init_state(tx, run.params, mesh)
  options = update.UpdateOptions(build.loss_config(config, tok, expert), labels="device")
  step = update.make_update(run.graphdef, tx, options, state_shardings=jax.tree.map(lambda x: x.sharding, state))
  sampling = rollout_lib.sampling_config(config.sampling, tok)
  sampling = sampling.__class__(**{**sampling.__dict__, "eos_id": None, "stop_ids": ()})  # exactly --new tokens
  problems = [run.task.problems("train")[i] for i in range(args.prompts)]
  layout = rollout_lib.layout(config, expert)
  phases, shared = [], None
  with jax.set_mesh(mesh):
    for it in range(1, 2 + args.steady):
      t0 = time.perf_counter()
      r = rollout_lib.rollout(
        run.graphdef, state["params"], problems, jax.random.key(it), tok=tok, add_bos=config.tokenizer.add_bos,
        task=run.task, mesh=mesh, samples_per_prompt=args.group, sampling_cfg=sampling,
      )  # fmt: skip
      t1 = time.perf_counter()
      labels, _ = expert.label(r)
      groups = rollout_lib.group_records(r, labels, it, tok=tok, layout=layout)
      t2 = time.perf_counter()
      for k in range(args.updates):
        rows = slice((k * args.batch_groups) % args.prompts, (k * args.batch_groups) % args.prompts + args.batch_groups)
        state, m = step(state, data.to_global({n: v[rows] for n, v in groups.items()}, mesh), None, jnp.int32(it))
      jax.block_until_ready(state)
      t3 = time.perf_counter()
      phases.append({"rollout": t1 - t0, "label": t2 - t1, "update": t3 - t2, "iteration": t3 - t0})
      if shared is None:
        shared = _rows_for_torch(r, groups, args)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"phases": phases, "rows": shared, "peak": peak, "bound": _bound(run.model_cfg, args, config)}


def _rows_for_torch(r, groups, args) -> dict:
  """What the torch side needs to do the same work: prompt ids, and per update the student and teacher rows."""
  import numpy as np

  prompts = [row[m == 1].tolist() for row, m in zip(r.prompt_tokens, r.prompt_mask, strict=True)]
  updates = []
  for k in range(args.updates):
    lo = (k * args.batch_groups) % args.prompts
    sel = slice(lo, lo + args.batch_groups)
    student = np.concatenate(
      [np.repeat(groups["prompt_tokens"][sel], args.group, 0), groups["tokens"][sel].reshape(-1, args.new)], 1
    )
    teacher = np.concatenate(
      [groups["teacher_tokens"][sel].reshape(-1, groups["teacher_tokens"].shape[-1]),
       groups["tokens"][sel].reshape(-1, args.new)], 1,
    )  # fmt: skip
    updates.append({"student": student.tolist(), "teacher": teacher.tolist()})
  return {"prompts": prompts, "updates": updates}


def _bound(cfg, args, config) -> int:
  """The peak memory formula of the module docstring, in bytes."""
  d, f, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
  h, k, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
  params = 2 * v * d * (1 if cfg.tie_word_embeddings else 2) // 2 + layers * (2 * d * h * e + 2 * d * k * e + 3 * d * f)
  rows = args.batch_groups * args.group
  s = config.sampling.max_prompt_tokens + args.new
  pt = config.expert.max_prompt_tokens + args.new
  state = 20 * params
  saved = layers * rows * (s + pt) * d * 4
  if args.remat == "dots":
    saved += layers * rows * s * (3 * d + 2 * k * e + 2 * f) * 4
  layer = 2 * rows * h * pt * pt * 4 + 3 * rows * pt * f * 4
  logits = 2 * rows * config.loss.chunk_size * v * 4
  cache = 2 * layers * args.prompts * args.group * s * k * e * 4
  return int(state + saved + layer + logits + cache)


def torch_side(args, spec: dict) -> dict:
  import torch
  import transformers

  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_path, dtype=torch.float32).to(device)
  fused = dict(fused=True) if device == "cuda" else {}
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, **fused)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  width = max(len(p) for p in spec["prompts"])
  pad = model.generation_config.pad_token_id or 0
  prompts = torch.tensor([[pad] * (width - len(p)) + p for p in spec["prompts"]], device=device)
  attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in spec["prompts"]], device=device)
  phases = []
  for _ in range(1 + args.steady):
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad(), autocast:
      model.generate(
        prompts, attention_mask=attn, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
        num_return_sequences=args.group, max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None,
        pad_token_id=pad,
      )  # fmt: skip
    sync()
    t1 = time.perf_counter()
    model.train()
    label = 0.0
    for u in spec["updates"]:
      s = time.perf_counter()
      student, teacher = (torch.tensor(u[k], device=device) for k in ("student", "teacher"))
      with torch.no_grad(), autocast:
        q = torch.softmax(model(teacher).logits[:, -args.new - 1 : -1].float() / args.temperature, -1)
      sync()
      label += time.perf_counter() - s
      with autocast:
        logits = model(student).logits[:, -args.new - 1 : -1].float()
      loss = -(q * torch.log_softmax(logits / args.temperature, -1)).sum(-1).mean()
      opt.zero_grad()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
    sync()
    t2 = time.perf_counter()
    phases.append({"rollout": t1 - t0, "label": label, "update": t2 - t1 - label, "iteration": t2 - t0})
  return {"phases": phases, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _random_copy(folder: str) -> str:
  """A folder with `folder`'s config and tokenizer files and random weights of its shapes (torch's init)."""
  import shutil

  import torch
  import transformers

  out = tempfile.mkdtemp()
  for name in os.listdir(folder):
    if not name.endswith(".safetensors") and not name.endswith(".index.json"):
      shutil.copy(os.path.join(folder, name), out)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder)).save_pretrained(out)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hf_path", default=os.path.expanduser("~/.cache/distil_jax/SmolLM2-135M-Instruct"))
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--updates", type=int, default=2)
  ap.add_argument("--batch_groups", type=int, default=2)
  ap.add_argument("--temperature", type=float, default=0.7)
  ap.add_argument("--steady", type=int, default=2, help="iterations after the first; each figure is their median")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype, both stacks")
  ap.add_argument("--remat", default="dots", choices=["none", "full", "dots"], help="ours; the preset's is dots")
  ap.add_argument("--random_weights", action="store_true", help="the checkpoint's shapes and tokenizer, random weights")
  ap.add_argument("--stack", choices=["both", "torch"], default="both")
  args = ap.parse_args()
  if args.stack == "torch":  # the child: the rows come in a file named by the environment
    with open(os.environ[SHAPES_ENV]) as f:
      print(json.dumps(torch_side(args, json.load(f))), flush=True)
    return
  if args.random_weights:  # e.g. on a machine the weights cannot reach: speed does not depend on them
    args.hf_path = _random_copy(args.hf_path)
    sys.argv += ["--hf_path", args.hf_path]
  mine = ours(args)
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(mine["rows"], f)
  child = subprocess.run(
    [sys.executable, "-m", "bench.loop_iteration", *[a for a in sys.argv[1:] if a != "--random_weights"]]
    + ["--stack", "torch"],
    capture_output=True, text=True, check=True, env={**os.environ, SHAPES_ENV: f.name, "JAX_PLATFORMS": "cpu"},
  )  # fmt: skip
  theirs = json.loads(child.stdout.strip().splitlines()[-1])
  shape = dict(prompts=args.prompts, group=args.group, new=args.new, updates=args.updates, rows=args.batch_groups)
  shape.update(dtype=args.dtype, remat=args.remat, random_weights=args.random_weights, steady=args.steady)
  steady = {}
  for stack, result in (("distil_jax", mine), ("torch", theirs)):
    for phase in result["phases"][0]:
      steady[stack, phase] = statistics.median(p[phase] for p in result["phases"][1:])
      first = round(result["phases"][0][phase], 2)
      _emit(f"loop_{phase}_seconds", round(steady[stack, phase], 2), stack=stack, first_iteration=first, **shape)
    steady[stack, "train"] = statistics.median(p["label"] + p["update"] for p in result["phases"][1:])
    _emit("loop_peak_rss_bytes", result["peak"], stack=stack, **shape)
  _emit("loop_compile_seconds", round(mine["phases"][0]["iteration"] - steady["distil_jax", "iteration"], 2), **shape)
  _emit("loop_peak_bound_bytes", mine["bound"], **shape)
  for phase in ("rollout", "train", "iteration"):  # train: label + update (ours runs the teacher inside the update)
    _emit(f"loop_{phase}_speedup_vs_torch", round(steady["torch", phase] / steady["distil_jax", phase], 3), **shape)


if __name__ == "__main__":
  main()
