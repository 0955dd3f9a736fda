"""Statistics and tables of evaluation results: per-run intervals over episodes, over-seed t
intervals, the Markdown table, and merging evaluations run separately (`evaluate.py` plays the
episodes; this module only counts).

Intervals: over episodes, mean +- 1.96 standard errors (a bootstrap of 1000 resamples for the
macro F1, which is not a mean); over seeds, the t interval of the seed means (t_{0.975, n-1}).
"""

from __future__ import annotations

import collections
import json
import math
from typing import Any, Iterable

import numpy as np

from collab_rl import storage
from collab_rl.tasks import scoring

METRICS = ("score", "tokens_read_k", "interactivity", "ask_when_ambiguous", "answer_when_clear",
           "ask_answer_macro_f1", "turns", "tokens_per_solved_k", "score_after_ask_1",
           "score_after_ask_2", "repeats_rejected")
COLUMNS = {"score": "task score", "tokens_read_k": "tokens (k)", "interactivity": "interactivity",
           "ask_when_ambiguous": "ask when ambiguous", "answer_when_clear": "answer when clear",
           "ask_answer_macro_f1": "ask/answer F1", "turns": "turns",
           "tokens_per_solved_k": "tokens/solved (k)",
           "score_after_ask_1": "score after asking (1 missing)",
           "score_after_ask_2": "score after asking (2 missing)",
           "repeats_rejected": "repeats a rejected answer",
           # the language tier (evaluate_text.py)
           "reward": "R*", "user_ended": "user ended the chat",
           "user_confused": "user wrote the assistant's part"}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}
# Rows of the scripted reference policies: the same test episodes in every evaluation.
BASELINE_ROWS = ("oracle", "answer_now")


def summary(m: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
  """Each metric's mean and 95% interval over the episodes of one run."""
  amb = m["ambiguous"].astype(bool)
  ask, ans = m["asked_first"].astype(bool), m["answered_first"].astype(bool)
  if "ambiguity_known" in m:  # language-tier records that do not say are left out of these
    known = m["ambiguity_known"].astype(bool)
    amb, ask, ans = amb[known], ask[known], ans[known]
  per_ep = {"score": m["score"], "tokens_read_k": m["tokens_read"] / 1000,
            "interactivity": m["interactivity"], "turns": m["turns"],
            "ask_when_ambiguous": ask[amb], "answer_when_clear": ans[~amb]}
  if "num_missing" in m:  # per-episode metrics recorded before them lack these
    per_ep.update({k: v["x"] for k, v in scoring.after_asking(m).items()})
  out = {}
  for k, x in per_ep.items():
    x = np.asarray(x, np.float64)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    out[k] = {"mean": float(x.mean()) if len(x) else float("nan"), "ci": half}
  f1 = scoring.ask_answer_summary(amb, ask, ans)["ask_answer_macro_f1"]
  boot = [scoring.ask_answer_summary(amb[i], ask[i], ans[i])["ask_answer_macro_f1"]
          for i in (rng.integers(0, len(amb), len(amb)) for _ in range(1000))]
  out["ask_answer_macro_f1"] = {"mean": f1, "ci": float(np.subtract(*np.percentile(
      boot, [97.5, 2.5])) / 2)}
  solved = max(int(m["solved"].sum()), 1)
  out["tokens_per_solved_k"] = {"mean": float(m["tokens_read"].sum() / solved / 1000),
                                "ci": float("nan")}
  out["episodes"] = int(len(m["score"]))
  return out


def over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean of the seed means and its t interval (nan with one seed)."""
  out = {}
  nan = {"mean": float("nan"), "ci": float("nan")}
  extra = [k for k, v in per_seed[0].items() if isinstance(v, dict) and k not in METRICS]
  for k in (*METRICS, *extra):  # a metric that evaluations written before it lack is nan
    x = np.array([s.get(k, nan)["mean"] for s in per_seed], np.float64)
    n = len(x)
    half = _T975.get(n - 1, 1.96) * x.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    out[k] = {"mean": float(x.mean()), "ci": float(half),
              "per_seed": [float(v) for v in x]}
  out["seeds"] = len(per_seed)
  return out


def table(results: dict[str, dict[str, Any]], metrics=METRICS) -> str:
  """Markdown, one row per (task, arm): seed mean +- interval over seeds (episodes if 1 seed)."""
  head = "| task | arm | seeds | " + " | ".join(COLUMNS[k] for k in metrics) + " |"
  lines = [head, "|" + " --- |" * (len(metrics) + 3)]
  for key in sorted(results):
    r = results[key]
    task, arm = key.split(":", 1)
    cells = []
    for k in metrics:
      mean, ci = r["over_seeds"][k]["mean"], r["over_seeds"][k]["ci"]
      if r["over_seeds"]["seeds"] == 1:
        ci = r["per_seed"][0].get(k, {"ci": float("nan")})["ci"]
      cells.append(f"{mean:.3f}" + ("" if math.isnan(ci) else f" ± {ci:.3f}"))
    lines.append(f"| {task} | {arm} | {r['over_seeds']['seeds']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def merge(paths: Iterable[str], out: str | None = None) -> dict[str, Any]:
  """One comparison from several `results.json` (e.g. one evaluation process per seed, run in
  parallel): every row's per-seed summaries concatenated, the over-seed intervals recomputed.
  The scripted baselines play the same test episodes everywhere, so only their first copy is
  kept. Writes `results.json` and `results.md` into `out` if given."""
  per_seed: dict[str, list] = collections.defaultdict(list)
  settings, warnings = None, []
  for path in paths:
    data = json.loads(storage.read_text(path))
    if settings is not None and data["settings"]["episodes"] != settings["episodes"]:
      raise ValueError(f"{path}: {data['settings']['episodes']} episodes per run, the files "
                       f"before it {settings['episodes']}; they do not make one comparison")
    settings = settings or data["settings"]
    warnings += data["settings"].get("warnings", [])  # absent in files written before them
    for key, r in data["results"].items():
      if key.split(":", 1)[1].split("@")[0] in BASELINE_ROWS and per_seed.get(key):
        continue
      per_seed[key] += r["per_seed"]
  results = {k: {"per_seed": v, "over_seeds": over_seeds(v)} for k, v in per_seed.items()}
  if out:
    storage.makedirs(out)
    write(out, {**(settings or {}), "merged_from": list(paths), "warnings": warnings}, results)
  return results


def write(out: str, settings: dict[str, Any], results: dict[str, dict[str, Any]],
          metrics=METRICS) -> None:
  """`results.json` (settings and results) and `results.md` (the table of `metrics`, then any
  warnings)."""
  storage.write_text(storage.join(out, "results.json"),
                     json.dumps({"settings": settings, "results": results}, indent=1))
  storage.write_text(storage.join(out, "results.md"), table(results, metrics) + "".join(
      f"\n> warning: {w}\n" for w in settings["warnings"]))
