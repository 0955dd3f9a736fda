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
