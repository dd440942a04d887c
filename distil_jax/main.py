"""Entry point: `python -m distil_jax.main --config=configs/math.py --workdir=/tmp/run [--config.a.b=value]`.

--mode=train   run or resume the DAgger loop (resumes when the workdir holds a checkpoint)
--mode=eval    pass@k of the newest usable checkpoint (--step=N: of iteration N's, where checkpoint.keep kept it)
--mode=export  the newest usable checkpoint (or --step's) as a Hugging Face checkpoint in --export_dir
--allow_changed=optim.lr,...  keys a resume may change (any other change to what is trained is refused)
--distributed  join the other processes of a multi-host run first (see `multihost/` for where it finds them)
--compile_cache_dir=DIR  where compiled programs are kept between runs ("" for none; JAX_COMPILATION_CACHE_DIR wins)
Config files follow big_vision: `get_config(arg)` returns an ml_collections ConfigDict; `configs/x.py:runlocal`
passes "runlocal" as `arg`.

The console shows the config, a progress bar, warnings and errors; INFO lines go to `workdir/logs/` (absl's
`--log_dir`, `--alsologtostderr` and `--logtostderr` apply). The library's own errors (`errors.Error`: bad config
values, data records, checkpoints, experts) end the run with one line; anything else is a bug and keeps its
traceback.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A configs/*.py file, optionally with :arg.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, the buffer, metrics, logs and the tokenizer live.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "What to run.")
flags.DEFINE_string("export_dir", None, "Output folder for --mode=export.")
flags.DEFINE_integer("step", None, "--mode=eval/export: the checkpoint of this iteration, not the newest usable one.")
flags.DEFINE_list(
  "allow_changed",
  [],
  "Config keys a resume may change (e.g. optim.lr,loss.kind); a resume with any other change to what is trained is "
  "refused. Naming train.iterations also lays the learning-rate schedule out for the new length.",
)
flags.DEFINE_bool("distributed", False, "Join a multi-process run first (jax.distributed).")
flags.DEFINE_string("coordinator_address", None, "--distributed: process 0's host:port (else JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "--distributed: how many processes (else JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index (else JAX_PROCESS_ID).")
flags.DEFINE_float("peer_timeout_s", 10.0, "--distributed: a peer silent this long is taken as dead; all stop.")
flags.DEFINE_string(
  "compile_cache_dir",
  "~/.cache/distil_jax/xla",
  "JAX's persistent compilation cache: a resumed or repeated run loads its programs instead of compiling them "
  "(SmolLM2-135M's sampler and update take about two minutes to compile on a CPU). '' turns it off; the environment's "
  "JAX_COMPILATION_CACHE_DIR, when set, wins.",
)
FLAGS = flags.FLAGS


def _use_compile_cache(jax) -> None:
  """Why a flag and not a config key: the cache is the machine's, not the run's (a resume may move to another
  machine), and it changes no result: programs are keyed by their HLO, compile options, devices and jax version."""
  if FLAGS.compile_cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compile_cache_dir))


def _run(config):
  from distil_jax import modes, train

  if FLAGS.mode == "train":
    return train.train(config, FLAGS.workdir, allow_changed=FLAGS.allow_changed)
  if FLAGS.mode == "eval":
    return modes.evaluate_only(config, FLAGS.workdir, FLAGS.step)
  return {"exported": modes.export(config, FLAGS.workdir, FLAGS.export_dir, FLAGS.step)}


def main(argv):
  del argv
  from distil_jax import errors, metrics, multihost, preemption
  from distil_jax.sandbox import SandboxUnavailable

  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  if FLAGS.mode == "export" and not FLAGS.export_dir:
    raise app.UsageError("--mode=export needs --export_dir")
  if FLAGS.step is not None and (FLAGS.mode == "train" or FLAGS.step < 0):
    raise app.UsageError("--step names a checkpoint (an iteration, >= 0) for --mode=eval or --mode=export")
  metrics.quiet_console()
  import jax

  _use_compile_cache(jax)

  try:
    if FLAGS.distributed:
      multihost.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, timeout_s=FLAGS.peer_timeout_s
      )
    if FLAGS.log_dir:  # absl's flag: the log file goes there from the start (else to workdir/logs, once it is valid)
      metrics.log_to_file(FLAGS.log_dir)
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    if jax.process_index() == 0:
      print(f"config:\n{config}", file=sys.stderr, flush=True)
    out = _run(config)
  except preemption.Preempted as e:  # a clean stop at SIGTERM / SIGINT: one line, exit 0 (a scheduler requeues)
    logging.info("stopped at a signal", exc_info=True)
    multihost.finish(ok=True)
    if jax.process_index() == 0:
      print(f"distil_jax: {e}", file=sys.stderr, flush=True)
    return
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (which takes SIGINT over): reading input, eval, export
    multihost.finish(ok=False)
    sys.exit(f"distil_jax: interrupted (SIGINT) during --mode={FLAGS.mode} before any checkpoint was written")
  except (errors.Error, SandboxUnavailable, FloatingPointError) as e:
    # The library's own message: one line naming the cause (the traceback goes to the log file).
    logging.info("stopped", exc_info=True)
    message = f"distil_jax: {type(e).__name__}: " + "\n  ".join(str(e).splitlines())
    if FLAGS.distributed:
      multihost.exit_now(message, failed=True)
    sys.exit(message)
  except Exception as e:
    full = errors.disk_full(e)
    if full:  # a write of the buffer, the metrics or the log: checkpoints are written atomically, the last is intact
      logging.info("stopped", exc_info=True)
      message = f"distil_jax: the disk is full ({full}); the last checkpoint is intact: free some space and resume"
      if FLAGS.distributed:
        multihost.exit_now(message, failed=True)
      sys.exit(message)
    if FLAGS.distributed:  # a collective that failed because a peer died: the watchdog names it and ends the run
      multihost.blame_peer_or_return()
      multihost.finish(ok=False)
    raise
  multihost.finish(ok=True)
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("time/")}, sort_keys=True))


def _parse(argv):
  """Flag parsing with config mistakes (an unknown key, a bad value) reported as one line, not a traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    why = str(e)
    while why[:1] in "'\"" and why[-1:] == why[:1] and len(why) > 1:  # KeyError text comes quoted, even twice
      why = why[1:-1]
    why = why.replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    overrides = [a for a in argv if a.startswith("--config.")]
    kind = "unknown config key" if isinstance(e, KeyError | AttributeError) else "bad flag"
    sys.exit(f"distil_jax: {kind} {why} (overrides given: {' '.join(overrides) or 'none'})")


def run():
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  run()
