"""The import floors of README's "Layout": every import of a collab_rl module points to its own
floor or one below, no trainer imports another trainer, and every module has a floor."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Module (or package prefix) -> floor, as README's "Layout" and ../shared/DESIGN.md list them.
FLOORS = {
    # sharding (mesh, partition rules) imports nothing of collab_rl; models/hf places loaded
    # weights with it.
    "conversation": 1, "models": 1, "tokenizer": 1, "sharding": 1, "config_names": 1,
    "storage": 1,
    "sampling": 2, "checkpoint": 2, "restore": 2, "frozen_base": 2, "metrics": 2,
    "train_state": 2,
    "tasks": 3, "simulators": 3, "rollout": 3, "mediator": 3,
    "rewards": 4, "reward_model": 4, "advantages": 4, "losses": 4, "data": 4, "sft": 4,
    "results": 4, "eval_users": 4, "text_scores": 4,
    "run": 5, "run_rl": 5, "run_text": 5,  # the run scaffold under the trainers
    "trainers": 6, "evaluate": 6, "evaluate_text": 6,
    "main": 7,
}


def _modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(os.path.join(ROOT, "collab_rl")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def floor(module: str) -> int:
  parts = module.split(".")[1:]  # without "collab_rl"
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in FLOORS:
      return FLOORS[".".join(parts[:n])]
  raise KeyError(f"{module} has no floor: add it to FLOORS and to README's Layout")


def imports(path: str, modules: dict[str, str]) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("collab_rl"):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        out.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("collab_rl.")}
  return {m for m in out if m in modules and m.count(".") >= 1}


def test_floor_lookup_fails_for_an_unplaced_module():
  assert floor("collab_rl.tasks.slots") == 3 and floor("collab_rl.trainers.ppo") == 6
  with pytest.raises(KeyError, match="collab_rl.nowhere has no floor"):
    floor("collab_rl.nowhere")


def test_imports_point_down_and_trainers_stand_alone():
  modules = _modules()
  bad = []
  for name, path in sorted(modules.items()):
    if name.count(".") == 0 or name in ("collab_rl.trainers", "collab_rl.tasks",
                                        "collab_rl.models", "collab_rl.data"):
      continue  # package roots
    for dep in sorted(imports(path, modules)):
      if floor(dep) > floor(name):
        bad.append(f"{name} (floor {floor(name)}) imports {dep} (floor {floor(dep)})")
      if name.startswith("collab_rl.trainers.") and dep.startswith("collab_rl.trainers."):
        bad.append(f"trainer {name} imports trainer {dep}")
  assert not bad, "\n".join(bad)
