"""The part of the run scaffold that language-tier runs share: records, the LM user, the scorer.

A language-tier conversation trainer (PPO here, `evaluate` too) plays CollabLLM records
(`config.data_dir`, prepared by `python -m collab_rl.data prepare --task collabllm`) against the
LM user of `config.sim.user_from` and scores them on the host (`text_scores.TextScorer`, with
the judge of `config.judge.folder` where one is set). `World` holds what that takes:

- `train`: a grain iterator over the train split's records (`data/loader.py`: shuffled, split
  by process, its position checkpointed with the train state: `Run.data_state`), `next_batch`
  turning each batch into the task's ids on the mesh (`TextTask.encode`);
- `user_params`: the user's frozen weights, placed on the mesh (never trained, never saved);
  none of its own where the user shares the policy's base (`shared_models`, `World.bind`);
- `eval_records`: the first `eval_batch_size` records of the validation split, played greedily
  by every evaluation (the same episodes every time).

One copy of the base. An LM user or judge loaded from the folder the policy starts from
(`init_from_hf`), in a dtype the policy's params hold exactly, holds no weights of its own: it
reads the policy's frozen reference, which is that folder's weights (with adapters the base
inside the train state, models/lora.py; else the trainer's reference copy). At 8B that is 16 GB
of bf16 per model not held twice. The reference is taken from the current params at every use
(`World.bind`), since the train state is donated every update.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from collab_rl import sharding as sharding_lib
from collab_rl import text_scores
from collab_rl.data import loader as loader_lib
from collab_rl.models import hf
from collab_rl.models import lora as lora_lib
from collab_rl.models import transformer
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


def _same_folder(a: str, b: str) -> bool:
  local = lambda p: "://" not in p
  return os.path.realpath(a) == os.path.realpath(b) if local(a) and local(b) else a == b


def shared_models(config, task: text_lib.TextTask) -> dict[str, tuple[str, ...]]:
  """{"user" / "judge": the top-level param names it reads} for the LM user and judge that share
  the policy's frozen reference (see the module docstring); {} where none does."""
  start = config.get("init_from_hf")  # never beside `init_from` (run.model_from_hf refuses it)
  if not start:
    return {}  # the reference is a checkpoint's params or fresh ones, not a folder's
  policy_cfg = transformer.TransformerConfig.from_dict(config.model.to_dict())
  lcfg = lora_lib.LoraConfig.from_dict(config.get("lora") and config.lora.to_dict())
  folders = {"user": task.ucfg.user_from, "judge": config.judge.folder}
  out = {}
  for name, folder in folders.items():
    if not folder or not _same_folder(folder, start):
      continue
    # Laid out as the policy's layers (`model.scan_layers`), as `from_config` builds them.
    cfg = dataclasses.replace(hf.folder_config(folder), scan_layers=policy_cfg.scan_layers)
    shapes = jax.eval_shape(lambda c=cfg: transformer.init_params(transformer.Transformer(c),
                                                                  jax.random.key(0)))
    paths = [sharding_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    # With adapters the base's `trainable` params move: a user reading them would drift.
    trained = [p for p in paths if lcfg.enabled and lora_lib.trained_in_full(p, lcfg)]
    # The reference holds the folder's values exactly where its dtype is as wide (bf16 weights
    # in fp32 master params); the user computes in its own dtype, so it plays as if loaded.
    exact = jnp.promote_types(cfg.param_dtype, policy_cfg.param_dtype) == policy_cfg.param_dtype
    if not exact or trained:
      why = (f"its {cfg.param_dtype} weights do not fit the policy's {policy_cfg.param_dtype} "
             "exactly" if not trained else f"lora.trainable trains its {trained[0]}")
      logging.info("the %s loads its own copy of %s: %s", name, folder, why)
      continue
    out[name] = tuple(shapes)
  return out


class World(NamedTuple):
  task: text_lib.TextTask
  user_params: Any  # None when the user shares the policy's reference (`bind`)
  scorer: text_scores.TextScorer
  train: Any  # grain iterator of record batches (get_state / set_state)
  source: str
  eval_records: list[dict[str, Any]]
  mesh: Any
  shared: Mapping[str, tuple[str, ...]] = {}  # `shared_models`

  def bind(self, ref_params) -> "World":
    """This world with the shared user's and judge's weights taken from the policy's frozen
    reference `ref_params` (`run_rl.Setup.reference` of the current params: no copy)."""
    if not self.shared:
      return self
    plain = lora_lib.weights(ref_params, None)  # the reference carries no adapters
    def pick(names):
      missing = [k for k in names if k not in plain]
      if missing:
        raise ValueError(f"the policy's reference has no {missing}, which the user or judge of "
                         "its own folder reads: its config.model is not the folder's")
      return {k: plain[k] for k in names}

    world = self
    if "user" in self.shared:
      world = world._replace(user_params=pick(self.shared["user"]))
    if "judge" in self.shared:
      world = world._replace(scorer=self.scorer.bind_judge(pick(self.shared["judge"])))
    return world

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
  shared = shared_models(config, task)
  if shared:
    logging.info("sharing the policy's reference weights with the %s", " and ".join(shared))
  user = None if "user" in shared else text_lib.load_user_params(task, mesh)
  scorer = text_scores.from_config(config, task, mesh, judge_weights="judge" not in shared)
  return World(task, user, scorer, train, source, evals, mesh, shared)

