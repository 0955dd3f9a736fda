"""Evaluation of language-tier runs: trained policies against their LM user, on held-out records.

  python -m collab_rl.evaluate --workdir runs/lang [--split test --episodes 64]

(`evaluate.py` hands every run whose config names the language tier, `task = "collabllm"`, to
this module; `evaluate_runs` is the entry point.) Each run's latest params play the first
`episodes` records of `split` (the same records for every arm and seed) greedily, for `turns`
assistant turns, against the run's own LM user and scorer (its config's `sim`, `judge`,
`metric`, `data_dir` unless `data_dir` is given), and are scored on the host
(`text_scores.TextScorer`): task score, R*, tokens read, interactivity (with a judge), turns,
ask-when-ambiguous and answer-when-clear on the records that say whether they are ambiguous,
and what the user did (ended the chat, wrote the assistant's part, was cut).

Writes `results.json` / `results.md` (`results.py`: intervals over records, over seeds) and
`samples/collabllm_<arm>.txt`, the first conversations as text.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np

from collab_rl import metrics as metrics_lib
from collab_rl import restore as restore_lib
from collab_rl import results as results_lib
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import run_rl
from collab_rl import run_text
from collab_rl import sharding as sharding_lib
from collab_rl import storage
from collab_rl import text_scores
from collab_rl.data import loader as loader_lib
from collab_rl.tasks import text as text_lib


METRICS = ("score", "reward", "tokens_read_k", "interactivity", "ask_when_ambiguous",
           "answer_when_clear", "ask_answer_macro_f1", "turns", "tokens_per_solved_k",
           "user_ended", "user_confused")


def is_text_run(config: dict) -> bool:
  return config.get("task") == run_text.RECORDS


def load(run_dir: str, *, turns: int, data_dir: str | None = None,
         user_from: str | None = None):
  """(config, task, policy model, params) of a language-tier run's latest checkpoint; its
  records and LM user replaced by `data_dir` / `user_from` where given (an SFT base names no
  user of its own)."""
  checkpoints = storage.join(storage.absolute(run_dir), "checkpoints")
  config = ml_collections.ConfigDict(restore_lib.read_config(checkpoints))
  if data_dir:
    config.data_dir = data_dir
  if user_from:
    config.sim.user_from = user_from
  task = text_lib.from_config(config, max_turns=turns)
  model, params = restore_lib.restore_policy(checkpoints, config)
  return config, task, model, params


def play(config, task, model, params, records, *, turns: int, batch: int, seed: int,
         scorer: text_scores.TextScorer, user_params):
  """Per-episode metrics of the greedy policy on `records`, and the first batch's chats."""
  rcfg = rewards.RewardConfig.from_config(config.reward)
  with config.unlocked():
    config.num_turns = turns
  policy = run_rl.rollout_policy(config, model, task, rcfg, temperature=0.0)
  columns = task.conversation_len(turns, config.reply_tokens)
  run = jax.jit(lambda p, u, intent, k: text_lib.played(*(lambda ro: (ro.conv, ro.sim))(
      rollout_lib.rollout(policy, task.bind(u), p, k, batch, num_turns=turns, max_len=columns,
                          intent=intent))))
  per_episode, chats = collections.defaultdict(list), None
  for start in range(0, len(records) - len(records) % batch, batch):
    part = records[start:start + batch]
    key = jax.random.fold_in(jax.random.key(seed), start)
    intent = task.open_episodes(user_params, task.encode(part), jax.random.fold_in(key, 1))
    conv, user = sharding_lib.to_host(run(params, user_params, intent, key))
    m, _ = scorer.episode_metrics(conv, user, part)
    for k, v in m.items():
      per_episode[k].append(np.asarray(v))
    chats = chats if chats is not None else scorer.chats(conv)
  return {k: np.concatenate(v) for k, v in per_episode.items()}, chats


def evaluate_runs(runs: Iterable[tuple[str, str, int]], out: str, *, episodes: int, turns: int,
                  batch: int, split: str = "test", data_dir: str | None = None,
                  user_from: str | None = None, samples: int = 3) -> dict[str, Any]:
  """Plays and scores every language-tier run (see the module docstring); writes into `out`."""
  runs = list(runs)
  per_arm: dict[str, list] = collections.defaultdict(list)
  storage.makedirs(storage.join(out, "samples"))
  rng = np.random.default_rng(0)
  users: dict[str, Any] = {}  # user folder -> params, loaded once for all runs
  for run_dir, arm, seed in metrics_lib.progress(runs, desc="evaluate (language)"):
    config, task, model, params = load(run_dir, turns=turns, data_dir=data_dir,
                                       user_from=user_from)
    records = loader_lib.first_records(config.data_dir, split, episodes)
    if len(records) < batch or episodes % batch:
      raise ValueError(f"--episodes={episodes} must be a positive multiple of --batch={batch}")
    folder = task.ucfg.user_from
    if folder not in users:
      users[folder] = text_lib.load_user_params(task)
    scorer = text_scores.from_config(config, task)
    m, chats = play(config, task, model, params, records, turns=turns, batch=batch, seed=seed,
                    scorer=scorer, user_params=users[folder])
    s = results_lib.summary(m, rng)
    s["reward"] = {"mean": float(np.mean(m["reward"])), "ci": float("nan")}
    for k in ("user_ended", "user_confused", "user_cut"):
      s[k] = {"mean": float(np.mean(m[k])), "ci": float("nan")}
    per_arm[f"{task.name}:{arm}"].append(s)
    if seed == min(s_ for _, a, s_ in runs if a == arm):
      text = ["\n".join(f"[{c['role']}] {c['content']}" for c in chat)
              for chat in chats[:samples]]
      storage.write_text(storage.join(out, "samples", f"{task.name}_{arm}.txt"),
                         f"# {arm} (seed {seed}, {run_dir})\n\n" + "\n\n".join(text) + "\n")
  results = {k: {"per_seed": v, "over_seeds": results_lib.over_seeds(v)}
             for k, v in per_arm.items()}
  settings = {"episodes": episodes, "turns": turns, "split": split, "warnings": [],
              "tier": "language"}
  results_lib.write(out, settings, results, metrics=METRICS)
  return results



def take_language_runs(runs, out: str, **kwargs) -> list[tuple[str, str, int]]:
  """Plays the language-tier runs among `runs` (`evaluate_runs(..., **kwargs)`, into `out`, or
  `out/language` when verifiable-tier runs are left) and returns the others."""
  text = [r for r in runs
          if is_text_run(restore_lib.read_config(os.path.join(r[0], "checkpoints")))]
  rest = [r for r in runs if r not in text]
  if text:
    text_out = os.path.join(out, "language") if rest else out
    kwargs["data_dir"] = kwargs.get("data_dir") or None
    kwargs["user_from"] = kwargs.get("user_from") or None
    print(results_lib.table(evaluate_runs(text, text_out, **kwargs), METRICS))
    print(f"wrote {text_out}/results.json, results.md and samples/")
  return rest
