"""Evaluation of trained policies against the scripted user, with intervals, plots and samples.

  python -m collab_rl.evaluate --workdir runs/ [--episodes 512 --turns 4 --users reactive,sharded]

Finds every run under `--workdir` (a directory holding `checkpoints/`; the sweep's layout
`<task>/seed<k>/<arm>` names the arm and seed; a sweep point's directory `<arm>@w_int=0.1` is the
row `<arm>[w_int=0.1]`), restores its latest params and config, and plays the task's **test**
episodes (`data.builders`: the same episodes for every arm and seed) with the greedy policy for
`--turns` assistant turns. Writes into `--out` (default: the workdir):

  results.json   per arm and task: every metric's mean with a 95% interval over episodes (per
                 seed) and over seeds, and the per-seed means; each seed's summary also has
                 `score_ambiguous`, the task score on ambiguous requests alone
  results.md     the comparison table: the paper's columns (task score, tokens read in
                 thousands, interactivity) plus ask-when-ambiguous, answer-when-clear, their
                 macro F1, turns and tokens per solved task
  plots/         reward curves per arm (from each run's metrics.jsonl) and bars per metric
  samples/       a few conversations per arm as readable text

Intervals: over episodes, mean +- 1.96 standard errors (a bootstrap of 1000 resamples for the
macro F1, which is not a mean); over seeds, the t interval of the seed means (t_{0.975, n-1}).
Scripted reference policies (`--baselines oracle,answer_now`) get rows of their own.

Rows beyond one per run:
- `proactive_base`: every `sft_base` checkpoint once more, with the `clarify` instruction on
  every first request (`instruction_rate=1.0`): CollabLLM's prompted Proactive Base.
- `--users reactive,sharded,noisy,missing3,amb0.2,fresh` (`eval_users.py`; `--modes` is its old
  name): every row against each user the policy may never have met, labelled `<row>@<user>`
  (the reactive user, `sim.sharded=False`, gives the unlabelled rows). The sharded one also
  reveals the next missing slot every turn (Lost-in-Conversation). Every user plays every row,
  so that each arm's loss against a user it never met is measured, not assumed. `--user_overrides
  name:field=value;...` defines an ad-hoc user. The scripted baselines meet the reactive user only.
Every run's test score is checked against its own last greedy evaluation (metrics.jsonl): a gap
over `MAX_GAP` is logged and kept in results.json (`settings.warnings`) and results.md, since it
means the run was played wrongly (a decoding or restore fault), not that the episodes differ.
A mediator run (`trainer: mediator`) is played as the Mediator-Assistant: its mediator in front of
the assistant its config names (`assistant_from`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Iterable

from absl import logging
import jax
import numpy as np

from collab_rl import checkpoint as ckpt_lib
from collab_rl import conversation as conv_lib
from collab_rl import eval_users
from collab_rl import mediator as mediator_lib
from collab_rl import metrics as metrics_lib
from collab_rl import restore as restore_lib
from collab_rl import results as results_lib
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl import storage
from collab_rl.tasks import registry, scoring

_RUN = re.compile(r"(?:(?P<task>[^/]+)/)?seed(?P<seed>\d+)/(?P<arm>[^/]+)$")
MODES = ("reactive", "sharded")  # the users of the mediator comparison (headline.py)
# Scripted reference policies that read the intent (rollout.py): rows of their own, named as in
# results.BASELINE_ROWS.
BASELINES = {"oracle": rollout_lib.oracle_policy, "answer_now": rollout_lib.answer_now_policy}
# The statistics live in results.py; these names are the ones callers (headline, tests) use.
METRICS, summary, over_seeds = results_lib.METRICS, results_lib.summary, results_lib.over_seeds
table, merge = results_lib.table, results_lib.merge
# Rows played from another arm's checkpoint with simulator overrides: row -> (arm, overrides).
DERIVED_ROWS = {"proactive_base": ("sft_base", {"instruction_rate": 1.0})}

# ------------------------------------------------------------------------------------------------
# Playing the test episodes.
# ------------------------------------------------------------------------------------------------


def test_intents(task, n: int):
  """The first n episodes of the task's test split (the builders' definition of the split)."""
  return eval_users.intents(task, n, "test")


# Jitted rollouts by (program key, turns, batch, columns): runs of one model and task config
# (every seed of an arm, most arms of a sweep) compile once.
_PROGRAMS: dict[tuple, Any] = {}


def program_key(config: dict, sim: dict | None) -> str:
  """What determines a run's evaluation program: task, simulator, model(s); not the params."""
  assistant = (restore_lib.read_config(config["assistant_from"])["model"]
               if config.get("trainer") == "mediator" else None)
  return json.dumps({"task": config["task"], "sim": {**config["sim"], **(sim or {})},
                     "model": config["model"], "assistant": assistant}, sort_keys=True,
                    default=str)


def play(task, policy, params, intent, *, turns: int, reply_tokens: int, batch: int, seed: int,
         key: str | None = None):
  """Per-episode metrics of `policy` on `intent` (all episodes), and the first batch's rollout.
  With `key` (`program_key`), the compiled rollout is shared with earlier calls of that key."""
  n = intent.values_BxK.shape[0]
  if n % batch:
    raise ValueError(f"episodes={n} must be a multiple of the evaluation batch {batch}")
  columns = rollout_lib.conversation_len(task, turns, reply_tokens)
  cache_key = None if key is None else (key, turns, batch, columns)
  run = _PROGRAMS.get(cache_key) if cache_key else None
  if run is None:
    run = jax.jit(lambda p, i, k: rollout_lib.rollout(
        policy, task, p, k, batch, num_turns=turns, max_len=columns, intent=i))
    if cache_key:
      _PROGRAMS[cache_key] = run
  per_episode, first = collections.defaultdict(list), None
  for start in range(0, n, batch):
    part = jax.tree_util.tree_map(lambda x: x[start:start + batch], intent)
    ro = run(params, part, jax.random.fold_in(jax.random.key(seed), start))
    first = ro if first is None else first
    for k, v in sharding_lib.to_host(scoring.episode_metrics(task, ro.conv, ro.sim)).items():
      per_episode[k].append(np.asarray(v))
  return {k: np.concatenate(v) for k, v in per_episode.items()}, first


def load_policy(run_dir: str, turns: int, sim: dict | None = None):
  """(task, policy, params, reply budget, config) of a run's latest checkpoint, its simulator
  fields overridden by `sim` (e.g. {"sharded": True}). A mediator run gives the
  Mediator-Assistant, with params {"mediator", "assistant"}. Relative paths are taken from the
  working directory (Orbax restores absolute paths only)."""
  checkpoints = storage.join(storage.absolute(run_dir), "checkpoints")
  config = restore_lib.read_config(checkpoints)
  task = registry.make_task(config["task"], {**config["sim"], **(sim or {})})
  model, params = restore_lib.restore_policy(checkpoints, config)
  reply = task.answer_len + 3
  sc = sampling.SamplingConfig(max_new_tokens=reply, greedy=True, stop_tokens=(task.eot_id,))
  if config.get("trainer") == "mediator":
    if not config.get("assistant_from"):
      raise ValueError(f"{run_dir}: a mediator run whose config names no assistant_from")
    a_model, a_params = restore_lib.restore_policy(
        config["assistant_from"], restore_lib.read_config(config["assistant_from"]))
    policy = mediator_lib.MediatorAssistant(task, model, a_model, sc)
    return task, policy, {"mediator": params, "assistant": a_params}, reply, config
  policy = rollout_lib.lm_policy(model, sc, chunk_width=rollout_lib.chunk_width(task),
                                 max_turns=turns)
  return task, policy, params, reply, config


# ------------------------------------------------------------------------------------------------
# Runs, plots and the CLI body.
# ------------------------------------------------------------------------------------------------


def arm_label(name: str) -> str:
  """The row of a run directory: a sweep point `ppo_ext_int@w_int=0.1` is `ppo_ext_int[w_int=0.1]`,
  since `@` in a row names the user it was played against."""
  arm, *tags = name.split("@")
  return arm + "".join(f"[{t}]" for t in tags)


def find_runs(workdir: str) -> list[tuple[str, str, int]]:
  """(absolute run directory, arm, seed) for every run under `workdir` with a finished
  checkpoint."""
  workdir, runs = os.path.abspath(workdir), []
  for root, dirs, _ in os.walk(workdir, followlinks=True):  # runs linked into a sweep count
    if "checkpoints" in dirs:
      rel = os.path.relpath(root, workdir)
      m = _RUN.search(rel.replace(os.sep, "/"))
      arm, seed = (m.group("arm"), int(m.group("seed"))) if m else (rel, 0)
      arm = arm_label(arm)
      ck = ckpt_lib.Checkpointer(os.path.join(root, "checkpoints"))
      if ck.latest_step() is not None:
        runs.append((root, arm, seed))
      ck.close()
      dirs.remove("checkpoints")
  return sorted(runs)


def plot(results: dict[str, Any], curves: dict[str, list[tuple[int, float]]], out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  storage.makedirs(storage.join(out, "plots"))
  tasks = sorted({k.split(":")[0] for k in results})
  for task in tasks:
    keys = [k for k in sorted(results) if k.startswith(task + ":")]
    cols = 4  # one panel per metric, as many rows as they need
    rows = -(-len(METRICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(METRICS):]:
      ax.axis("off")
    for ax, metric in zip(axes.flat, METRICS):
      means = [results[k]["over_seeds"][metric]["mean"] for k in keys]
      cis = [np.nan_to_num(results[k]["over_seeds"][metric]["ci"]) for k in keys]
      ax.bar(range(len(keys)), means, yerr=cis, capsize=3)
      ax.set_xticks(range(len(keys)), [k.split(":")[1] for k in keys], rotation=45, ha="right",
                    fontsize=7)
      ax.set_title(results_lib.COLUMNS[metric])
    fig.tight_layout()
    storage.save_figure(fig, storage.join(out, "plots", f"{task}_bars.png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in sorted(curves.items()):
      if name.startswith(task + ":") and points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=name.split(":", 1)[1])
    ax.set_xlabel("iteration")
    ax.set_ylabel("greedy held-out reward R*")
    if ax.get_lines():
      ax.legend(fontsize=7)
    fig.tight_layout()
    storage.save_figure(fig, storage.join(out, "plots", f"{task}_reward_curves.png"))
    plt.close(fig)


def reward_curve(run_dir: str) -> list[tuple[int, float]]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [(int(r["step"]), float(r["eval/reward"])) for r in metrics_lib.read_jsonl(path)
          if "eval/reward" in r]


# A run's test score this far from its own last greedy evaluation (held-out episodes of the same
# task, usually the same number of turns) is a fault in playing it, not sampling noise: it caught
# GPU greedy decoding writing the last vocabulary word (0.07 here, 0.90 in the run).
MAX_GAP = 0.25


def own_score(run_dir: str) -> float | None:
  """The task score of the run's own last greedy evaluation in its metrics.jsonl (`eval/score`
  of the RL trainers, `score` of SFT), or None where it logged none."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  scores = [r.get("eval/score", r.get("score")) for r in metrics_lib.read_jsonl(path)]
  scores = [float(x) for x in scores if isinstance(x, (int, float)) and np.isfinite(x)]
  return scores[-1] if scores else None


def check_against_run(run_dir: str, score: float) -> str | None:
  """A warning when `score` (this evaluation's mean test score) is more than MAX_GAP from the
  run's own last evaluation, else None."""
  own = own_score(run_dir)
  if own is None or abs(score - own) <= MAX_GAP:
    return None
  return (f"{run_dir}: test score {score:.3f} here, {own:.3f} in the run's own last evaluation; "
          "a gap this large points at decoding, restoring or different --turns, not at the "
          "episodes (see its samples)")


def rows_of(arm: str, users: Iterable[str | eval_users.User]
            ) -> list[tuple[str, eval_users.User]]:
  """(row label, user with the row's own overrides) of every row one run of `arm` gives against
  `users` (names or `eval_users.User`s): `<row>` for the reactive user, else `<row>@<user>`."""
  names = [(arm, {})] + [(row, sim) for row, (src, sim) in DERIVED_ROWS.items() if src == arm]
  out = []
  for user in eval_users.resolve(users):
    for name, sim in names:
      label = name if user.name == "reactive" else f"{name}@{user.name}"
      out.append((label, dataclasses.replace(user, sim={**sim, **user.sim})))
  return out


def _with_ambiguous_score(s: dict[str, Any], m: dict[str, np.ndarray]) -> dict[str, Any]:
  """`summary` plus the task score on ambiguous requests alone: for a base that never asks, the
  value of guessing, which the interactivity-weight sweep sets against w_int."""
  x = np.asarray(m["score"], np.float64)[np.asarray(m["ambiguous"], bool)]
  half = 1.96 * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
  s.setdefault("score_ambiguous", {"mean": float(x.mean()) if len(x) else float("nan"),
                                   "ci": float(half)})
  return s


def evaluate_runs(runs: Iterable[tuple[str, str, int]], out: str, *, episodes: int, turns: int,
                  batch: int, users: Iterable[str | eval_users.User] = ("reactive",),
                  baselines: Iterable[str] = (), samples: int = 3) -> dict[str, Any]:
  runs, users = list(runs), eval_users.resolve(users)
  per_arm: dict[str, list] = collections.defaultdict(list)
  curves: dict[str, list] = {}
  tasks_seen: dict[str, Any] = {}
  storage.makedirs(storage.join(out, "samples"))
  rng = np.random.default_rng(0)
  warnings: list[str] = []
  # Read first: a user's overrides depend on the run's task (its slots) and simulator, and a
  # user that does not fit a run fails before anything is played.
  configs = {d: restore_lib.read_config(storage.join(storage.absolute(d), "checkpoints"))
             for d, _, _ in runs}
  jobs = [(run_dir, arm, seed, row, user, eval_users.sim_for(user, configs[run_dir]))
          for run_dir, arm, seed in runs for row, user in rows_of(arm, users)]
  for run_dir, arm, seed, row, user, sim in metrics_lib.progress(jobs, desc="evaluate"):
    task, policy, params, reply, config = load_policy(run_dir, turns, sim)
    if row == arm:
      tasks_seen.setdefault(task.name, (task, reply))
    m, first = play(task, policy, params, eval_users.intents(task, episodes, user.source),
                    turns=turns, reply_tokens=reply, batch=batch, seed=seed,
                    key=program_key(config, sim))
    key = f"{task.name}:{row}"
    per_arm[key].append(_with_ambiguous_score(summary(m, rng), m))
    if row == arm:  # training curves belong to the run, not to each way of playing it
      curves.setdefault(key, reward_curve(run_dir))
      if config.get("trainer") != "mediator":  # its own evaluation scores the rewrites alone
        warning = check_against_run(run_dir, float(np.mean(m["score"])))
        if warning:
          logging.warning(warning)
          warnings.append(warning)
    if seed == min(s for _, a, s in runs if a == arm):
      text = conv_lib.decode(first.conv, task.tokenizer, range(min(samples, batch)))
      storage.write_text(storage.join(out, "samples", f"{task.name}_{row}.txt"),
                         f"# {row} (seed {seed}, {run_dir})\n\n" + "\n\n".join(text) + "\n")
  for name in baselines:
    for task, reply in tasks_seen.values():
      policy = BASELINES[name](task)
      m, _ = play(task, policy, None, test_intents(task, episodes), turns=turns,
                  reply_tokens=reply, batch=batch, seed=0)
      per_arm[f"{task.name}:{name}"].append(_with_ambiguous_score(summary(m, rng), m))
  results = {k: {"per_seed": v, "over_seeds": over_seeds(v)} for k, v in per_arm.items()}
  settings = {"episodes": episodes, "turns": turns, "split": "test", "warnings": warnings,
              "users": {u.name: {"sim": dict(u.sim), "source": u.source} for u in users}}
  results_lib.write(out, settings, results)
  plot(results, curves, out)
  return results


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # the table, not Orbax narrating every restore
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if f.merge:
    if not f.out:
      raise SystemExit("error: --merge needs --out")
    print(table(merge(f.merge, f.out)))
    print(f"wrote {f.out}/results.json and results.md")
    return
  if not f.workdir:
    raise SystemExit("error: --workdir (or --merge) is required")
  runs = find_runs(f.workdir)
  if f.done_only:  # the sweep's marker of a run that reached its last step
    runs = [r for r in runs if os.path.exists(os.path.join(r[0], "DONE"))]
  if not runs:
    raise SystemExit(f"error: no run with a finished checkpoint under {f.workdir}")
  out = f.out or f.workdir
  from collab_rl import evaluate_text  # pylint: disable=g-import-not-at-top
  runs = evaluate_text.take_language_runs(runs, out, episodes=f.episodes, turns=f.turns,
                                          batch=f.batch, split=f.split, data_dir=f.data_dir,
                                          user_from=f.user_from)
  if not runs:
    return
  if f["modes"].present and f["users"].present:
    raise SystemExit("error: --modes is the old name of --users: give one of them")
  names = f.modes if f["modes"].present else f.users
  try:
    users = eval_users.resolve([u for u in names.split(",") if u], f.user_overrides)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  results = evaluate_runs(runs, out, episodes=f.episodes, turns=f.turns, batch=f.batch,
                          users=users, baselines=[b for b in f.baselines.split(",") if b])
  print(table(results))
  print(f"wrote {out}/results.json, results.md, plots/ and samples/")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Directory holding the runs (searched recursively).")
  flags.DEFINE_string("out", None, "Where results go (default: the workdir).")
  flags.DEFINE_integer("episodes", 512, "Test episodes per run.")
  flags.DEFINE_integer("turns", 4, "Assistant turns per conversation.")
  flags.DEFINE_integer("batch", 256, "Episodes per jitted rollout.")
  flags.DEFINE_string("users", "reactive", "Users to play, e.g. reactive,sharded,noisy,"
                      "missing3,amb0.2,fresh (eval_users.py; sharded: one missing piece "
                      "revealed per turn).")
  flags.DEFINE_string("modes", "reactive", "Old name of --users.")
  flags.DEFINE_multi_string("user_overrides", [], "An ad-hoc user, name:field=value;field=value "
                            "(SimConfig fields; source=fresh for fresh episodes), played as "
                            "<arm>@name (repeat the flag for more).")
  flags.DEFINE_string("baselines", "oracle,answer_now", "Scripted reference policies to add.")
  flags.DEFINE_bool("done_only", False, "Only runs the sweep marked finished (`DONE`), not "
                    "the latest checkpoint of one cut short.")
  flags.DEFINE_string("split", "test", "Language-tier runs: the records' split they play.")
  flags.DEFINE_string("data_dir", "", "Language-tier runs: prepared records to play instead of "
                      "each run's own config.data_dir.")
  flags.DEFINE_string("user_from", "", "Language-tier runs: the LM user's folder, for runs whose "
                      "config names none (an SFT base).")
  flags.DEFINE_list("merge", [], "results.json files to merge into one comparison in --out "
                    "(e.g. one evaluation per seed run in parallel); plays nothing.")
  app.run(main)
