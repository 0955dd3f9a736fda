"""Task names to task objects, imported lazily so that a config names a task by string."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from collab_rl.tasks import slots as slots_lib

TASKS = {
    "ambig_math": ("collab_rl.tasks.ambig_math", "AmbigMath"),
    "doc_edit": ("collab_rl.tasks.doc_edit", "DocEdit"),
    "code_spec": ("collab_rl.tasks.code_spec", "CodeSpec"),
}


def task_class(name: str):
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)} (and {TEXT_TASK!r}, the "
                     "language tier, from a config)")
  module, cls = TASKS[name]
  return getattr(importlib.import_module(module), cls)


def make_task(name: str, sim: Mapping[str, Any] | slots_lib.SimConfig | None = None):
  """`make_task("ambig_math", {"ambiguous_rate": 0.5, "sharded": True})`."""
  if sim is None:
    sim = slots_lib.SimConfig()
  elif not isinstance(sim, slots_lib.SimConfig):
    fields = set(slots_lib.SimConfig.__dataclass_fields__)
    unknown = set(sim) - fields
    if unknown:
      raise ValueError(f"unknown simulator fields {sorted(unknown)} for task {name!r}; "
                       f"known: {sorted(fields)}")
    sim = slots_lib.SimConfig(**sim)
  return task_class(name)(sim)


TEXT_TASK = "collabllm"  # CollabLLM records against an LM user (tasks/text.py)


def config_task(config, **sim: Any):
  """The task an experiment config names (`config.task`), its user as `config.sim` sets it, with
  `sim` fields on top. `collabllm` is the language tier (`text.from_config`), whose replies a
  conversation may reach are `max_turns` (`sim` field; default `config.num_turns`)."""
  if config.task == TEXT_TASK:
    from collab_rl.tasks import text  # pylint: disable=g-import-not-at-top  (loads no weights)
    return text.from_config(config, max_turns=sim.get("max_turns"))
  return make_task(config.task, {**config.sim.to_dict(), **sim})
