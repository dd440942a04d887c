"""What a killed run leaves behind: TensorBoard events on disk at each write, and a resume that purges the events
a killed run wrote past its checkpoint (as metrics.jsonl is cut back)."""

import glob
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from distil_jax import metrics


def _events(folder):
  """Every event in the folder's TFRecord files (8-byte length, 4-byte CRC, payload, 4-byte CRC), by file."""
  out = []
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")), key=os.path.getmtime):
    data, at, events = open(path, "rb").read(), 0, []
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at : at + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[at + 12 : at + 12 + length])
      events.append(event)
      at += 12 + length + 4
    out.append(events)
  return out


def _scalars(events):
  return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


def test_tensorboard_is_flushed_at_each_write_and_purged_on_resume(tmp_path):
  kw = dict(tensorboard=True, progress_total=5, show_progress=False)
  writer = metrics.MetricsWriter(str(tmp_path), resume_iteration=None, **kw)
  for it in (1, 2, 3):
    writer.write(it, {"train/loss": float(it), "time/x": 0.5})
    (events,) = _events(tmp_path / "tensorboard")  # read while the writer is still open, as after a kill -9
    assert ("train/loss", float(it)) in [(tag, v) for step, tag, v in _scalars(events) if step == it]
  # killed here: never closed (the test closes it at the end only to release the file)
  resumed = metrics.MetricsWriter(str(tmp_path), resume_iteration=1, **kw)  # the checkpoint was at iteration 1
  resumed.write(2, {"train/loss": 20.0})
  resumed.close()
  writer.close()
  first, second = _events(tmp_path / "tensorboard")
  # TensorBoard drops earlier events at steps >= a SessionLog.START's step: iterations 2 and 3 of the killed run.
  starts = [e.step for e in second if e.HasField("session_log") and e.session_log.status == e.session_log.START]
  assert starts == [2] and (2, "train/loss", 20.0) in _scalars(second)
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["iteration"] for line in f] == [1, 2]


def test_each_evaluation_carries_the_best_so_far_across_a_resume(tmp_path):
  """Pass@1 0.2, 0.5, 0.4, 0.5 at evaluations 0-3: the best is 0.5 from iteration 1 (a tie keeps the first); a run
  resumed from iteration 2 reads its history and goes on: 0.6 at iteration 3 is the new best."""
  kw = dict(tensorboard=False, progress_total=5, show_progress=False)
  writer = metrics.MetricsWriter(str(tmp_path), resume_iteration=None, **kw)
  for it, value in enumerate([0.2, 0.5, 0.4, 0.5]):
    writer.write(it, {"eval/pass@1": value})
    writer.write(it, {"train/loss": 1.0})  # a line without an evaluation carries no best
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  best = [(r["eval/best_pass@1"], r["eval/best_iteration"]) for r in rows if "eval/pass@1" in r]
  assert best == [(0.2, 0), (0.5, 1), (0.5, 1), (0.5, 1)]
  assert not any("eval/best_pass@1" in r for r in rows if "train/loss" in r)
  resumed = metrics.MetricsWriter(str(tmp_path), resume_iteration=2, **kw)
  resumed.write(3, {"eval/pass@1": 0.6})
  resumed.close()
  last = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
  assert (last["iteration"], last["eval/best_pass@1"], last["eval/best_iteration"]) == (3, 0.6, 3)


def test_a_cut_last_line_is_dropped_at_resume_and_a_cut_earlier_line_is_named(tmp_path):
  """A crash mid-write leaves the last line of the append-only log partial: the resume drops it (its iteration is
  replayed) instead of stopping with a JSONDecodeError."""
  path = tmp_path / "metrics.jsonl"
  rows = [{"iteration": i, "train/loss": 1.0 / (i + 1)} for i in range(4)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 4, "train/lo')
  metrics._truncate(str(path), 2)
  assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
  path.write_text(json.dumps(rows[0]) + "\n" + '{"iteration": 1, "tr\n' + json.dumps(rows[2]) + "\n")
  with pytest.raises(metrics.InputError, match=r"metrics\.jsonl:2: not valid JSON \(only the last line"):
    metrics._truncate(str(path), 2)
