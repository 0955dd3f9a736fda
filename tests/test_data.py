"""collab_rl.data: TFDS builders (array_record, no TensorFlow), record checks, loaders, CLI."""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl.data import builders, collabllm, loader
from collab_rl.tasks import registry

SIZES = {"train": 64, "validation": 16, "test": 16}


@pytest.fixture(scope="module")
def math_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("math"))
  builders.prepare_task("ambig_math", data_dir, SIZES)
  return data_dir


def read_split(data_dir, name, split):
  """Every record of a split, in stored order, stacked into one batch."""
  source = loader.data_source(data_dir, name, split)
  records = [source[i] for i in range(len(source))]
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


def assert_intents_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------------
# Task datasets.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ambig_math", "doc_edit", "code_spec"])
def test_task_dataset_round_trips_to_sampled_intents(name, math_dir, tmp_path):
  pytest.importorskip(registry.TASKS[name][0])
  task = registry.make_task(name)
  data_dir = math_dir if name == "ambig_math" else str(tmp_path)
  if name != "ambig_math":
    builders.prepare_task(name, data_dir, SIZES)
  assert "tensorflow" not in sys.modules  # written and read without TensorFlow
  for split, n in SIZES.items():
    batch = read_split(data_dir, name, split)
    np.testing.assert_array_equal(batch[builders.EPISODE_ID], np.arange(n))
    # Episodes are the first n rows of the split's first chunk, sampled with its fixed seed.
    key = jax.random.fold_in(jax.random.key(builders.SPLIT_SEEDS[split]), 0)
    expected = jax.tree_util.tree_map(lambda x: x[:n], task.sample_intents(key, builders.CHUNK))
    assert_intents_equal(loader.intent_from_batch(task, batch), expected)
  meta = loader.metadata(data_dir, name)
  assert meta["task"] == name and meta["sizes"] == SIZES


def test_task_dataset_is_deterministic_and_splits_differ(math_dir, tmp_path):
  builders.prepare_task("ambig_math", str(tmp_path), {"train": 16, "validation": 16})
  again = read_split(str(tmp_path), "ambig_math", "train")
  first = read_split(math_dir, "ambig_math", "train")
  for k in again:  # a smaller build is a prefix of a bigger one
    np.testing.assert_array_equal(again[k], first[k][:16])
  val = read_split(math_dir, "ambig_math", "validation")
  assert not np.array_equal(val["values"], first["values"][:16])


class ExtraTask(registry.task_class("ambig_math")):
  """Nested `extra` leaves of several dtypes, to check their names and round trip."""
  name = "extra_task"

  def sample_extra(self, key, values_BxK):
    b = values_BxK.shape[0]
    return {"inputs": jax.random.randint(key, (b, 2, 3), 0, 9),
            "scale": (values_BxK[:, 0] / 2.0, jnp.ones((b,), bool))}


class ExtraEpisodes(builders.TaskEpisodes, skip_registration=True):
  name = "extra_task"

  def make_task(self):
    return ExtraTask()


class FailingEpisodes(ExtraEpisodes, skip_registration=True):
  """Dies after some records are written: what a full disk or a killed job looks like."""

  def _generate_examples(self, split, n):
    yield from itertools.islice(super()._generate_examples(split, n), 5)
    raise RuntimeError("disk full")


def test_extra_leaves_round_trip_and_failed_build_keeps_old(tmp_path):
  data_dir = str(tmp_path)
  path = builders.prepare(ExtraEpisodes, data_dir, sizes={"train": 8})
  task = ExtraTask()
  assert set(builders.intent_spec(task)) == {"values", "missing", "ambiguous", "instructed",
                                             "extra.inputs", "extra.scale.0", "extra.scale.1"}
  key = jax.random.fold_in(jax.random.key(0), 0)
  expected = jax.tree_util.tree_map(lambda x: x[:8], task.sample_intents(key, builders.CHUNK))
  got = loader.intent_from_batch(task, read_split(data_dir, "extra_task", "train"))
  assert_intents_equal(got, expected)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)

  before = sorted(os.listdir(path))
  with pytest.raises(RuntimeError, match="disk full"):
    builders.prepare(FailingEpisodes, data_dir, sizes={"train": 8, "test": 8})
  assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no leftovers
  assert sorted(os.listdir(path)) == before
  assert len(loader.data_source(data_dir, "extra_task", "train")) == 8


# ------------------------------------------------------------------------------------------------
# CollabLLM records.
# ------------------------------------------------------------------------------------------------


def good_record(i):
  r = {"single_turn_prompt": f"Solve problem {i} — é", "single_turn_completion": f"{i}",
       "single_turn_metadata": {"source": "math", "level": i}, "other": [1, 2]}
  if i % 2:
    r["turns"] = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a?"}]
  return r


def write_jsonl(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
  return str(path)


def test_collabllm_builds_and_reads_back(tmp_path):
  lines = [good_record(i) for i in range(10)]
  src = write_jsonl(tmp_path / "in.jsonl", lines[:4] + [""] + lines[4:])  # blank line skipped
  data_dir = str(tmp_path / "data")
  builders.prepare_collabllm(src, data_dir, validation_fraction=0.2, test_fraction=0.2)
  got = {}
  for split, n in {"train": 6, "validation": 2, "test": 2}.items():
    source = loader.data_source(data_dir, "collabllm", split)
    assert len(source) == n
    for i in range(n):
      r = collabllm.decode(source[i])
      got[r["line"]] = r
  assert sorted(got) == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
  for line, r in got.items():
    want = lines[line - 1 if line < 5 else line - 2]
    assert r["single_turn_prompt"] == want["single_turn_prompt"]
    assert r["single_turn_completion"] == want["single_turn_completion"]
    assert r["single_turn_metadata"] == want["single_turn_metadata"]
    assert r["turns"] == want.get("turns", [])
  meta = loader.metadata(data_dir, "collabllm")
  assert meta["sizes"] == {"train": 6, "validation": 2, "test": 2}

  batch = next(iter(loader.make_loader(data_dir, "collabllm", "train", 4, process_count=1,
                                       process_index=0)))
  assert all(isinstance(p, str) for p in batch["single_turn_prompt"])
  assert batch["line"].shape == (4,) and len(batch["turns"]) == 4


GOOD = json.dumps(good_record(0))
# Malformed records, damaged datasets and killed builds: tests/reliability/test_bad_data.py.


def test_parse_jsonl_skips_blank_lines_and_reads_crlf():
  good = GOOD.encode()
  records = collabllm.parse_jsonl(b"\n" + good + b"\r\n" + good, path="f.jsonl")
  assert [r.line for r in records] == [2, 3]


# ------------------------------------------------------------------------------------------------
# Loader: process sharding and resumable state.
# ------------------------------------------------------------------------------------------------


def ids(batch):
  return batch[builders.EPISODE_ID].tolist()


def test_processes_read_disjoint_slices_of_one_global_batch(math_dir):
  make = lambda i, n: iter(loader.make_loader(math_dir, "ambig_math", "train", 8, seed=3,
                                              process_index=i, process_count=n))
  p0, p1, whole = make(0, 2), make(1, 2), make(0, 1)
  seen = []
  for _ in range(8):  # one epoch: 64 records in global batches of 8
    a, b, w = next(p0), next(p1), next(whole)
    assert len(ids(a)) == len(ids(b)) == 4 and not set(ids(a)) & set(ids(b))
    assert sorted(ids(a) + ids(b)) == sorted(ids(w))
    seen += ids(a) + ids(b)
  assert sorted(seen) == list(range(64))
  assert ids(next(whole)) != ids(next(make(0, 1)))  # the next epoch is reshuffled
  intent = loader.intent_from_batch(registry.make_task("ambig_math"), a)
  assert intent.values_BxK.shape == (4, 5) and intent.missing_BxK.dtype == bool


def test_iterator_state_resumes_exactly(math_dir):
  make = lambda: iter(loader.make_loader(math_dir, "ambig_math", "train", 8, seed=1,
                                         process_index=1, process_count=2))
  it = make()
  for _ in range(10):  # past the end of the first epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_finite_loader_makes_whole_global_batches(math_dir):
  batches = [list(loader.make_loader(math_dir, "ambig_math", "validation", 6, shuffle=False,
                                     num_epochs=1, process_index=i, process_count=2))
             for i in range(2)]
  assert [len(b) for b in batches] == [2, 2]  # 16 records -> 2 global batches of 6
  assert ids(batches[0][0]) == [0, 2, 4] and ids(batches[1][0]) == [1, 3, 5]
  with pytest.raises(ValueError, match="multiple of the 2 processes"):
    loader.make_loader(math_dir, "ambig_math", "train", 7, process_index=0, process_count=2)


# ------------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------------


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "collab_rl.data", "prepare", *args],
                        capture_output=True, text=True, timeout=120)


def test_cli_builds_a_task_dataset(tmp_path):
  out = run_cli("--task", "ambig_math", "--data_dir", str(tmp_path), "--num_train", "32",
                "--num_validation", "8", "--num_test", "0")
  assert out.returncode == 0, out.stderr
  assert f"wrote {tmp_path}/ambig_math/1.0.0: train=32, validation=8" in out.stdout


def test_cli_bad_record_is_one_line_without_traceback(tmp_path):
  src = write_jsonl(tmp_path / "bad.jsonl", [GOOD, json.dumps({**good_record(0),
                                                                "single_turn_prompt": "  "})])
  out = run_cli("--task", "collabllm", "--input", src, "--data_dir", str(tmp_path / "d"))
  assert out.returncode == 1
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == f"error: {src}:2: single_turn_prompt: empty"
  assert not os.path.exists(tmp_path / "d" / "collabllm" / "1.0.0")
