"""Entry point: `python -m distil_jax.main --config=configs/math.py --workdir=/tmp/run [--config.a.b=value]`.

--mode=train   run or resume the DAgger loop (resumes when the workdir holds a checkpoint)
--mode=eval    pass@k of the latest checkpoint
--mode=export  the latest checkpoint as a Hugging Face checkpoint in --export_dir
Config files follow big_vision: `get_config(arg)` returns an ml_collections ConfigDict; `configs/x.py:runlocal`
passes "runlocal" as `arg`.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A configs/*.py file, optionally with :arg.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, the buffer, metrics and the tokenizer live.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "What to run.")
flags.DEFINE_string("export_dir", None, "Output folder for --mode=export.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host TPU / GPU).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize()
  from distil_jax import train

  config = _CONFIG.value
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  logging.info("config:\n%s", config)
  if FLAGS.mode == "export" and not FLAGS.export_dir:
    raise app.UsageError("--mode=export needs --export_dir")
  from distil_jax.experts import ExpertError
  from distil_jax.sandbox import SandboxUnavailable
  from distil_jax.tasks import DataError

  try:
    if FLAGS.mode == "train":
      out = train.train(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
      out = train.evaluate_only(config, FLAGS.workdir)
    else:
      out = {"exported": train.export(config, FLAGS.workdir, FLAGS.export_dir)}
  except (DataError, ExpertError, SandboxUnavailable, FloatingPointError, FileNotFoundError, ValueError) as e:
    # Bad input: one line naming the cause (the traceback stays in the log at debug level).
    logging.debug("failed", exc_info=True)
    sys.exit(f"distil_jax: {type(e).__name__}: {e}")
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
