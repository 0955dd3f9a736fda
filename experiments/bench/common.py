"""What every benchmark here shares: median wall time after a warm-up, and the JSON output."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable


def median_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] = lambda x: x):
  """Median of `repeats` timed calls; the first (untimed) call pays for compilation."""
  sync(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def write_json(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


def typed(text: str):
  """A command-line value as the bool, int or float it reads as, else the text itself."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_xla_options(variant: str) -> dict:
  """`default` -> {}; `key=value[;key=value...]` -> XLA DebugOptions fields for JAX's
  `env_options_overrides`, typed (`typed`: XLA refuses the text "false" for a bool field)."""
  if variant == "default":
    return {}
  options = {}
  for pair in variant.split(";"):
    key, sep, text = pair.partition("=")
    if not sep or not key.startswith("xla_") or not text:
      raise ValueError(f"--options: {variant!r} is not `default` or xla_field=value pairs "
                       "joined by ';'")
    options[key] = typed(text)
  return options
