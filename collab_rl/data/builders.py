"""TFDS builders for the verifiable tasks' episodes and for CollabLLM records, in array_record.

tensorflow-datasets 4.9 writes array_record without TensorFlow: examples are serialized with its
vendored `tf.train.Example` protos (`tensorflow_datasets/proto`), written by array_record's own
writer, and read back by `as_data_source()` with a numpy parser. So these are ordinary
`GeneratorBasedBuilder`s and the files are ordinary TFDS datasets (`tfds.builder_from_directory`
reads them without this module).

`prepare` is the only way in: it builds into a hidden temporary directory next to the target and
renames it into place once every record is checked and written, so a failed build leaves nothing
that looks like a dataset and keeps the previous one.

Task episodes: split s holds the first n episodes of the chunks
`task.sample_intents(fold_in(key(SPLIT_SEEDS[s]), c), CHUNK)`, c = 0, 1, ...: a fixed chunk size
makes episode i the same whatever the split size, so a bigger build extends a smaller one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import shutil
import socket
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from collab_rl import sharding as sharding_lib
from collab_rl.data import collabllm
from collab_rl.tasks import registry
from collab_rl.tasks import slots as slots_lib

VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
CHUNK = 1024  # episodes per sample_intents call; part of the data's definition (see above)
DEFAULT_TASK_SIZES = {"train": 100_000, "validation": 2_000, "test": 2_000}
EPISODE_ID = "episode_id"

# ------------------------------------------------------------------------------------------------
# Intents <-> flat named arrays (one record is one episode).
# ------------------------------------------------------------------------------------------------


def _extra_names(extra: Any) -> list[tuple[str, Any]]:
  """Stable feature names for the leaves of `Intent.extra`: `extra`, or `extra.<path>`."""
  leaves = jax.tree_util.tree_flatten_with_path(extra)[0]
  return [("extra." + sharding_lib.path_str(p).replace("/", ".") if p else "extra", x)
          for p, x in leaves]


@functools.lru_cache(maxsize=32)
def _layout(task: slots_lib.SlotTask) -> tuple[dict[str, jax.ShapeDtypeStruct], Any]:
  """(per-episode shape and dtype by feature name, treedef of `extra`), traced once per task."""
  b = 2
  shapes = jax.eval_shape(lambda: task.sample_intents(jax.random.key(0), b))
  named = [("values", shapes.values_BxK), ("missing", shapes.missing_BxK),
           ("ambiguous", shapes.ambiguous_B), ("instructed", shapes.instructed_B)
           ] + _extra_names(shapes.extra)
  spec = {}
  for name, s in named:
    numeric = np.issubdtype(s.dtype, np.number) or s.dtype == bool
    if not s.shape or s.shape[0] != b or not numeric:
      raise ValueError(f"task {task.name}: intent leaf {name} ({s.shape}, {s.dtype}) must be a "
                       "numeric array with one row per episode to be stored")
    spec[name] = jax.ShapeDtypeStruct(s.shape[1:], s.dtype)
  return spec, jax.tree_util.tree_structure(shapes.extra)


def intent_spec(task: slots_lib.SlotTask) -> dict[str, jax.ShapeDtypeStruct]:
  """Per-episode shape and dtype of every intent array, by feature name (no sampling done)."""
  return dict(_layout(task)[0])


def flatten_intent(intent: slots_lib.Intent) -> dict[str, np.ndarray]:
  """An Intent of B episodes -> {feature name: [B, ...] numpy array}."""
  intent = jax.device_get(intent)
  out = {"values": intent.values_BxK, "missing": intent.missing_BxK,
         "ambiguous": intent.ambiguous_B}
  if intent.instructed_B is not None:
    out["instructed"] = intent.instructed_B
  out.update(_extra_names(intent.extra))
  return {k: np.asarray(v) for k, v in out.items()}


def intent_from_batch(task: slots_lib.SlotTask, batch: Mapping[str, Any]) -> slots_lib.Intent:
  """A batch of task records (numpy, leading batch axis) -> the task's Intent pytree."""
  spec, treedef = _layout(task)
  # `instructed` (the proactive instruction) is optional: datasets written before it existed
  # read as uninstructed episodes.
  absent = [n for n in spec if n not in batch and n != "instructed"]
  if absent:
    raise ValueError(f"task {task.name}: the batch lacks {absent}; was it built for this task?")

  def get(name):
    x = np.asarray(batch[name])
    if x.shape[1:] != spec[name].shape:
      raise ValueError(f"task {task.name}: {name} has per-episode shape {x.shape[1:]}, the task "
                       f"makes {spec[name].shape}; rebuild the dataset")
    return x.astype(spec[name].dtype, copy=False)

  extra_names = [n for n in spec if n.startswith("extra")]
  extra = jax.tree_util.tree_unflatten(treedef, [get(n) for n in extra_names])
  return slots_lib.Intent(get("values"), get("missing"), get("ambiguous"), extra,
                          get("instructed") if "instructed" in batch else None)


def sample_chunk(task: slots_lib.SlotTask, split: str, chunk: int) -> slots_lib.Intent:
  """Episodes [chunk * CHUNK, (chunk + 1) * CHUNK) of a split."""
  key = jax.random.fold_in(jax.random.key(SPLIT_SEEDS[split]), chunk)
  return task.sample_intents(key, CHUNK)


# ------------------------------------------------------------------------------------------------
# Builders.
# ------------------------------------------------------------------------------------------------


def _check_sizes(sizes: Mapping[str, int]) -> dict[str, int]:
  unknown = set(sizes) - set(SPLITS)
  if unknown:
    raise ValueError(f"unknown splits {sorted(unknown)}; known: {list(SPLITS)}")
  sizes = {s: int(sizes.get(s, 0)) for s in SPLITS}
  if any(n < 0 for n in sizes.values()) or not any(sizes.values()):
    raise ValueError(f"split sizes {sizes} must be >= 0, and not all 0")
  return sizes


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version(VERSION)

  # tfds locates a packaged builder's source with `importlib_resources`, a package it does not
  # depend on (and which is not installed); it only looks there for a download checksums file,
  # which these builders have no use for, so give it the path directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


class TaskEpisodes(_Builder, skip_registration=True):
  """Base of the task builders: the dataset's name is the task's registry name."""

  def __init__(self, *, sizes: Mapping[str, int] | None = None, **kwargs):
    self.sizes = _check_sizes(DEFAULT_TASK_SIZES if sizes is None else sizes)
    super().__init__(**kwargs)

  def make_task(self) -> slots_lib.SlotTask:
    return registry.make_task(self.name)

  def _info(self) -> tfds.core.DatasetInfo:
    task = self.make_task()
    features = {EPISODE_ID: tfds.features.Scalar(np.int64)}
    for name, s in intent_spec(task).items():
      dtype = np.dtype(s.dtype)
      features[name] = (tfds.features.Scalar(dtype) if not s.shape
                        else tfds.features.Tensor(shape=s.shape, dtype=dtype))
    return tfds.core.DatasetInfo(
        builder=self, description=f"Episodes (hidden intents) of the {task.name} task.",
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        metadata=tfds.core.MetadataDict(task=task.name, sizes=self.sizes, seeds=SPLIT_SEEDS,
                                        chunk=CHUNK, sim=dataclasses.asdict(task.sim)))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s, n) for s, n in self.sizes.items() if n}

  def _generate_examples(self, split: str, n: int):
    task = self.make_task()
    for c in range(-(-n // CHUNK)):
      flat = flatten_intent(sample_chunk(task, split, c))
      for i in range(min(CHUNK, n - c * CHUNK)):
        episode = c * CHUNK + i
        yield episode, {EPISODE_ID: episode, **{k: v[i] for k, v in flat.items()}}


class AmbigMath(TaskEpisodes):
  name = "ambig_math"


class DocEdit(TaskEpisodes):
  name = "doc_edit"


class CodeSpec(TaskEpisodes):
  name = "code_spec"


TASK_BUILDERS = {b.name: b for b in (AmbigMath, DocEdit, CodeSpec)}


class CollabLLM(_Builder):
  """CollabLLM-format records from a JSONL file, split by a fixed-seed permutation.

  Records are read and checked when the builder is made, before anything is written.
  """

  name = "collabllm"
  SPLIT_SEED = 0

  def __init__(self, *, input_path: str | None = None,
               max_chars: int = collabllm.DEFAULT_MAX_CHARS, validation_fraction: float = 0.1,
               test_fraction: float = 0.1, **kwargs):
    if not (0 <= validation_fraction and 0 <= test_fraction
            and validation_fraction + test_fraction < 1):
      raise ValueError(f"validation_fraction={validation_fraction} and test_fraction="
                       f"{test_fraction} must be >= 0 and sum to less than 1")
    if max_chars <= 0:
      raise ValueError(f"max_chars={max_chars} must be positive")
    self.input_path, self.max_chars = input_path, max_chars
    self.fractions = {"validation": validation_fraction, "test": test_fraction}
    self.splits: dict[str, list[collabllm.Record]] = {}
    self.sha256 = None
    if input_path is not None:
      with open(input_path, "rb") as f:
        data = f.read()
      self.sha256 = hashlib.sha256(data).hexdigest()  # of the very bytes that are written
      self.splits = self._split(collabllm.parse_jsonl(data, path=input_path, max_chars=max_chars))
    super().__init__(**kwargs)

  def _split(self, records: list[collabllm.Record]) -> dict[str, list[collabllm.Record]]:
    n = len(records)
    order = np.random.default_rng(self.SPLIT_SEED).permutation(n)
    n_test = int(n * self.fractions["test"])
    n_val = int(n * self.fractions["validation"])
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    # File order within a split: reading a split back reads the file's records in order.
    return {s: [records[i] for i in sorted(idx)] for s, idx in parts.items() if len(idx)}

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    features = tfds.features.FeaturesDict({
        collabllm.LINE: tfds.features.Scalar(np.int64), collabllm.PROMPT: text,
        collabllm.COMPLETION: text, collabllm.METADATA: text,
        collabllm.TURNS: tfds.features.Sequence({"role": text, "content": text})})
    metadata = None
    if self.input_path is not None:
      metadata = tfds.core.MetadataDict(
          source=os.path.abspath(self.input_path), sha256=self.sha256, max_chars=self.max_chars,
          fractions=self.fractions, split_seed=self.SPLIT_SEED,
          sizes={s: len(r) for s, r in self.splits.items()})
    return tfds.core.DatasetInfo(builder=self, description="CollabLLM-format records.",
                                 features=features, disable_shuffling=True, metadata=metadata)

  def _split_generators(self, dl_manager):
    del dl_manager
    if self.input_path is None:
      raise ValueError("collabllm: building needs input_path (a JSONL file)")
    return {s: self._generate_examples(r) for s, r in self.splits.items()}

  def _generate_examples(self, records: list[collabllm.Record]):
    for r in records:
      yield r.line, r.features()


# ------------------------------------------------------------------------------------------------
# Atomic preparation.
# ------------------------------------------------------------------------------------------------


def dataset_dir(data_dir: str, name: str) -> str:
  return os.path.join(os.path.abspath(data_dir), name, VERSION)


_HOST = socket.gethostname()


def _remove_killed_builds(parent: str, name: str) -> None:
  """Deletes the temporary directories of builds on this host whose process no longer runs: a
  SIGKILLed or OOM-killed build never reaches its own clean-up."""
  pattern = re.compile(rf"\.{re.escape(name)}\.incomplete\.(\d+)@{re.escape(_HOST)}\.[^.]+")
  for entry in os.listdir(parent):
    if (match := pattern.fullmatch(entry)) is None:
      continue
    try:
      os.kill(int(match.group(1)), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    except PermissionError:  # alive, and someone else's
      pass


def prepare(builder_cls: type[tfds.core.DatasetBuilder], data_dir: str, **kwargs) -> str:
  """Builds `builder_cls(**kwargs)` into `data_dir/<name>/<version>`, replacing any earlier build
  only once the new one is complete. Returns that directory."""
  final = dataset_dir(data_dir, builder_cls.name)
  parent = os.path.dirname(final)
  made_parent = not os.path.isdir(parent)
  os.makedirs(parent, exist_ok=True)
  # Same filesystem as the target, so the final rename is atomic; the leading dot keeps a
  # crashed build's leftovers from looking like a dataset, and the pid@host lets the next build
  # remove them once their process is gone.
  _remove_killed_builds(parent, builder_cls.name)
  tmp = tempfile.mkdtemp(prefix=f".{builder_cls.name}.incomplete.{os.getpid()}@{_HOST}.",
                         dir=parent)
  try:
    builder = builder_cls(data_dir=tmp, file_format=tfds.core.FileFormat.ARRAY_RECORD, **kwargs)
    # try_download_gcs would ask TFDS's public bucket for a prebuilt copy of a same-named dataset.
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"),
                                 download_config=config)
    built = os.path.join(tmp, builder_cls.name, VERSION)
    previous = os.path.join(tmp, "previous")
    if os.path.exists(final):
      os.rename(final, previous)
    try:
      os.rename(built, final)
    except OSError:
      if os.path.exists(previous):
        os.rename(previous, final)
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if made_parent and not os.listdir(parent):
      os.rmdir(parent)
    raise
  shutil.rmtree(tmp, ignore_errors=True)  # the previous build, and tfds's empty downloads dir
  return final


def prepare_task(name: str, data_dir: str, sizes: Mapping[str, int] | None = None) -> str:
  if name not in TASK_BUILDERS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASK_BUILDERS)}")
  return prepare(TASK_BUILDERS[name], data_dir, sizes=sizes)


def prepare_collabllm(input_path: str, data_dir: str, **kwargs) -> str:
  return prepare(CollabLLM, data_dir, input_path=input_path, **kwargs)
