"""CollabLLM's data engine: MR-scored candidate replies, written as a TFDS dataset.

From fresh first requests, every assistant turn samples G candidate replies from the policy,
scores each by the multiturn-aware reward (S futures of w turns with the simulator and the policy
itself), continues the conversation with the best candidate and records

  (history up to the assistant header, the G candidates, their MR mean and spread)

per conversation and turn. The result is the source of offline DPO (`trainers/dpo.py` with
`dpo.source="offline"`: chosen = best, rejected = worst when the gap passes a threshold) and of
SFT on the best replies. One jitted call plays a chunk of B conversations for all turns; the
dataset is written by `builders.prepare`, so a failed build leaves nothing behind.

  python -m collab_rl.main --config experiments/data_engine.py --workdir workdir/engine \
      --config.init_from=workdir/sft_base/checkpoints
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from collab_rl import checkpoint as ckpt_lib
from collab_rl import metrics as metrics_lib
from collab_rl import restore as restore_lib
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl import text_scores
from collab_rl.data import builders
from collab_rl.data import loader
from collab_rl.models import hf, transformer
from collab_rl.tasks import registry
from collab_rl.tasks import text as text_lib

NAME = "mr_candidates"
FIELDS = ("history_tokens", "history_roles", "history_len", "candidates", "candidate_len", "mr",
          "mr_std", "turn", "episode_id", "ambiguous")

# ------------------------------------------------------------------------------------------------
# Generation: one jitted call per chunk of conversations.
# ------------------------------------------------------------------------------------------------


def check_config(config):
  text = config.task == registry.TEXT_TASK
  if text:
    loader.metadata(config.data_dir, builders.CollabLLM.name)  # names its prepare command
    if jax.process_count() > 1:  # each chunk's records are read whole, not split by process
      raise ValueError("the data engine on the language tier runs in one process (this run has "
                       f"{jax.process_count()}); use one process with all its devices")
  rcfg = rewards.RewardConfig.from_config(config.reward)
  task = registry.config_task(config, **({"max_turns": rcfg.horizon(config.num_turns)}
                                         if text else {}))
  mcfg = (_hf_policy(config)[0].cfg if text
          else transformer.TransformerConfig.from_dict(config.model.to_dict()))
  if mcfg.vocab_size != task.vocab_size and not (text and mcfg.vocab_size > task.vocab_size):
    raise ValueError(f"config.model.vocab_size={mcfg.vocab_size} must equal the vocabulary of "
                     f"task {config.task!r} ({task.vocab_size})")
  for name in ("num_conversations", "batch_size", "num_turns", "candidates", "reply_tokens"):
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")
  if config.candidates < 2:
    raise ValueError(f"config.candidates={config.candidates}: ranking needs at least 2")
  if not 0 <= config.validation_fraction < 1:
    raise ValueError(f"config.validation_fraction={config.validation_fraction} must be in [0, 1)")
  if not config.data_dir:
    raise ValueError("config.data_dir is empty: say where the dataset goes")
  sampling.SamplingConfig(max_new_tokens=config.reply_tokens, temperature=config.temperature)
  mesh = sharding_lib.make_mesh(config.mesh_shape)
  sharding_lib.check_batch(config.batch_size * config.candidates, mesh,
                           what="batch_size x candidates")
  restore_lib.check_init_from(config.init_from or None)
  return task, mcfg, mesh, rcfg


def _hf_policy(config, mesh=None, load: bool = False):
  """The language tier's policy: (model, params or None) of `config.init_from_hf`."""
  folder = config.get("init_from_hf") or ""
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise FileNotFoundError(f"config.init_from_hf={folder!r}: no config.json there (the data "
                            "engine's policy on the language tier is a Hugging Face folder)")
  if load:
    return hf.load_pretrained(folder, mesh=mesh)
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    return transformer.Transformer(hf.config_from_hf(json.load(f))), None


def play(config, task, policy, rcfg, params, key) -> dict[str, jax.Array]:
  """B conversations, `num_turns` turns each: {field: [T, B, ...]} plus `valid` [T, B]."""
  b, g = config.batch_size, config.candidates
  k_int, k_turns = jax.random.split(key)
  intent = task.sample_intents(k_int, b)
  conv, sim = rollout_lib.start(task, intent, rollout_lib.conversation_len(
      task, rcfg.horizon(config.num_turns), config.reply_tokens))
  pstate = policy.init(params, conv, rollout_lib.opening_width(task))

  def pick(tree, rows):
    return jax.tree_util.tree_map(lambda x: x if x.ndim == 0 else x[rows], tree)

  def turn(carry, t):
    conv, sim, pstate = carry
    k_cand, k_mr, k_user = jax.random.split(jax.random.fold_in(k_turns, t), 3)
    active = ~conv.done_B
    conv = rollout_lib.open_reply(task, conv)
    cands = rewards.ranked_candidates(policy, task, params, conv, sim, pstate, g, k_cand, k_mr,
                                      rcfg)
    reply, reply_len = cands.tokens_BGxN, cands.lengths_BG
    best_rows = cands.rows(cands.best_B)
    record = dict(history_tokens=conv.tokens_BxL, history_roles=conv.roles_BxL.astype(jnp.int8),
                  history_len=conv.cursor_B, candidates=reply.reshape(b, g, -1),
                  candidate_len=reply_len.reshape(b, g), mr=cands.mr_BxG, mr_std=cands.mr_std_BxG,
                  turn=jnp.full((b,), t, jnp.int32), ambiguous=conv.intent.ambiguous_B,
                  valid=active)
    # The conversation goes on with the best candidate, from the cache that wrote it.
    conv, sim = rollout_lib.answer_reply(task, conv, sim, reply[best_rows], reply_len[best_rows],
                                         k_user)
    return (conv, sim, pick(cands.policy_state, best_rows)), record

  _, records = jax.lax.scan(turn, (conv, sim, pstate), jnp.arange(config.num_turns))
  return records


def generate(config, task, mcfg, mesh, rcfg, params) -> dict[str, np.ndarray]:
  """Every valid (conversation, turn) record of `num_conversations` conversations, as numpy."""
  model = transformer.Transformer(mcfg)
  sc = sampling.SamplingConfig(max_new_tokens=config.reply_tokens, temperature=config.temperature,
                               stop_tokens=task.stop_tokens)
  policy = rollout_lib.lm_policy(model, sc, chunk_width=rollout_lib.chunk_width(task),
                                 max_turns=rcfg.horizon(config.num_turns))
  if not task.device_scored:
    play_fn = _text_play(config, task, policy, rcfg, mesh)
    source = os.path.join(config.data_dir, builders.CollabLLM.name, "train")
  else:
    play_fn = jax.jit(lambda p, k: play(config, task, policy, rcfg, p, k))
  chunks = -(-config.num_conversations // config.batch_size)
  root = jax.random.key(config.seed)
  out: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
  for c in metrics_lib.progress(range(chunks), total=chunks, desc="data engine"):
    key = jax.random.fold_in(root, c)
    if task.device_scored:
      rec = sharding_lib.to_host(play_fn(params, key))
    else:  # the train split's records, in order, a batch per chunk
      src = loader.data_source(config.data_dir, builders.CollabLLM.name, "train")
      rows = np.arange(c * config.batch_size, (c + 1) * config.batch_size) % len(src)
      rec = play_fn(params, key, loader.records_of(loader.read_batch(src, True, rows), source))
    n = min(config.batch_size, config.num_conversations - c * config.batch_size)
    valid_TxB = np.asarray(rec.pop("valid"))[:, :n]
    rec["episode_id"] = np.broadcast_to(c * config.batch_size + np.arange(n), valid_TxB.shape)
    # Conversation-major order: a conversation's turns stay together in the file.
    t_idx, b_idx = np.nonzero(valid_TxB.T)[::-1]
    for f in FIELDS:
      x = np.asarray(rec[f])
      out[f].append(x[t_idx, b_idx] if f != "episode_id" else x[t_idx, b_idx].astype(np.int64))
  return {f: np.concatenate(v) for f, v in out.items()}


def _text_play(config, task, policy, rcfg, mesh):
  """`play` for the language tier, `(params, key, records) -> {field: [T, B, ...]}`: each turn
  is one jitted call (G candidates and their B x G x S futures), the host scores the futures
  (MR), and a second call continues every conversation with its best candidate."""
  b, g, s = config.batch_size, config.candidates, rcfg.samples
  user = text_lib.load_user_params(task, mesh)
  scorer = text_scores.from_config(config, task, mesh)
  columns = task.conversation_len(rcfg.horizon(config.num_turns), config.reply_tokens)

  @jax.jit
  def begin(params, u, intent):
    conv, sim = rollout_lib.start(task.bind(u), intent, columns)
    return conv, sim, policy.init(params, conv, task.opening_width)

  @jax.jit
  def candidates(params, u, conv, sim, pstate, key):
    t = task.bind(u)
    conv = rollout_lib.open_reply(t, conv)
    conv_g, sim_g, pstate_g = rollout_lib.tile_rows((conv, sim, pstate), g)
    reply, _, n, pstate_g = policy(params, conv_g, sim_g, pstate_g, key)
    fut = rewards.play_futures(policy, t, params, conv_g, sim_g, pstate_g, reply, n,
                               jax.random.fold_in(key, 1), rcfg, keep=text_lib.played)
    return conv, reply, n, pstate_g, fut

  @jax.jit
  def go_on(u, conv, sim, reply, n, pstate_g, best_rows, key):
    pick = lambda tree: jax.tree_util.tree_map(lambda x: x if x.ndim == 0 else x[best_rows], tree)
    conv, sim = rollout_lib.answer_reply(task.bind(u), conv, sim, reply[best_rows],
                                         n[best_rows], key)
    return conv, sim, pick(pstate_g)

  def run(params, key, records):
    intent = task.open_episodes(user, task.encode(records), jax.random.fold_in(key, 10_000))
    conv, sim, pstate = begin(params, user, intent)
    out = []
    for t in range(config.num_turns):
      k_cand, k_user = jax.random.split(jax.random.fold_in(key, t))
      active = ~np.asarray(conv.done_B)
      header, reply, n, pstate_g, fut = candidates(params, user, conv, sim, pstate, k_cand)
      mr_N, _ = text_scores.score_live(scorer, fut, np.repeat(active, g * s), records)
      mr_BxGxS = mr_N.reshape(b, g, s)
      best = np.argmax(mr_BxGxS.mean(-1), 1)
      h = sharding_lib.to_host(header)
      out.append(dict(history_tokens=h.tokens_BxL, history_roles=h.roles_BxL.astype(np.int8),
                      history_len=h.cursor_B, candidates=np.asarray(reply).reshape(b, g, -1),
                      candidate_len=np.asarray(n).reshape(b, g), mr=mr_BxGxS.mean(-1),
                      mr_std=mr_BxGxS.std(-1), turn=np.full((b,), t, np.int32),
                      ambiguous=np.asarray(h.intent.ambiguous_B) == 1, valid=active))
      conv, sim, pstate = go_on(user, header, sim, reply, n, pstate_g,
                                jnp.asarray(np.arange(b) * g + best), k_user)
    return {k: np.stack([o[k] for o in out]) for k in out[0]}

  return run


# ------------------------------------------------------------------------------------------------
# The dataset.
# ------------------------------------------------------------------------------------------------


class MRCandidates(builders._Builder):  # pylint: disable=protected-access
  """(history, G candidates, MR) records made by the data engine; splits by conversation."""

  name = NAME

  def __init__(self, *, records: Mapping[str, np.ndarray] | None = None,
               meta: Mapping[str, Any] | None = None, validation_fraction: float = 0.0,
               **kwargs):
    self.records, self.meta, self.validation_fraction = records, dict(meta or {}), \
        validation_fraction
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.records
    if r is None:
      raise ValueError(f"{NAME}: building needs the engine's records")

    def tensor(name):
      return tfds.features.Tensor(shape=r[name].shape[1:], dtype=r[name].dtype)

    features = {f: tensor(f) if r[f].ndim > 1 else tfds.features.Scalar(r[f].dtype)
                for f in FIELDS}
    return tfds.core.DatasetInfo(
        builder=self, description="History, candidate replies and their multiturn-aware reward.",
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        metadata=tfds.core.MetadataDict(**self.meta))

  def _split_generators(self, dl_manager):
    del dl_manager
    episodes = np.unique(self.records["episode_id"])
    n_val = int(len(episodes) * self.validation_fraction)
    held_out = np.random.default_rng(0).permutation(episodes)[:n_val]
    in_val = np.isin(self.records["episode_id"], held_out)
    splits = {"train": np.nonzero(~in_val)[0], "validation": np.nonzero(in_val)[0]}
    return {s: self._generate_examples(idx) for s, idx in splits.items() if len(idx)}

  def _generate_examples(self, idx: np.ndarray):
    for i in idx:
      yield int(i), {f: self.records[f][i] for f in FIELDS}


def policy_params(init_from: str, abstract) -> Any:
  """The candidates' policy: the params of the run checkpointed in `init_from`, as one plain
  model (a run that trained LoRA adapters gives its base with them merged in, as `evaluate`
  reads it), checked leaf for leaf against the engine's own model (`abstract`)."""
  _, params = restore_lib.restore_policy(init_from, restore_lib.read_config(init_from))
  ckpt_lib.check_against_metadata(abstract, params, f"init_from={init_from!r} (its policy, "
                                  "against config.model)")
  return params


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Generates the records with the policy of `config.init_from` and writes the dataset."""
  task, mcfg, mesh, rcfg = check_config(config)
  model = transformer.Transformer(mcfg)
  abstract = jax.eval_shape(lambda: transformer.init_params(model, jax.random.key(0)))
  if not task.device_scored:
    params = _hf_policy(config, mesh, load=True)[1]
  elif config.init_from:
    params = policy_params(config.init_from, abstract)
  else:
    logging.warning("data engine: no init_from, so the candidates come from random weights")
    params = transformer.init_params(model, jax.random.key(config.seed))
  t0 = time.perf_counter()
  records = generate(config, task, mcfg, mesh, rcfg, params)
  seconds = time.perf_counter() - t0
  gap = records["mr"].max(1) - records["mr"].min(1)
  policy = config.get("init_from_hf") if not task.device_scored else config.init_from
  meta = dict(task=config.task, policy=policy or "random", candidates=config.candidates,
              window=rcfg.window, samples=rcfg.samples, turns=config.num_turns, seed=config.seed,
              conversations=config.num_conversations)
  path = builders.prepare(MRCandidates, config.data_dir, records=records, meta=meta,
                          validation_fraction=config.validation_fraction)
  final = {"records": float(len(gap)), "mr_mean": float(records["mr"].mean()),
           "mr_gap_mean": float(gap.mean()), "seconds": seconds,
           "records_per_s": len(gap) / seconds}
  os.makedirs(workdir, exist_ok=True)
  with metrics_lib.MetricWriter(workdir) as writer:
    writer.write_hparams(config.to_dict())
    writer.write_scalars(0, final)
  logging.info("data engine wrote %s: %s", path, final)
  return {"final": final, "path": path}
