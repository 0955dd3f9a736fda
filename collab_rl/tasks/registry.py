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
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
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


def config_task(config, **sim: Any):
  """The task an experiment config names (`config.task`), its scripted user as `config.sim`
  sets it, with `sim` fields on top."""
  return make_task(config.task, {**config.sim.to_dict(), **sim})
