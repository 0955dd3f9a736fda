"""One config field swept over the RL arms of the headline sweep (`headline.py --sweep`), and the
plot of the result per task.

  python -m experiments.headline --workdir runs/headline --tasks ambig_math,doc_edit \
      --seeds 0,1,2 --arms sft_base,ppo_ext_int,ppo_mr_w2 --sweep w_int=0,0.1,0.25,0.5,1.0
  python -m experiments.headline_sweep --results runs/headline/results.json --sweep w_int

Each value of the field is one run per (task, seed, RL arm), `<task>/seed<k>/<arm>@w_int=<v>`,
started from the (task, seed)'s one SFT base with `--config.reward.w_int=<v>`; `evaluate`
names it `<arm>[w_int=<v>]`. Arms the field does not concern (the base, the mediator, the data
engine and offline DPO, whose pairs the data engine ranked) run once, as without a sweep.

`w_int` is the weight of interactivity in R*. With next-turn rewards and gamma = 0, asking earns
`w_int` times the share of missing pieces asked, a guess its task score, so the next-turn
extrinsic + intrinsic arm should ask exactly when `w_int` is above the value of a guess; MR
counts what the answer after the question earns. The plot (`plots/<task>_w_int_sweep.png`)
shows task score and ask-when-ambiguous against `w_int`, one line per arm with the over-seed 95%
interval, and that guess value as a vertical line: the base's score on ambiguous requests
(`score_ambiguous` of the sft_base row) in an evaluation of ONE assistant turn
(`headline.py` runs it into `<workdir>/guess/`; `--guess <its results.json>` here), which is
what a next-turn reward pays the first reply. (The main evaluation's 4-turn score also counts
the guesses after a "wrong", and overstates it; it is the fallback where no 1-turn evaluation
is given.) `<field>_sweep.json` next to results.json holds the plotted numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

# Short names of swept config fields (anything else is a dotted config path, e.g. reward.samples).
FIELDS = {"w_int": "reward.w_int", "w_ext": "reward.w_ext", "token_cost": "reward.token_cost"}
PANELS = ("score", "ask_when_ambiguous")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_VALUE = re.compile(r"[A-Za-z0-9_.+-]+")
# `evaluate.arm_label` of `<arm>@<name>=<value>`; rows against other users (`@user`) are not
# sweep points.
_ROW = re.compile(r"(?P<arm>[^\[\]@]+)\[(?P<name>[^=\]]+)=(?P<value>[^\]]+)\]")


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str  # in run directories and rows: w_int
  field: str  # the config path: reward.w_int
  values: tuple[str, ...]  # as given, so directories keep the spelling of the command line

  def tag(self, value: str) -> str:
    return f"{self.name}={value}"

  def override(self, value: str) -> str:
    return f"--config.{self.field}={value}"


def swept(arm: str) -> bool:
  """The arms a reward field concerns: PPO's and online DPO's (offline DPO's pairs were ranked
  by the data engine, which is not swept)."""
  return arm.startswith("ppo_") or arm == "dpo_online"


def parse(spec: str) -> Sweep | None:
  """`"w_int=0,0.1,0.5"` -> Sweep("w_int", "reward.w_int", ("0", "0.1", "0.5")); "" -> None."""
  if not spec:
    return None
  name, sep, values = spec.partition("=")
  vals = tuple(v.strip() for v in values.split(","))
  if not sep or not _NAME.fullmatch(name):
    raise ValueError(f"--sweep={spec!r}: expected field=v1,v2,... (e.g. w_int=0,0.1,0.5)")
  bad = [v for v in vals if not _VALUE.fullmatch(v)]
  if bad or len(set(vals)) != len(vals):
    raise ValueError(f"--sweep={spec!r}: values must be distinct and of letters, digits and "
                     f"_.+- (they name run directories); got {list(vals)}")
  return Sweep(name, FIELDS.get(name, name), vals)


def check(sweep: Sweep, arms: Sequence[str], get_config) -> None:
  """Fails unless some arm is swept and every swept arm's config (`get_config(arm)`) has the
  field, so a misspelt field fails here, not in every run."""
  arms = [a for a in arms if swept(a)]
  if not arms:
    raise ValueError(f"--sweep={sweep.name}: none of --arms is an arm it sweeps (ppo_*, "
                     "dpo_online)")
  for arm in arms:
    node = get_config(arm)
    for part in sweep.field.split("."):
      if part not in node:
        raise ValueError(f"--sweep={sweep.name}: config field {sweep.field!r} is not in arm "
                         f"{arm}'s config (short names: {FIELDS})")
      node = node[part]


# ------------------------------------------------------------------------------------------------
# The result: numbers per sweep point, and the plot.
# ------------------------------------------------------------------------------------------------


def points(results: dict[str, Any], name: str,
           guess: dict[str, Any] | None = None) -> dict[str, Any]:
  """{task: {"guess": the base's score on ambiguous requests (nan where unmeasured), "arms":
  {arm: {metric: [[x, mean, ci], ...] by x}}}} from an evaluation's results (results.json's
  "results"): its rows `<arm>[<name>=<x>]`. The guess value is read from `guess` (the results
  of a 1-turn evaluation of the bases) where given, else from `results`."""
  out: dict[str, Any] = {}
  for key, r in results.items():
    task, row = key.split(":", 1)
    m = _ROW.fullmatch(row)
    if not m or m.group("name") != name:
      continue
    try:
      x = float(m.group("value"))
    except ValueError:
      raise ValueError(f"row {key}: {name}={m.group('value')!r} is not a number to plot") from None
    arm = out.setdefault(task, {"arms": {}})["arms"].setdefault(m.group("arm"), {})
    for metric in PANELS:
      s = r["over_seeds"][metric]
      arm.setdefault(metric, []).append([x, s["mean"], s["ci"]])
  for task, p in out.items():
    for arm in p["arms"].values():
      for series in arm.values():
        series.sort()
    base = (guess if guess is not None else results).get(f"{task}:sft_base", {})
    base = base.get("per_seed", [])
    guesses = [s["score_ambiguous"]["mean"] for s in base if "score_ambiguous" in s]
    p["guess"] = float(np.mean(guesses)) if guesses else float("nan")
    p["guess_per_seed"] = guesses
  return out


def plot(results: dict[str, Any], name: str, out: str,
         guess: dict[str, Any] | None = None) -> list[str]:
  """`plots/<task>_<name>_sweep.png` per task with sweep points in `results`; their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from collab_rl import results as results_lib  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.join(out, "plots"), exist_ok=True)
  paths = []
  for task, p in sorted(points(results, name, guess).items()):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, PANELS):
      for arm, series in sorted(p["arms"].items()):
        x, mean, ci = np.array(series[metric], np.float64).T
        ax.errorbar(x, mean, yerr=np.nan_to_num(ci), marker="o", capsize=3, label=arm)
      if not math.isnan(p["guess"]):
        ax.axvline(p["guess"], color="gray", linestyle="--",
                   label=f"base's guess value ({p['guess']:.2f})")
      ax.set_xlabel(name)
      ax.set_ylim(-0.05, 1.05)
      ax.set_title(f"{task}: {results_lib.COLUMNS[metric]}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "plots", f"{task}_{name}_sweep.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
  return paths


def write(results: dict[str, Any], name: str, out: str,
          guess: dict[str, Any] | None = None) -> list[str]:
  """`<name>_sweep.json` (the plotted numbers) and the plots into `out`; the plots' paths."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{name}_sweep.json"), "w") as f:
    json.dump(points(results, name, guess), f, indent=1)
  return plot(results, name, out, guess)


def read_results(path: str) -> dict[str, Any]:
  """results.json's "results", with an error that names the file."""
  try:
    with open(path) as f:
      return json.load(f)["results"]
  except (OSError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {path}: not an evaluation's results.json ({e})") from None


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  results = read_results(f.results)
  guess = read_results(f.guess) if f.guess else None
  out = f.out or os.path.dirname(os.path.abspath(f.results))
  paths = write(results, f.sweep, out, guess)
  if not paths:
    raise SystemExit(f"error: no row <arm>[{f.sweep}=<value>] in {f.results}")
  print("\n".join(paths))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("results", None, "results.json of an evaluation with sweep rows.",
                      required=True)
  flags.DEFINE_string("sweep", "w_int", "The swept field's short name, as in the rows.")
  flags.DEFINE_string("guess", "", "results.json of a 1-turn evaluation of the bases (the "
                      "value of a first guess); default: the guess value read from --results.")
  flags.DEFINE_string("out", None, "Where plots/ and the sweep JSON go (default: next to "
                      "--results).")
  app.run(main)
