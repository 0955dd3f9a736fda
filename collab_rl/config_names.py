"""One set of config names across the trainer families, and the older names they replace.

Every config reads the same key for the same thing, so that an SFT config and an RL config that
starts from it read alike and chain without renaming:

  num_steps               the run's length in steps (an RL step is one iteration: its rollouts,
                          then the update epochs over them)
  num_turns               assistant turns per conversation
  eval_batch_size         held-out episodes (or examples) per evaluation
  checkpoint.every_steps  steps between checkpoints
  task, sim               the task's name and its scripted user's settings (slots.SimConfig)

`RENAMED` maps each older key to its name now. A config (a file, or a `--config.<old>=...`
override) that still uses an older name fails with a message naming the new one (`check`,
`check_overrides`); a config saved with an older run's checkpoint is read under the new names
(`upgrade`), so that earlier runs stay restorable and evaluable.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

# Older key (dotted) -> the key now, and what to know when moving a value over.
RENAMED = {
    "num_iterations": ("num_steps", ""),
    "turns": ("num_turns", ""),
    "eval_batch": ("eval_batch_size", ""),
    "eval_batches": ("eval_batch_size", " (held-out examples now, not batches of batch_size)"),
    "checkpoint.every_iterations": ("checkpoint.every_steps", ""),
    "task.name": ("task", " (the task's name is the value of `task` itself)"),
    "task.sim": ("sim", " (the user's settings sit beside `task`, not under it)"),
    # What the data engine writes and offline DPO reads, and what DPO and the reward model rank
    # by, sit at the top of every config that has them.
    "dpo.candidates": ("candidates", ""),
    "dpo.min_gap": ("min_gap", ""),
    "dpo.data_dir": ("data_dir", ""),
}


def message(old: str) -> str:
  new, note = RENAMED[old]
  return f"config.{old} was renamed config.{new}{note}; see collab_rl/config_names.py"


def _has(tree: Mapping[str, Any], dotted: str) -> bool:
  node: Any = tree
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def check(config: Mapping[str, Any]) -> None:
  """Raises ValueError naming the new key when `config` holds an older one."""
  for old in RENAMED:
    if _has(config, old):
      raise ValueError(message(old))


def check_overrides(argv: Iterable[str], flag: str = "config") -> None:
  """Raises ValueError naming the new key for a `--config.<old>=value` override in `argv`,
  before the config parser reports it as an unknown field."""
  prefix = f"--{flag}."
  for arg in argv:
    if arg.startswith(prefix):
      key = arg[len(prefix):].split("=", 1)[0]
      for old in RENAMED:
        if key == old or key.startswith(old + "."):
          raise ValueError(message(old))


def upgrade(saved: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config (as a dict) under the current names; the input is left as it is."""
  out = copy.deepcopy(dict(saved))
  task = out.get("task")
  if isinstance(task, Mapping):  # {"name": ..., "sim": {...}} -> task, sim
    out["task"] = task.get("name")
    if "sim" in task:
      out.setdefault("sim", dict(task["sim"]))
  if "eval_batches" in out and "eval_batch_size" not in out:
    out["eval_batch_size"] = out.pop("eval_batches") * out.get("batch_size", 1)
  for old, (new, _) in RENAMED.items():
    *old_parents, old_leaf = old.split(".")
    parent = _node(out, old_parents)
    if isinstance(parent, dict) and old_leaf in parent:
      value = parent.pop(old_leaf)
      *new_parents, new_leaf = new.split(".")
      target = _node(out, new_parents)
      if isinstance(target, dict):
        target.setdefault(new_leaf, value)
  return out


def _node(tree: dict, path: list[str]) -> Any:
  for part in path:
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree
