"""grain pipelines over the prepared array_record datasets, sharded by JAX process.

Order of operations: shuffle (seeded, reshuffled every epoch) -> repeat -> take every
`process_count`-th record from `process_index` -> batch. The shuffle is global and identical in
every process, so the processes' batches are disjoint slices of one global batch sequence: the
data a run sees does not depend on how many hosts it runs on. The iterator's state is a small
JSON dict (`get_state`/`set_state`), which is what the checkpoint stores to resume exactly.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from array_record.python import array_record_module
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from collab_rl.data import builders
from collab_rl.data import collabllm

intent_from_batch = builders.intent_from_batch  # batch of task records -> Intent


class DataError(ValueError):
  """A prepared dataset that does not read back as written: names the file, record and field."""


# Datasets that a job writes rather than `python -m collab_rl.data prepare`: the job's command.
WRITTEN_BY = {
    "mr_candidates": ("the data engine: `python -m collab_rl.main --config "
                      "experiments/data_engine.py --config.init_from=<policy run>/checkpoints "
                      "--config.data_dir={data_dir} --workdir <its run directory>`"),
}


def missing_hint(data_dir: str, name: str) -> str:
  """How to make dataset `name` in `data_dir`: its job, else the `prepare` command."""
  if name in WRITTEN_BY:
    return "write it with " + WRITTEN_BY[name].format(data_dir=data_dir)
  return f"run `python -m collab_rl.data prepare --task {name} --data_dir {data_dir}` first"


def _builder(data_dir: str, name: str) -> tfds.core.DatasetBuilder:
  path = builders.dataset_dir(data_dir, name)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"no dataset at {path}; {missing_hint(data_dir, name)}")
  for file in ("dataset_info.json", "features.json"):  # tfds's own errors name neither
    try:
      with open(os.path.join(path, file), encoding="utf-8") as f:
        json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or UTF-8
      raise DataError(f"{path}/{file}: unreadable, rebuild the dataset: {e}") from None
  # Read from the files alone: no builder class, task module or TensorFlow needed.
  try:
    return tfds.builder_from_directory(path)
  except Exception as e:  # noqa: BLE001  (whatever tfds's parsers raise)
    raise DataError(f"{path}/dataset_info.json: not a dataset description: {e!r}") from e


def _check_shards(split: tfds.core.SplitInfo) -> list[tuple[str, int]]:
  """(file, records) of each shard, each opened and counted against dataset_info.json (a
  shorter shard would otherwise fail mid-epoch, a longer one lose records silently)."""
  shards = [(os.fspath(p), int(n)) for p, n in zip(split.filepaths, split.shard_lengths)]
  for i, (path, n) in enumerate(shards):
    try:
      reader = array_record_module.ArrayRecordReader(path)
      count = reader.num_records()
      reader.close()
    except Exception as e:  # noqa: BLE001  (the C++ reader raises RuntimeError for anything)
      raise DataError(f"{path}: not a readable array_record shard: {e!r}") from None
    if count != n:
      raise DataError(f"{path}: holds {count} records, but dataset_info.json says {n} "
                      f"(splits[{split.name}].shardLengths[{i}])")
  return shards


class Source:
  """A split's records as tfds decodes them; a record that cannot be read raises DataError naming
  its shard file and its index in that file."""

  def __init__(self, source, shards: list[tuple[str, int]]):
    self._source, self._files = source, [path for path, _ in shards]
    self._starts = np.cumsum([0] + [n for _, n in shards])

  def __len__(self) -> int:
    return len(self._source)

  def where(self, i: int) -> str:
    k = int(np.searchsorted(self._starts, i, side="right")) - 1
    return f"{self._files[k]}: record {i - self._starts[k]}"

  def __getitem__(self, i: int) -> Any:
    return self.__getitems__([i])[0]

  def __getitems__(self, indices: list[int]) -> list[Any]:
    if any(not 0 <= i < len(self) for i in indices):
      raise IndexError(f"record indices {indices} out of range [0, {len(self)})")
    try:
      return self._source.__getitems__(indices)
    except Exception:  # noqa: BLE001  find the record at fault, to name it
      for i in indices:
        try:
          self._source.__getitems__([i])
        except Exception as e:  # noqa: BLE001
          raise DataError(f"{self.where(i)}: unreadable: {e!r}") from None
      raise


def data_source(data_dir: str, name: str, split: str) -> Source:
  """Random-access records of a split (decoded to numpy / bytes), its shards checked first."""
  b = _builder(data_dir, name)
  if split not in b.info.splits:
    raise ValueError(f"{name} in {data_dir} has no split {split!r}; it has "
                     f"{sorted(b.info.splits)}")
  shards = _check_shards(b.info.splits[split])
  return Source(b.as_data_source(split=split), shards)


def metadata(data_dir: str, name: str) -> dict[str, Any]:
  """What the dataset was built from (task, sizes, seeds, simulator config or source file)."""
  return dict(_builder(data_dir, name).info.metadata or {})


def read_batch(source, text: bool, indices_B: np.ndarray) -> dict[str, Any]:
  """Records at `indices_B`, batched: arrays stacked; for text records, the numbers stacked and
  everything else (strings, metadata dicts, turn lists) kept as lists."""
  indices = [int(i) for i in indices_B]
  records, decoded = source.__getitems__(indices), []
  for i, r in zip(indices, records):
    # tfds decodes a feature absent from the stored example as None, which nothing downstream
    # expects; a damaged text record is checked as its source line was.
    absent = [k for k, v in r.items() if v is None]
    try:
      if absent:
        raise ValueError(f"{absent[0]}: missing from the stored record")
      if text:
        r = collabllm.decode(r)
    except ValueError as e:
      raise DataError(f"{source.where(i)}: {e}") from None
    decoded.append(r)
  records = decoded
  out = {}
  for k in records[0]:
    values = [r[k] for r in records]
    out[k] = values if text and not isinstance(values[0], int) else np.stack(values)
  return out


def make_loader(data_dir: str, name: str, split: str, global_batch_size: int, *, seed: int = 0,
                shuffle: bool = True, num_epochs: int | None = None,
                process_index: int | None = None,
                process_count: int | None = None, prefetch: int = 2) -> grain.IterDataset:
  """Batches of `global_batch_size // process_count` records for this process.

  Task records come as {feature: [b, ...] array} (see `intent_from_batch`); CollabLLM records as
  {field: list} with str prompt/completion, dict metadata and a list of {role, content} turns.
  `num_epochs=None` repeats forever. Only whole global batches are made, so that every process
  takes the same number of steps. `prefetch` batches are read ahead by one background thread
  (0: read in the caller's thread).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                     f"{process_count} processes")
  source = data_source(data_dir, name, split)
  if len(source) < global_batch_size:
    raise ValueError(f"{name}/{split} has {len(source)} records, fewer than one global batch "
                     f"of {global_batch_size}")
  # grain orders, shards and batches record indices; each batch is then read with one batched
  # array_record call, ~8x faster than grain fetching (and tfds decoding) records one by one.
  ds = grain.MapDataset.range(len(source))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if num_epochs is not None:
    ds = ds[:len(ds) // global_batch_size * global_batch_size]
  ds = ds[process_index::process_count].batch(global_batch_size // process_count,
                                              drop_remainder=True)
  text = name == builders.CollabLLM.name
  ds = ds.map(functools.partial(read_batch, source, text))
  # One reader thread suffices for batched reads; grain's default (16 threads, 500 elements
  # ahead) would read hundreds of batches ahead of a resumed or short-lived iterator.
  options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
  return ds.to_iter_dataset(options)



def records_of(batch: dict[str, Any], source: str) -> list[dict[str, Any]]:
  """A batch of CollabLLM records (a dict of per-field lists, as `make_loader` gives them) as
  one dict per record, each naming its `source` and `line` (what errors about a record cite)."""
  n = len(batch[collabllm.PROMPT])
  return [{**{k: (v[i].item() if isinstance(v, np.ndarray) else v[i]) for k, v in batch.items()},
           "source": source} for i in range(n)]


def first_records(data_dir: str, split: str, n: int) -> list[dict[str, Any]]:
  """The first `n` CollabLLM records of a split, in file order (fixed evaluation episodes)."""
  name = builders.CollabLLM.name
  src = data_source(data_dir, name, split)
  if len(src) < n:
    raise ValueError(f"{name}/{split} in {data_dir} has {len(src)} records, fewer than the {n} "
                     "asked for")
  return records_of(read_batch(src, True, np.arange(n)), os.path.join(data_dir, name, split))
