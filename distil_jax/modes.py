"""The two modes besides training (`--mode=eval`, `--mode=export`), each on the workdir's newest usable checkpoint or
on the one of a chosen step (`--step`: an earlier iteration kept by `checkpoint.keep`)."""

from __future__ import annotations

import json
import os
import shutil

import jax
from flax import nnx

from distil_jax import build, evaluate, hf, sharding


def _restored(config, workdir: str, mode: str, step: int | None):
  """(the run, checkpoint `step`'s parameters, its meta); the config and the step are checked before the model is
  built."""
  build.check(config, mode)
  if step is not None:
    build.require_step(workdir, step)
  run = build.Run.build(config, workdir)
  return (run, *run.restore_params(step))


def evaluate_only(config, workdir: str, step: int | None = None) -> dict:
  """Pass@k of checkpoint `step` (None: the newest usable one), printed and appended to `workdir/eval.jsonl`; every
  response it graded goes to `workdir/eval_samples.jsonl` first (process 0's share of the prompts, without the
  rendered prompt), so that the figures can be graded again by a grader mended later."""
  run, params, meta = _restored(config, workdir, "eval", step)
  run.write_workdir()
  rows = []
  with sharding.use(run.mesh, run.rules):
    out = evaluate.evaluate_policy(
      run.graphdef, params, jax.random.key(config.seed), config=config, tok=run.tok, task=run.task, mesh=run.mesh,
      samples=rows, samples_per_prompt=config.eval.samples,
    )  # fmt: skip
  out["iteration"] = meta["iteration"]
  if jax.process_index() == 0:
    keep_graded(os.path.join(workdir, "eval_samples.jsonl"), rows, out["iteration"], config.eval.split)
    with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
      f.write(json.dumps(out) + "\n")
  return out


def keep_graded(path: str, rows: list, iteration: int, split: str) -> None:
  """Add one evaluation's graded responses to `path` (without the rendered prompt), in place of any earlier ones of
  the same checkpoint and split: an evaluation killed before its figures, or repeated, leaves one set per
  checkpoint and split, the set eval.jsonl's latest line for it was computed from (with several processes, process
  0's share of it). Replaced whole (a copy, then a rename), so a kill mid-write leaves the file as it was."""
  kept = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        if (row["iteration"], row["split"]) != (iteration, split):
          kept.append(line)
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
    for row in rows:
      shown = {k: v for k, v in row.items() if k != "prompt"}
      f.write(json.dumps({"iteration": iteration, "split": split, **shown}) + "\n")
  os.replace(path + ".tmp", path)


def export(config, workdir: str, export_dir: str, step: int | None = None) -> str:
  """Write checkpoint `step` (None: the newest usable one) as a Hugging Face checkpoint (safetensors + config.json +
  tokenizer)."""
  run, params, _ = _restored(config, workdir, "export", step)
  model = nnx.merge(run.graphdef, params)
  if jax.process_index() == 0:
    tok = run.tok
    hf.save_hf(model, run.model_cfg, export_dir, dtype=config.export.dtype)
    hf.save_generation_config(export_dir, bos_id=tok.bos_id, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
      for folder in (workdir, config.model.hf_path, config.tokenizer.path):
        if folder and os.path.isdir(folder) and os.path.exists(os.path.join(folder, name)):
          shutil.copy(os.path.join(folder, name), export_dir)
          break
    if tok.chat is not None:  # the template the run trained with, where transformers 5 reads it
      with open(os.path.join(export_dir, "chat_template.jinja"), "w") as f:
        f.write(tok.chat.source)
  return export_dir
