"""The benchmarks run and print one JSON line per figure (speed targets live in them, never in tests)."""

import json
import subprocess
import sys

import pytest
from run_helpers import ROOT, XLA_TEST_FLAGS


@pytest.mark.parametrize(
  "module,args,figures",
  [
    (
      "bench.train_step",
      ["--size", "tiny", "--dtype", "float32", "--batch", "4", "--seq", "32", "--vs_torch"],
      {
        "train_step_seconds",
        "train_tokens_per_second",
        "train_model_tflops_per_step",
        "train_peak_bytes_compiled",
        "torch_step_seconds",  # bench.torch_reference's own lines, passed through by --vs_torch
        "torch_tokens_per_second",
        "train_speedup_vs_torch",
      },
    ),
    (
      "bench.compile_depth",
      ["--size", "tiny", "--layers", "1", "3", "--repeats", "1", "--seq", "16"],
      {"train_compile_seconds", "train_compile_ratio"},
    ),
    (
      "bench.sampler",
      ["--size", "tiny", "--dtype", "float32", "--batch", "2", "--prompt", "8", "--new", "8", "--group", "2"]
      + ["--vs_torch"],
      {
        "decode_tokens_per_second",
        "prefill_seconds",
        "generate_tokens_per_second",
        "decode_bytes_per_second",
        "rollout_tokens_per_second",
        "torch_generate_tokens_per_second",
        "sampler_speedup_vs_torch",
      },
    ),
    (
      "bench.loss_memory",
      ["--vocab", "4096", "--tokens", "512", "--dim", "64", "--batch", "4", "--topk", "8"],
      {"loss_temp_bytes_naive", "loss_temp_bytes_fused", "loss_temp_ratio_fused_over_naive"},
    ),
    ("bench.grader", ["--problems", "10"], {"grader_seconds_per_problem"}),
    (
      "bench.loss_chunk",
      ["--vocab", "512", "--tokens", "64", "--dim", "32", "--chunks", "4,16", "--naive"],
      {"loss_fused_seconds", "loss_naive_seconds", "loss_best_chunk"},
    ),
  ],
)
def test_benchmark_prints_its_figures(module, args, figures):
  out = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "XLA_FLAGS": XLA_TEST_FLAGS},
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert figures <= {line["figure"] for line in lines}
  for line in lines:
    value = line.get("value", line.get("bytes", line.get("ratio")))
    assert isinstance(value, int | float) and value > 0, line
    if line["figure"].startswith("train_"):  # the JAX benches name what ran
      assert {"remat", "size"} <= set(line), line
