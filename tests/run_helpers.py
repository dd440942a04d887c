"""Helpers for tests that run the whole loop: config loading, a fake OpenAI-compatible expert server, subprocesses."""

import email.utils
import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from distil_jax import config_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite's programs are small and each is compiled about once: LLVM's optimisation passes are most of their
# compile time and buy nothing at these sizes (test_update's sharded tests: 105 s with them, 56 s without).
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def child_env(**extra) -> dict[str, str]:
  """A child process's environment: the suite's XLA flags in place of the caller's (a forced host device count there
  would change the child's mesh), the CPU platform, no model hub."""
  return {**os.environ, "XLA_FLAGS": XLA_TEST_FLAGS, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **extra}


def load_config(name: str, arg: str | None = "runlocal", **overrides):
  """configs/<name>.py:get_config(arg), with dotted overrides ("loss.kind": "grpo") and one device."""
  path = os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else "")
  return config_base.from_file(path, **{"mesh.num_devices": 1, "log.tensorboard": False, **overrides})


def rot_one_bit(item_folder, name: str, index) -> None:
  """Flip one bit of one stored float32 element of an orbax item through tensorstore: the bytes on disk change and
  still decode (orbax compresses its chunks, so a raw flip would mostly garble the stream instead); the damage
  only a content checksum sees. `name` is orbax's key ("model.layers.0.mlp.down_proj.kernel")."""
  import numpy as np
  import tensorstore as ts

  spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{item_folder}/"}, "path": name}
  arr = ts.open(spec).result()
  bits = np.asarray(arr[index].read().result()).view(np.uint32) ^ np.uint32(1 << 20)
  arr[index].write(bits.view(np.float32)).result()


def run_main(*args, timeout=600, env=None):
  """`python -m distil_jax.main ...` in a fresh process (one CPU device, as on a user's machine)."""
  return subprocess.run(
    [sys.executable, "-m", "distil_jax.main", *args],
    cwd=ROOT,
    env=child_env(**(env or {})),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def wait_for_file(path, proc, timeout=60.0) -> None:
  """Wait until a child has written `path`, its sign that it reached a point a test signals it at. Fails at once if
  `proc` exits first (with its stderr where piped), and after `timeout` seconds if neither happens, so a child that
  never gets there fails the test instead of hanging the suite or being signalled at the wrong moment."""
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(
        f"exited with {proc.returncode} before writing {path}: {proc.stderr.read() if proc.stderr else ''}"
      )
    assert time.time() < deadline, f"{path} not written within {timeout} s"
    time.sleep(0.02)


class FakeExpertServer:
  """A local OpenAI-compatible endpoint: /tokenize with a given tokenizer, /v1/completions with echo (the prompt's
  tokens, then one generated) + top-k logprobs keyed "token_id:N" (the true next token gets log 0.6, the next ids
  0.1 each), as vLLM answers with `return_tokens_as_token_ids`. Broken servers: `mode="garbage"` answers with HTML
  instead of JSON; "nan" and "positive" put NaN or +3.0 at one position; "bos" scores its own BOS in front of the
  prompt (every position shifted by one); "overfull" gives one position k probabilities of 0.5 each.
  Replies as other servers write them: "list" writes each position as [{"token", "logprob"}, ...]; "k+1" adds the
  scored token at log 0.01 (outside the top k) to every position, as vLLM does.
  Hostile or failing transports (completions only; the first `failures` requests, then good replies): "drip" sends
  the reply 2 bytes a second; "huge" announces and sends 4 MB of padding; "stream" sends 4 MB with no length
  (close-delimited); "cut" closes half-way through the announced length; "busy" answers 429 with `Retry-After:
  retry_after`; "unavailable" 503 with an HTTP-date Retry-After that far ahead; "redirect" answers 307."""

  def __init__(self, tokenizer, mode="ok", failures=1 << 30, retry_after=1):
    server = self

    class Handler(BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests += 1
        if self.path != "/tokenize" and server.mode in server.TRANSPORT and server.failures > 0:
          server.failures -= 1
          server.failed += 1
          return self.fail(server.mode)
        if server.mode == "garbage":
          payload = b"<html>502 bad gateway</html>"
        elif self.path == "/tokenize":
          payload = json.dumps({"tokens": server.tokenizer.encode(body["prompt"])}).encode()
        else:
          ids, k, vocab = body["prompt"], body["logprobs"], server.tokenizer.vocab_size
          if server.mode == "bos":
            ids = [server.tokenizer.bos_id, *ids]
          top = [None]
          for tid in ids[1:]:
            entry = {f"token_id:{tid}": math.log(0.6)}
            for j in range(1, k):
              entry[f"token_id:{(tid + j) % vocab}"] = math.log(0.1)
            top.append(entry)
          last = f"token_id:{ids[-1]}"
          if server.mode == "k+1":
            for entry, tid in zip(top[1:], ids[1:], strict=True):
              entry[f"token_id:{(tid + k) % vocab}"] = math.log(0.01)
          if server.mode == "nan":
            top[-1][last] = float("nan")
          elif server.mode == "positive":
            top[-1][last] = 3.0
          elif server.mode == "overfull":  # each a probability, together k / 2 > 1
            top[-1] = {key: math.log(0.5) for key in top[-1]}
          tokens = [f"token_id:{t}" for t in ids] + [f"token_id:{server.tokenizer.eos_id}"]
          top.append({tokens[-1]: 0.0})
          if server.mode == "list":
            top = [e and [{"token": t, "logprob": lp, "bytes": []} for t, lp in e.items()] for e in top]
          logprobs = {"tokens": tokens, "top_logprobs": top}
          payload = json.dumps({"choices": [{"text": "", "logprobs": logprobs}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

      def fail(self, mode):
        if mode in ("busy", "unavailable", "redirect"):
          code = {"busy": 429, "unavailable": 503, "redirect": 307}[mode]
          self.send_response(code)
          if mode == "redirect":
            self.send_header("Location", "http://127.0.0.1:9/v1/completions")
          elif mode == "busy":
            self.send_header("Retry-After", str(server.retry_after))
          else:
            self.send_header("Retry-After", email.utils.formatdate(time.time() + server.retry_after, usegmt=True))
          self.send_header("Content-Length", "0")
          self.end_headers()
          return
        size = 4 << 20 if mode in ("huge", "stream") else 1000
        self.send_response(200)
        if mode != "stream":
          self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
          if mode == "drip":  # 2 bytes a second, for at most 20 s
            for _ in range(40):
              self.wfile.write(b"  ")
              self.wfile.flush()
              time.sleep(0.5)
          elif mode == "cut":
            self.wfile.write(b" " * (size // 2))
          else:
            for _ in range(size >> 16):
              self.wfile.write(b" " * (1 << 16))
        except OSError:  # the client hung up: what it should do
          pass
        self.close_connection = True

    self.tokenizer, self.mode, self.requests = tokenizer, mode, 0
    self.failures, self.failed, self.retry_after = failures, 0, retry_after
    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

  TRANSPORT = ("drip", "huge", "stream", "cut", "busy", "unavailable", "redirect")

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()
