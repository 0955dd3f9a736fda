"""Bad data: malformed CollabLLM records, corrupted dataset files and a build killed half-way.

A bad source record stops the build with `file:line: field: problem` and leaves any earlier
dataset exactly as it was; a prepared dataset damaged on disk is reported, when opened or when
the record is read, by file, record and field instead of failing deep inside tfds or training
on garbage; a build killed with SIGKILL leaves no dataset behind, and the next build removes its
debris; and the same dataset built twice is the same, byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

from array_record.python import array_record_module
import pytest
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2

from collab_rl.data import builders, collabllm, loader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def record(i: int = 0, **fields) -> dict:
  r = {"single_turn_prompt": f"Solve problem {i} — é", "single_turn_completion": f"{i}",
       "single_turn_metadata": {"source": "math", "level": i}, "other": [1, 2]}
  if i % 2:
    r["turns"] = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a?"}]
  return {**r, **fields}


def line(**fields) -> str:
  return json.dumps(record(**fields))


def write_jsonl(path, lines) -> str:
  with open(path, "wb") as f:
    f.write(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
  return str(path)


def tree(root) -> dict[str, bytes]:
  """Every file under `root` with its bytes: a dataset left untouched compares equal."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
  return out


GOOD = line()
TURN = {"role": "user", "content": "a"}
# kind: (the third line of the file, the field named, the problem); the build uses max_chars=100.
BAD_RECORDS = {
    "truncated_json": ('{"single_turn_prompt": "x",', "record", "invalid JSON"),
    "trailing_garbage": (GOOD + " x", "record", "invalid JSON: Extra data"),
    "not_an_object": ("[1, 2]", "record", "expected a JSON object, got array"),
    "bare_number": ("42", "record", "expected a JSON object, got number"),
    "invalid_utf8": (b'"\xff"', "record", "invalid UTF-8 at byte 1"),
    "nan_constant": (line(single_turn_metadata={"score": float("nan")}), "record",
                     "invalid JSON: NaN is not a JSON value"),
    "nested_too_deeply": (GOOD[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "record",
                          "JSON nested too deeply"),
    "duplicate_key": (GOOD[:-1] + ', "single_turn_completion": "7"}', "single_turn_completion",
                      "duplicate key"),
    "missing_completion": (json.dumps({"single_turn_prompt": "x", "single_turn_metadata": {}}),
                           "single_turn_completion", "missing required field"),
    "missing_prompt": (json.dumps({"single_turn_completion": "x", "single_turn_metadata": {}}),
                       "single_turn_prompt", "missing required field"),
    "completion_a_number": (line(single_turn_completion=0), "single_turn_completion",
                            "expected a string, got number"),
    "prompt_a_message_list": (line(single_turn_prompt=[TURN]), "single_turn_prompt",
                              "expected a string, got array"),
    "metadata_an_array": (line(single_turn_metadata=[]), "single_turn_metadata",
                          "expected an object, got array"),
    "metadata_null": (line(single_turn_metadata=None), "single_turn_metadata",
                      "expected an object, got null"),
    "blank_prompt": (line(single_turn_prompt="  "), "single_turn_prompt", "empty"),
    "too_long": (line(single_turn_completion="y" * 101), "single_turn_completion",
                 "too long: 101 characters > max_chars=100"),
    "lone_surrogate": (GOOD.replace('"0"', '"\\ud800"'), "single_turn_completion",
                       "not valid Unicode"),
    "turns_an_object": (line(turns=TURN), "turns", "expected an array, got object"),
    "turn_a_string": (line(turns=["hi"]), r"turns\[0\]", "expected an object, got string"),
    "turn_without_content": (line(turns=[{"role": "user"}]), r"turns\[0\].content",
                             "missing required field"),
    "turn_content_null": (line(turns=[{"role": "user", "content": None}]),
                          r"turns\[0\].content", "expected a string, got null"),
    "unknown_role": (line(turns=[TURN, {"role": "bot", "content": "b"}]), r"turns\[1\].role",
                     "'bot' is not one of"),
    "role_a_number": (line(turns=[{"role": 1, "content": "b"}]), r"turns\[0\].role",
                      "expected a string, got number"),
}


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory) -> tuple[str, str]:
  """(data_dir, dataset path) of a CollabLLM dataset built from 20 good records."""
  root = tmp_path_factory.mktemp("good")
  src = write_jsonl(root / "good.jsonl", [line(i=i) for i in range(20)])
  data_dir = str(root / "data")
  return data_dir, builders.prepare_collabllm(src, data_dir, max_chars=100)


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_stops_the_build_naming_file_line_and_field(kind, good_dataset, tmp_path):
  text, field, problem = BAD_RECORDS[kind]
  data_dir, path = good_dataset
  before = tree(path)
  src = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, text, GOOD])
  with pytest.raises(collabllm.RecordError, match=f"^{re.escape(src)}:3: {field}: {problem}"):
    builders.prepare_collabllm(src, data_dir, max_chars=100)
  assert os.listdir(os.path.dirname(path)) == ["1.0.0"]  # no half-built leftovers
  assert tree(path) == before  # the earlier dataset, byte for byte


@pytest.mark.parametrize("lines, error, match", [
    ([], collabllm.RecordError, ":0: record: the file holds no records"),
    (["", "   ", ""], collabllm.RecordError, ":0: record: the file holds no records"),
    (None, FileNotFoundError, "missing.jsonl"),
])
def test_unusable_input_files_build_nothing(lines, error, match, tmp_path):
  src = str(tmp_path / "missing.jsonl") if lines is None else write_jsonl(tmp_path / "x.jsonl",
                                                                         lines)
  with pytest.raises(error, match=re.escape(match)):
    builders.prepare_collabllm(src, str(tmp_path / "data"))
  assert not os.path.exists(tmp_path / "data" / "collabllm")


# ------------------------------------------------------------------------------------------------
# Prepared datasets damaged on disk.
# ------------------------------------------------------------------------------------------------

TRAIN = "collabllm-train.array_record-00000-of-00001"


def edit_json(file: str, fn: Callable[[dict], None]) -> Callable[[str], None]:
  def mutate(path):
    with open(os.path.join(path, file)) as f:
      info = json.load(f)
    fn(info)
    with open(os.path.join(path, file), "w") as f:
      json.dump(info, f)
  return mutate


def set_shard_length(value):
  def fn(info):
    next(s for s in info["splits"] if s["name"] == "train")["shardLengths"] = [value]
  return fn


def overwrite(file: str, data: Callable[[bytes], bytes]) -> Callable[[str], None]:
  def mutate(path):
    with open(os.path.join(path, file), "rb") as f:
      old = f.read()
    with open(os.path.join(path, file), "wb") as f:
      f.write(data(old))
  return mutate


def flip(old: bytes, start: int, n: int) -> bytes:
  return old[:start] + bytes(b ^ 0xFF for b in old[start:start + n]) + old[start + n:]


def rewrite_record(i: int, fn: Callable[[example_pb2.Example], bytes | None]):
  """Rewrites the train shard as a valid array_record file whose record `i` is `fn`'s."""
  def mutate(path):
    shard = os.path.join(path, TRAIN)
    reader = array_record_module.ArrayRecordReader(shard)
    records = list(reader.read(list(range(reader.num_records()))))
    reader.close()
    example = example_pb2.Example()
    example.ParseFromString(records[i])
    records[i] = fn(example) or example.SerializeToString()
    writer = array_record_module.ArrayRecordWriter(shard, "group_size:1")
    for r in records:
      writer.write(r)
    writer.close()
  return mutate


def set_text(feature: str, value: bytes):
  def fn(example):
    example.features.feature[feature].bytes_list.value[0] = value
  return fn


def drop(feature: str):
  def fn(example):
    del example.features.feature[feature]
  return fn


def add_turn(role: bytes):
  def fn(example):
    example.features.feature["turns/role"].bytes_list.value.append(role)
    example.features.feature["turns/content"].bytes_list.value.append(b"x")
  return fn


SHARD = re.escape(TRAIN)
CORRUPTIONS = {
    "shard_cut_to_1000_bytes": (overwrite(TRAIN, lambda b: b[:1000]),
                                f"{SHARD}: not a readable array_record shard"),
    "shard_cut_at_its_first_block": (overwrite(TRAIN, lambda b: b[:65536]),
                                     f"{SHARD}: not a readable array_record shard"),
    "shard_cut_by_10_bytes": (overwrite(TRAIN, lambda b: b[:-10]),
                              f"{SHARD}: not a readable array_record shard"),
    "shard_emptied": (overwrite(TRAIN, lambda b: b""), f"{SHARD}: not a readable array_record"),
    "shard_random_bytes": (overwrite(TRAIN, lambda b: random.Random(0).randbytes(len(b))),
                           f"{SHARD}: not a readable array_record shard"),
    "shard_deleted": (lambda path: os.remove(os.path.join(path, TRAIN)),
                      f"{SHARD}: not a readable .*No such file"),
    "shard_bytes_flipped": (overwrite(TRAIN, lambda b: flip(b, 1000, 64)),
                            rf"{SHARD}: record \d+: unreadable: .*hash mismatch"),
    "record_not_an_example": (rewrite_record(5, lambda ex: b"\xff\x01 not a proto"),
                              f"{SHARD}: record 5: unreadable: DecodeError"),
    "record_without_a_field": (rewrite_record(5, drop("single_turn_prompt")),
                               f"{SHARD}: record 5: single_turn_prompt: missing"),
    "record_metadata_not_json": (rewrite_record(5, set_text("single_turn_metadata", b"{x")),
                                 f"{SHARD}: record 5: single_turn_metadata: invalid JSON"),
    "record_text_not_utf8": (rewrite_record(5, set_text("single_turn_prompt", b"\xff\xfe")),
                             f"{SHARD}: record 5: single_turn_prompt: invalid UTF-8"),
    "record_unknown_role": (rewrite_record(5, add_turn(b"bot")),
                            rf"{SHARD}: record 5: turns\[0\].role: 'bot' is not one of"),
    "info_not_json": (overwrite("dataset_info.json", lambda b: b[:-20]),
                      "dataset_info.json: unreadable, rebuild the dataset"),
    "info_counts_more_records": (edit_json("dataset_info.json", set_shard_length("30")),
                                 rf"{SHARD}: holds 16 records, but dataset_info.json says 30 "
                                 r"\(splits\[train\].shardLengths\[0\]\)"),
    "info_counts_fewer_records": (edit_json("dataset_info.json", set_shard_length("10")),
                                  rf"{SHARD}: holds 16 records, but dataset_info.json says 10"),
    "info_count_not_a_number": (edit_json("dataset_info.json", set_shard_length("x")),
                                "dataset_info.json: not a dataset description.*shardLengths"),
    "info_splits_not_a_list": (edit_json("dataset_info.json", lambda i: i.update(splits=5)),
                               "dataset_info.json: not a dataset description.*splits"),
    "features_not_json": (overwrite("features.json", lambda b: b"\x00garbage"),
                          "features.json: unreadable, rebuild the dataset"),
    "info_deleted": (lambda path: os.remove(os.path.join(path, "dataset_info.json")),
                     "no dataset at"),
}


def read_everything(data_dir: str, prefetch: int) -> int:
  batches = loader.make_loader(data_dir, "collabllm", "train", 2, shuffle=False, num_epochs=1,
                               process_index=0, process_count=1, prefetch=prefetch)
  return sum(len(b["line"]) for b in batches)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_damaged_dataset_is_reported_by_file_record_and_field(kind, good_dataset, tmp_path):
  mutate, match = CORRUPTIONS[kind]
  data_dir = str(tmp_path / "data")
  shutil.copytree(good_dataset[0], data_dir)
  assert read_everything(data_dir, prefetch=0) == 16
  mutate(builders.dataset_dir(data_dir, "collabllm"))
  # prefetch: the error crosses grain's reader thread unchanged.
  with pytest.raises((loader.DataError, FileNotFoundError), match=match):
    read_everything(data_dir, prefetch=2)


# ------------------------------------------------------------------------------------------------
# A build killed half-way.
# ------------------------------------------------------------------------------------------------


def test_sigkilled_build_leaves_no_dataset_and_its_debris_is_removed(good_dataset, tmp_path):
  data_dir, parent = str(tmp_path / "data"), str(tmp_path / "data" / "collabllm")
  shutil.copytree(good_dataset[0], data_dir)
  before = tree(data_dir)
  big = write_jsonl(tmp_path / "big.jsonl", [line(i=i) for i in range(40_000)])
  cli = subprocess.Popen([sys.executable, "-m", "collab_rl.data", "prepare", "--task",
                          "collabllm", "--input", big, "--data_dir", data_dir], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 120
    while not [n for n in os.listdir(parent) if n.startswith(".")]:  # the build has begun
      assert cli.poll() is None and time.monotonic() < deadline
      time.sleep(0.01)
    time.sleep(random.Random(9).uniform(0.0, 1.0))  # reading, checking or writing records
  finally:
    cli.send_signal(signal.SIGKILL)
    assert cli.wait(timeout=60) == -signal.SIGKILL
  debris = [n for n in os.listdir(parent) if n.startswith(".collabllm.incomplete.")]
  assert len(debris) == 1 and sorted(os.listdir(parent)) == [debris[0], "1.0.0"]
  assert {k: v for k, v in tree(data_dir).items() if not k.startswith("collabllm/.")} == before
  small = write_jsonl(tmp_path / "small.jsonl", [line(i=i) for i in range(10)])
  builders.prepare_collabllm(small, data_dir)  # the next build cleans up after the dead one
  assert os.listdir(parent) == ["1.0.0"]
  assert len(loader.data_source(data_dir, "collabllm", "train")) == 8


# ------------------------------------------------------------------------------------------------
# Determinism.
# ------------------------------------------------------------------------------------------------


def test_the_same_dataset_built_twice_is_byte_identical(tmp_path):
  src = write_jsonl(tmp_path / "in.jsonl", [line(i=i) for i in range(30)])
  built = []
  for copy in ("a", "b"):
    data_dir = str(tmp_path / copy)
    builders.prepare_task("ambig_math", data_dir, {"train": 40, "validation": 8})
    builders.prepare_collabllm(src, data_dir)
    built.append(tree(data_dir))
  assert built[0] == built[1] and len(built[0]) >= 10
