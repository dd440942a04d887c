"""Shared by the benchmarks: a model size by name, timing, hardware peaks, one JSON line per figure."""

import json
import time

import jax

from distil_jax import model as model_lib

jax.config.update("jax_enable_compilation_cache", False)  # compile times are figures: never load a cached program

SIZES = {  # Llama-style shapes
  "tiny": dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  ),
  "125m": dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
  ),
  "1b": dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
  ),
}
# Peak dense bf16 FLOP/s and HBM bytes/s per device, for MFU and the bandwidth roofline.
PEAKS = {
  "H100": (989e12, 3.35e12),
  "H200": (989e12, 4.8e12),
  "TPU v5 lite": (197e12, 819e9),
  "TPU v4": (275e12, 1.2e12),
}


def model_config(size: str, dtype: str, remat: str = "none", attention: str = "auto", **overrides):
  return model_lib.ModelConfig(**{**SIZES[size], **overrides}, dtype=dtype, remat=remat, attention=attention)


def train_flops(cfg: model_lib.ModelConfig, rows: int, seq: int, response: int) -> float:
  """Model FLOPs of one training step (forward + backward = 3 x forward), counting only the work the step needs.

  Each row is `seq` tokens, of which the last `response` are the response; the student reads seq - 1 of them (the
  last token predicts nothing). Per token: the layers' weight matmuls. Per row: causal attention (half of the
  T x T scores). The LM head runs on response positions only. The embedding lookup is a gather (no FLOPs); remat's
  recomputation is hardware work, not model work, and is not counted.
  """
  d, f, e, layers = cfg.hidden_size, cfg.intermediate_size, cfg.head_size, cfg.num_hidden_layers
  h, k = cfg.num_attention_heads, cfg.num_key_value_heads
  t = seq - 1
  weights = 2 * (d * h * e + 2 * d * k * e + h * e * d + 3 * d * f)  # per token per layer
  attention = 2 * 2 * h * e * t * (t + 1) / 2  # QK^T and PV over the causal half, per row per layer
  head = 2 * d * cfg.vocab_size  # per response token
  return 3 * (rows * t * layers * weights + rows * layers * attention + rows * response * head)


def device_peaks():
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAKS.items():
    if name.lower() in kind.lower():
      return kind, peaks
  return kind, (None, None)


def timed(fn, *args, warmup=2, repeats=5):
  """Median wall time of fn(*args) after `warmup` calls (block_until_ready on the result)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def emit(figure: str, value, **fields):
  print(json.dumps({"figure": figure, "value": value, "device": jax.devices()[0].device_kind, **fields}), flush=True)
