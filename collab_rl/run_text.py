"""The part of the run scaffold that language-tier runs share: records, the LM user, the scorer.

A language-tier conversation trainer (PPO here, `evaluate` too) plays CollabLLM records
(`config.data_dir`, prepared by `python -m collab_rl.data prepare --task collabllm`) against the
LM user of `config.sim.user_from` and scores them on the host (`text_scores.TextScorer`, with
the judge of `config.judge.folder` where one is set). `World` holds what that takes:

- `train`: a grain iterator over the train split's records (`data/loader.py`: shuffled, split
  by process, its position checkpointed with the train state: `Run.data_state`), `next_batch`
  turning each batch into the task's ids on the mesh (`TextTask.encode`);
- `user_params`: the user's frozen weights, placed on the mesh (never trained, never saved);
- `eval_records`: the first `eval_batch_size` records of the validation split, played greedily
  by every evaluation (the same episodes every time).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from collab_rl import sharding as sharding_lib
from collab_rl import text_scores
from collab_rl.data import loader as loader_lib
from collab_rl.tasks import text as text_lib

RECORDS = "collabllm"  # the prepared dataset's name (data/builders.py CollabLLM)


def check(config) -> None:
  """What a language-tier config must have, before anything loads or compiles."""
  for name in ("data_dir",):
    if not config.get(name):
      raise ValueError(f"config.{name} is not set: the language tier reads prepared CollabLLM "
                       "records from it (python -m collab_rl.data prepare --task collabllm)")
  loader_lib.metadata(config.data_dir, RECORDS)  # a missing dataset names its prepare command


def gather(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every process's records, in process order: the records of a global batch, which the host
  scorer reads by global row (each process reads only its own slice of every batch)."""
  if jax.process_count() == 1:
    return records
  blob = np.frombuffer(json.dumps(records).encode("utf-8"), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64)).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:blob.size] = blob
  blobs = multihost_utils.process_allgather(padded)
  return [r for p, n in enumerate(sizes) for r in json.loads(blobs[p, :n].tobytes())]


class World(NamedTuple):
  task: text_lib.TextTask
  user_params: Any
  scorer: text_scores.TextScorer
  train: Any  # grain iterator of record batches (get_state / set_state)
  source: str
  eval_records: list[dict[str, Any]]
  mesh: Any

  def encode(self, records, key: jax.Array, first_row: int = 0) -> text_lib.TextIntent:
    """This process's records -> the task's ids, as global arrays on the mesh (row i plays
    record `first_row + i` of the global batch), with their openings (written by the LM user
    from `key` when `sim.first_turn = "user"`)."""
    intent = self.task.encode(records, first_row)
    if self.mesh is not None:
      intent = sharding_lib.shard_batch(intent, self.mesh)
    return self.task.open_episodes(self.user_params, intent, key)

  def score(self, pending, live_N: np.ndarray, records, kind: str = "mr"
            ) -> tuple[np.ndarray, dict[str, float]]:
    """`text_scores.score_live` with this world's scorer."""
    return text_scores.score_live(self.scorer, pending, live_N, records, kind)

  def next_batch(self, key: jax.Array, group: int = 1
                 ) -> tuple[text_lib.TextIntent, list[dict]]:
    """The next train batch, each episode `group` times in a row (for group baselines: the
    same opening too), and its records (`intent.row_B` indexes them)."""
    records = loader_lib.records_of(next(self.train), self.source)
    intent = self.encode(records, key, jax.process_index() * len(records))
    if group > 1:
      intent = jax.tree_util.tree_map(lambda x: jnp.repeat(x, group, axis=0), intent)
    return intent, gather(records)

  def eval_intent(self, key: jax.Array) -> text_lib.TextIntent:
    """The evaluation records as ids on the mesh: each process encodes its share of them."""
    n = len(self.eval_records) // jax.process_count()
    first = jax.process_index() * n
    return self.encode(self.eval_records[first:first + n], key, first)


def build(config, task: text_lib.TextTask, mesh, *, batch: int, seed: int) -> World:
  """The world of a language-tier run: `batch` records per train batch."""
  check(config)
  source = f"{config.data_dir}/{RECORDS}/train"
  train = iter(loader_lib.make_loader(config.data_dir, RECORDS, "train", batch, seed=seed))
  evals = loader_lib.first_records(config.data_dir, "validation", config.eval_batch_size)
  task.encode(evals)  # a record that does not fit its budgets fails before anything compiles
  return World(task, text_lib.load_user_params(task, mesh),
               text_scores.from_config(config, task, mesh), train, source, evals, mesh)

