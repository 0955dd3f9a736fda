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

from typing import Any, NamedTuple

import jax
import numpy as np

from collab_rl import rewards
from collab_rl import sharding as sharding_lib
from collab_rl import text_scores
from collab_rl.data import loader as loader_lib
from collab_rl.tasks import text as text_lib

RECORDS = "collabllm"  # the prepared dataset's name (data/builders.py CollabLLM)


def records_of(batch: dict[str, Any], source: str) -> list[dict[str, Any]]:
  """A loader batch (a dict of per-field lists) as one dict per record, each naming its
  `source` and `line` (what errors about a record cite)."""
  n = len(batch["single_turn_prompt"])
  return [{**{k: (v[i].item() if isinstance(v, np.ndarray) else v[i]) for k, v in batch.items()},
           "source": source} for i in range(n)]


def first_records(data_dir: str, split: str, n: int) -> list[dict[str, Any]]:
  """The first `n` records of a split, in file order (fixed evaluation episodes)."""
  src = loader_lib.data_source(data_dir, RECORDS, split)
  if len(src) < n:
    raise ValueError(f"{RECORDS}/{split} in {data_dir} has {len(src)} records, fewer than the "
                     f"{n} an evaluation plays")
  return records_of(loader_lib.read_batch(src, True, np.arange(n)),
                    f"{data_dir}/{RECORDS}/{split}")


def make_scorer(config, task: text_lib.TextTask, mesh=None) -> text_scores.TextScorer:
  """The scorer of `config` (its judge loaded when `config.judge.folder` is set)."""
  j = config.judge
  judge = None
  if j.folder:
    judge = text_scores.load_judge(j.folder, tuple(j.ratings.split(",")), min_mass=j.min_mass,
                                   mesh=mesh)
  return text_scores.TextScorer(task, rewards.RewardConfig.from_config(config.reward), judge,
                                metric=config.metric)


def check(config) -> None:
  """What a language-tier config must have, before anything loads or compiles."""
  for name in ("data_dir",):
    if not config.get(name):
      raise ValueError(f"config.{name} is not set: the language tier reads prepared CollabLLM "
                       "records from it (python -m collab_rl.data prepare --task collabllm)")
  loader_lib.metadata(config.data_dir, RECORDS)  # a missing dataset names its prepare command


class World(NamedTuple):
  task: text_lib.TextTask
  user_params: Any
  scorer: text_scores.TextScorer
  train: Any  # grain iterator of record batches (get_state / set_state)
  source: str
  eval_records: list[dict[str, Any]]
  mesh: Any

  def encode(self, records) -> text_lib.TextIntent:
    """Records -> the task's ids, as global arrays on the mesh."""
    intent = self.task.encode(records)
    return intent if self.mesh is None else sharding_lib.shard_batch(intent, self.mesh)

  def score(self, pending, live_N: np.ndarray, records, kind: str = "mr"
            ) -> tuple[np.ndarray, dict[str, float]]:
    """Rewards of the played conversations `pending` (`text.played` of N rows, on the host or
    device) under reward `kind`: R* (mr, next_turn_ext_int), the task score alone
    (next_turn_ext) or the helpfulness judge; rows not `live_N` are not scored and get 0."""
    conv, _ = sharding_lib.to_host(pending)
    live = np.asarray(live_N, bool)
    conv = jax.tree_util.tree_map(lambda x: x[live], conv)
    stats = {}
    if kind == "helpfulness":
      r, stats = self.scorer.helpfulness(conv, records)
    elif kind == "next_turn_ext":
      r = self.scorer.score(conv, records, with_int=False)[1]["r_ext"]
    else:
      r, _, stats = self.scorer.score(conv, records)
    out = np.zeros(live.shape, np.float32)
    out[live] = r
    return out, stats

  def next_batch(self, group: int = 1) -> tuple[text_lib.TextIntent, list[dict]]:
    """The next train batch (each record `group` times in a row, for group baselines)."""
    records = records_of(next(self.train), self.source)
    records = [r for r in records for _ in range(group)]
    return self.encode(records), records


def build(config, task: text_lib.TextTask, mesh, *, batch: int, seed: int) -> World:
  """The world of a language-tier run: `batch` records per train batch."""
  check(config)
  source = f"{config.data_dir}/{RECORDS}/train"
  train = iter(loader_lib.make_loader(config.data_dir, RECORDS, "train", batch, seed=seed))
  evals = first_records(config.data_dir, "validation", config.eval_batch_size)
  task.encode(evals)  # a record that does not fit its budgets fails before anything compiles
  return World(task, text_lib.load_user_params(task, mesh), make_scorer(config, task, mesh),
               train, source, evals, mesh)

