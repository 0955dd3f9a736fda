"""The users an evaluation plays the test episodes against, and the episodes each one plays.

A user is a set of `slots.SimConfig` overrides and an episode source:

  reactive, sharded, noisy, ...  the named users of `tasks/users.py` (the ones training can mix)
  amb<rate>, missing<n>          another share of ambiguous requests (`amb0.2`), exactly n pieces
                                 left out of every ambiguous request (`missing3`, clipped to the
                                 task's slots)
  fresh                          the run's own training user, on episodes of a key that no split
                                 and no trainer uses (`FRESH_SEED`) instead of the test split
  name:field=value;field=value   an ad-hoc user (`evaluate --user_overrides`); `source=fresh`
                                 gives it the fresh episodes

A user's episodes are sampled by the task built with its overrides, from the test split's keys
(`data.builders`): the same slot values, but ambiguity and missing pieces drawn at its own rates
from the same uniforms, so `amb0.8`'s ambiguous requests include `amb0.5`'s and every arm meets
the same episodes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from collab_rl.data import builders
from collab_rl.tasks import registry
from collab_rl.tasks import slots as slots_lib
from collab_rl.tasks import users as users_lib

SOURCES = ("test", "fresh")
# Root of the fresh episodes: the splits use keys 0, 1, 2 and the trainers key(config.seed) with
# small seeds, so nothing was trained or selected on this stream.
FRESH_SEED = 2**31 - 1
FIELDS = {f.name: f.default for f in dataclasses.fields(slots_lib.SimConfig)}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.=-]*")  # rows are `<arm>@<name>`, files `<task>_<row>`


@dataclasses.dataclass(frozen=True)
class User:
  name: str
  sim: Mapping[str, Any]  # SimConfig overrides ({}: the run's own user)
  source: str = "test"  # "test": the test split's keys; "fresh": FRESH_SEED's


def named(name: str) -> User:
  """The user called `name` (a preset, `amb<rate>`, `missing<n>` or `fresh`)."""
  if name == "fresh":
    return User("fresh", {}, "fresh")
  try:
    return User(name, users_lib.overrides(name))
  except ValueError as e:
    raise ValueError(f"--users: {e}, fresh, or one defined with --user_overrides "
                     "name:field=value;field=value") from None


def _value(field: str, text: str, where: str) -> Any:
  kind = type(FIELDS[field])
  try:
    if kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    return kind(text)
  except ValueError:
    raise ValueError(f"{where}: {field}={text!r} is not a {kind.__name__}") from None


def parse_custom(spec: str) -> User:
  """`"hard:noise_wrong=0.3;min_missing=2"` -> User("hard", {...}); `source=fresh` plays it on
  the fresh episodes."""
  where = f"--user_overrides={spec!r}"
  name, sep, body = spec.partition(":")
  if not sep or not _NAME.fullmatch(name):
    raise ValueError(f"{where}: expected name:field=value;field=value, the name of letters, "
                     "digits and _.=- (it becomes the row suffix @name)")
  try:
    named(name)
  except ValueError:
    pass
  else:
    raise ValueError(f"{where}: {name!r} is a named user already; give this one its own name")
  sim, source = {}, "test"
  for item in (s.strip() for s in body.split(";")):
    if not item:
      continue
    field, eq, text = (x.strip() for x in item.partition("="))
    if not eq:
      raise ValueError(f"{where}: {item!r} is not field=value")
    if field == "source":
      if text not in SOURCES:
        raise ValueError(f"{where}: source={text!r}; known: {SOURCES}")
      source = text
    elif field in FIELDS:
      sim[field] = _value(field, text, where)
    else:
      raise ValueError(f"{where}: unknown field {field!r}; known SimConfig fields: "
                       f"{sorted(FIELDS)}, and source={'|'.join(SOURCES)}")
  return User(name, sim, source)


def resolve(users: Iterable[str | User], custom: Iterable[str] = ()) -> list[User]:
  """Users by name (or already built), then those `custom` defines (`parse_custom` specs) that
  the names leave out: defining a user is asking for it. Each name once, in order."""
  defined = {u.name: u for u in map(parse_custom, custom)}
  out = {}
  for u in users:
    u = u if isinstance(u, User) else defined.get(u) or named(u)
    out.setdefault(u.name, u)
  for name, u in defined.items():
    out.setdefault(name, u)
  return list(out.values())


def sim_for(user: User, config: Mapping[str, Any]) -> dict[str, Any]:
  """The simulator overrides that play `user` with a run of `config` (its saved task and sim):
  missing pieces clipped to the task's slots, checked against the run's own settings."""
  sim = dict(user.sim)
  num_slots = len(registry.task_class(config["task"]).slots)
  for field in ("min_missing", "max_missing"):
    if field in sim:
      sim[field] = min(int(sim[field]), num_slots)
  if sim and config["sim"].get("mixture"):  # a run trained on a mixture meets this user alone
    sim.setdefault("mixture", "")
  full = {**FIELDS, **config["sim"], **sim}
  if not 1 <= full["min_missing"] <= full["max_missing"] <= num_slots:
    raise ValueError(f"user {user.name!r} on {config['task']}: needs 1 <= min_missing <= "
                     f"max_missing <= {num_slots} slots, got {full['min_missing']}, "
                     f"{full['max_missing']} (override both)")
  return sim


def intents(task, n: int, source: str = "test") -> slots_lib.Intent:
  """The first n episodes of `source` as `task` (its simulator settings) samples them: the test
  split (the builders' definition) or the fresh stream, both in builders.CHUNK-sized chunks."""
  if source not in SOURCES:
    raise ValueError(f"unknown episode source {source!r}; known: {SOURCES}")
  num_chunks = -(-n // builders.CHUNK)
  if source == "test":
    chunks = [builders.sample_chunk(task, "test", c) for c in range(num_chunks)]
  else:
    root = jax.random.key(FRESH_SEED)
    chunks = [task.sample_intents(jax.random.fold_in(root, c), builders.CHUNK)
              for c in range(num_chunks)]
  intent = jax.tree_util.tree_map(lambda *x: jnp.concatenate(x), *chunks)
  return jax.tree_util.tree_map(lambda x: x[:n], intent)
