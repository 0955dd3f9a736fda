"""A run's metrics, config, TensorBoard events and an evaluation's results on a gs:// workdir:
written through `storage` into a fake object store that, like GCS, has no append and no local
folder, so nothing may land on the local disk."""

import io
import json
import os

from etils.epath import testing as epath_testing
import pytest

from collab_rl import metrics, results, storage


class FakeBucket:
  """Objects by URL, written whole when their stream closes; append is refused as GCS does."""

  def __init__(self):
    self.objects: dict[str, bytes] = {}
    self.writes: dict[str, int] = {}

  def open(self, _, path, mode="r", **kwargs):
    del kwargs
    path = os.fspath(path)
    if "a" in mode:
      raise OSError(f"{path}: object stores have no append")
    if "r" in mode:
      if path not in self.objects:
        raise FileNotFoundError(path)
      data = self.objects[path]
      return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode("utf-8"))
    bucket = self

    class Stream(io.BytesIO if "b" in mode else io.StringIO):
      def close(self):
        value = self.getvalue()
        bucket.objects[path] = value if isinstance(value, bytes) else value.encode("utf-8")
        bucket.writes[path] = bucket.writes.get(path, 0) + 1
        super().close()

    return Stream()

  def exists(self, _, path):
    path = os.fspath(path).rstrip("/")
    return path in self.objects or any(k.startswith(path + "/") for k in self.objects)

  def mkdir(self, *args, **kwargs):
    del args, kwargs  # no folders in a bucket

  def patched(self):
    return epath_testing.mock_epath(open=self.open, exists=self.exists, mkdir=self.mkdir,
                                    makedirs=self.mkdir)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
  fake = FakeBucket()
  with fake.patched():
    yield fake
  assert not os.listdir(tmp_path), f"written to the local disk: {os.listdir(tmp_path)}"


def test_metric_writer_writes_metrics_config_and_events_to_the_bucket(bucket):
  workdir = "gs://runs/exp1"
  with metrics.MetricWriter(workdir, enabled=True) as w:
    w.write_hparams({"seed": 3, "reward": {"w_int": 0.1}})
    for step in range(5):
      w.write_scalars(step, {"loss": 1.0 / (step + 1)})
  lines = bucket.objects[f"{workdir}/metrics.jsonl"].decode().splitlines()
  assert [json.loads(l)["step"] for l in lines] == list(range(5))
  # Flushed on close, not once per step: a remote log is written whole, throttled.
  assert bucket.writes[f"{workdir}/metrics.jsonl"] <= 2
  assert json.loads(bucket.objects[f"{workdir}/config.json"])["reward"]["w_int"] == 0.1
  events = [k for k in bucket.objects if k.startswith(f"{workdir}/tb/events.out.tfevents")]
  assert len(events) == 1 and len(bucket.objects[events[0]]) > 100
  assert metrics.read_jsonl(f"{workdir}/metrics.jsonl")[-1]["loss"] == pytest.approx(0.2)


def test_a_resumed_run_keeps_growing_its_remote_log(bucket):
  workdir = "gs://runs/resumed"
  with metrics.MetricWriter(workdir, enabled=True) as w:
    w.write_scalars(0, {"loss": 2.0})
  with metrics.MetricWriter(workdir, enabled=True) as w:  # the run restarted after preemption
    w.write_scalars(1, {"loss": 1.0})
  assert [r["step"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")] == [0, 1]


def test_growing_file_writes_a_remote_object_at_most_every_interval(bucket):
  f = storage.GrowingFile("gs://runs/log.txt", min_interval_s=3600)
  f.write("a\n")
  f.flush()  # within the interval: nothing written yet
  assert "gs://runs/log.txt" not in bucket.objects
  f.write("b\n")
  f.close()
  assert bucket.objects["gs://runs/log.txt"] == b"a\nb\n"


def test_evaluation_results_go_to_the_bucket(bucket):
  row = {"score": {"mean": 0.5, "ci": 0.1}}
  res = {"ambig_math:sft_base": {"per_seed": [row], "over_seeds": results.over_seeds([row])}}
  results.write("gs://runs/eval", {"episodes": 8, "warnings": ["w"]}, res, metrics=("score",))
  assert json.loads(bucket.objects["gs://runs/eval/results.json"])["settings"]["episodes"] == 8
  assert b"> warning: w" in bucket.objects["gs://runs/eval/results.md"]


def test_append_is_refused_with_the_path():
  with pytest.raises(ValueError, match="gs://runs/x.jsonl: append is not portable"):
    storage.open_file("gs://runs/x.jsonl", "a")


def test_local_paths_stay_local_and_absolute(tmp_path):
  assert storage.absolute("gs://b/x") == "gs://b/x"
  assert os.path.isabs(storage.absolute("rel/dir"))
  f = storage.GrowingFile(tmp_path / "d" / "log.txt")
  f.write("x\n")
  f.flush()  # local: on disk at once, so a killed run keeps every line
  assert (tmp_path / "d" / "log.txt").read_text() == "x\n"
  f.close()


def test_an_exported_folder_is_uploaded_file_by_file(bucket, tmp_path_factory):
  # Run.export_hf stages the safetensors and tokenizer files locally, then uploads them.
  local = tmp_path_factory.mktemp("staging")
  (local / "config.json").write_text("{}")
  (local / "model.safetensors").write_bytes(b"\0" * 64)
  storage.upload_folder(local, "gs://runs/exp1/hf")
  assert bucket.objects["gs://runs/exp1/hf/model.safetensors"] == b"\0" * 64
  assert bucket.objects["gs://runs/exp1/hf/config.json"] == b"{}"
