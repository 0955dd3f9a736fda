"""Named scripted users, and mixtures of them drawn per episode.

A user is a set of `slots.SimConfig` overrides: how often requests are ambiguous, how many pieces
they leave out, how noisy the answers are, whether the user reveals pieces unasked (sharded).
Evaluation plays the test episodes against users a policy never met (`evaluate --users`), and
training can sample the user per episode from a mixture (`sim.mixture`), so that one policy
meets all of them.

Names: the presets in `PRESETS`, plus `amb<rate>` (e.g. `amb0.2`: that share of ambiguous
requests) and `missing<n>` (exactly n pieces left out of every ambiguous request).

A mixture is a comma-separated list of `name` or `name:weight` (`"reactive:2,sharded,noisy"`:
half reactive, a quarter each of the others). Only the fields that can change per episode may
differ between its users (`PER_EPISODE`); the rest (reply budget, instruction rate) set shapes or
their own streams and stay the task's.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PRESETS: dict[str, dict[str, Any]] = {
    "reactive": {"sharded": False},  # answers what it is asked, nothing more
    "sharded": {"sharded": True},  # also reveals the next missing piece every turn, unasked
    "noisy": {"noise_vague": 0.15, "noise_wrong": 0.15},  # vague and wrong answers
    "feedback": {"feedback_reveals": True},  # a wrong answer's feedback gives a missing piece
}
# SimConfig fields a mixture may vary per episode (read as [B] arrays on device).
PER_EPISODE = ("ambiguous_rate", "min_missing", "max_missing", "noise_vague", "noise_wrong",
               "feedback_reveals", "sharded")
_AMB = re.compile(r"amb(?P<rate>[0-9]*\.?[0-9]+)$")
_MISSING = re.compile(r"missing(?P<n>[0-9]+)$")


def overrides(name: str) -> dict[str, Any]:
  """The SimConfig overrides of the user called `name`."""
  if name in PRESETS:
    return dict(PRESETS[name])
  m = _AMB.match(name)
  if m:
    return {"ambiguous_rate": float(m.group("rate"))}
  m = _MISSING.match(name)
  if m:
    n = int(m.group("n"))
    return {"min_missing": n, "max_missing": n}
  raise ValueError(f"unknown user {name!r}; known: {sorted(PRESETS)}, amb<rate> (e.g. amb0.2), "
                   "missing<n> (e.g. missing3)")


def parse_mixture(spec: str) -> tuple[tuple[str, float], ...]:
  """`"reactive:2,sharded"` -> (("reactive", 2/3), ("sharded", 1/3)); "" -> ()."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  out = []
  for p in parts:
    name, _, weight = p.partition(":")
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      raise ValueError(f"sim.mixture={spec!r}: weight {weight!r} of {name!r} is not a number")
    if not w > 0:
      raise ValueError(f"sim.mixture={spec!r}: weight of {name!r} must be positive, got {w}")
    overrides(name)  # unknown names fail here
    out.append((name, w))
  total = sum(w for _, w in out)
  return tuple((n, w / total) for n, w in out)


@flax.struct.dataclass
class UserParams:
  """Per-episode user settings, [B] each (a mixture's draw); None in `Intent.user`: the task's."""
  component_B: jax.Array  # int32 index into the mixture
  noise_vague_B: jax.Array  # float32
  noise_wrong_B: jax.Array  # float32
  feedback_reveals_B: jax.Array  # bool
  sharded_B: jax.Array  # bool


class Mixture:
  """The users of a mixture as [C] tables, and their per-episode draw."""

  def __init__(self, spec: str, base: Mapping[str, Any], num_slots: int):
    self.spec = parse_mixture(spec)
    if not self.spec:
      raise ValueError("an empty mixture: give at least one user")
    rows = []
    for name, _ in self.spec:
      cfg = {k: base[k] for k in PER_EPISODE}
      cfg.update(overrides(name))
      if not 1 <= cfg["min_missing"] <= cfg["max_missing"] <= num_slots:
        raise ValueError(f"sim.mixture user {name!r}: need 1 <= min_missing <= max_missing <= "
                         f"{num_slots} slots, got {cfg['min_missing']}, {cfg['max_missing']}")
      if not 0 <= cfg["ambiguous_rate"] <= 1:
        raise ValueError(f"sim.mixture user {name!r}: ambiguous_rate must be in [0, 1]")
      rows.append(cfg)
    self.table = {k: np.array([r[k] for r in rows]) for k in PER_EPISODE}
    self.cum_weights_C = np.cumsum([w for _, w in self.spec])

  def draw(self, key, batch: int) -> tuple[UserParams, dict[str, jax.Array]]:
    """Per-episode users, and the [B] sampling fields (ambiguous_rate, min/max_missing)."""
    u_B = jax.random.uniform(key, (batch,))
    comp_B = jnp.minimum(jnp.searchsorted(jnp.asarray(self.cum_weights_C), u_B, side="right"),
                         len(self.spec) - 1).astype(jnp.int32)
    col = lambda k, dtype: jnp.asarray(self.table[k], dtype)[comp_B]
    user = UserParams(comp_B, col("noise_vague", jnp.float32), col("noise_wrong", jnp.float32),
                      col("feedback_reveals", bool), col("sharded", bool))
    sampling = {k: col(k, jnp.float32 if k == "ambiguous_rate" else jnp.int32)
                for k in ("ambiguous_rate", "min_missing", "max_missing")}
    return user, sampling
