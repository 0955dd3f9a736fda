"""Tests for collab_rl.metrics: JSONL and TensorBoard writers, process-0 gating, progress bars."""

import glob
import json
import os
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from collab_rl import metrics


def _read_events(tb_dir: str) -> list[event_pb2.Event]:
  """Parses TFRecord event files: [u64 length][u32 crc][payload][u32 crc] per record."""
  events = []
  for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return events


def _scalars(events) -> dict[tuple[str, int], float]:
  return {(v.tag, e.step): v.simple_value
          for e in events if e.HasField("summary") for v in e.summary.value
          if v.HasField("simple_value")}


def test_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
  with metrics.MetricWriter(workdir) as writer:
    writer.write_scalars(1, {"loss": 0.5, "reward": jnp.asarray(2.0)})
    writer.write_scalars(jnp.asarray(2), {"loss": np.float32(0.25), "reward": np.array([3.0])})
    # Already on disk before close: a killed run keeps it.
    assert len(metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == 2
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert records == [{"step": 1, "loss": 0.5, "reward": 2.0},
                     {"step": 2, "loss": 0.25, "reward": 3.0}]
  assert all(type(r["reward"]) is float for r in records)
  scalars = _scalars(_read_events(os.path.join(workdir, "tb")))
  assert scalars[("loss", 1)] == 0.5 and scalars[("reward", 2)] == 3.0


def test_resumed_writer_appends(tmp_path):
  for step in (1, 2):
    with metrics.MetricWriter(str(tmp_path)) as writer:
      writer.write_scalars(step, {"x": step})
  assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]


def test_non_scalar_rejected(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="'vec'"):
      writer.write_scalars(0, {"vec": jnp.ones(3)})


def test_hparams(tmp_path):
  config = ml_collections.ConfigDict({"lr": 1e-3, "model": {"width": 64}, "axes": ("data",)})
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write_hparams(config)
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == {"lr": 1e-3, "model": {"width": 64}, "axes": ["data"]}
  texts = [v for e in _read_events(str(tmp_path / "tb")) if e.HasField("summary")
           for v in e.summary.value if v.tag.startswith("hparams")]
  assert texts and b"width" in texts[0].tensor.string_val[0]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricWriter(str(workdir), enabled=False) as writer:
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_hparams({"lr": 1.0})
  assert not workdir.exists()


def test_torn_last_line_skipped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x"')
  assert metrics.read_jsonl(str(path)) == [{"step": 1, "x": 1.0}]


def test_progress():
  assert list(metrics.progress(range(3), desc="t")) == [0, 1, 2]
  assert metrics.progress(range(3), enabled=False).disable
  bar = metrics.progress(total=10, initial=4)
  assert bar.n == 4 and not bar.disable
  bar.close()
