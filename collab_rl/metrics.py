"""Metric writers: TensorBoard event files (tensorboardX) and a JSONL log, from process 0 only.

The JSONL file (`workdir/metrics.jsonl`, one `{"step": ..., **scalars}` object per line) is
what evaluation and plots read back; TensorBoard is for watching a run. On a local disk both are
flushed on every write, so a killed run keeps every line it wrote; a `gs://` workdir is written
through `storage` (whole objects, at most every `storage.REMOTE_FLUSH_S` seconds and at close).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import tensorboardX
import tqdm

from collab_rl import storage

Scalar = float | int | jax.Array | np.ndarray | np.generic


def _is_writer_process(enabled: bool | None) -> bool:
  # Even an explicit enabled=True stays off on other processes: they share the workdir.
  return (True if enabled is None else enabled) and jax.process_index() == 0


def _to_float(name: str, value: Scalar) -> float:
  array = np.asarray(jax.device_get(value))
  if array.size != 1:
    raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
  return float(array.reshape(()))


def _jsonable(hparams: Any) -> Any:
  """A JSON-able copy of a config (ConfigDict or mapping); odd leaves become their repr."""
  if hasattr(hparams, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(hparams.to_json_best_effort())

  def fallback(obj):
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
      return np.asarray(obj).tolist()
    if hasattr(obj, "to_dict"):
      return obj.to_dict()
    return repr(obj)

  return json.loads(json.dumps(hparams, default=fallback))


class MetricWriter:
  """Writes scalars to `workdir/tb` (TensorBoard) and `workdir/metrics.jsonl`; the workdir may
  be local or a `gs://` URL (`storage`)."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.workdir = os.fspath(workdir)
    self.enabled = _is_writer_process(enabled)
    self.jsonl_path = storage.join(self.workdir, "metrics.jsonl")
    self._tb = None
    self._jsonl = None
    if self.enabled:
      storage.makedirs(self.workdir)
      self._tb = tensorboardX.SummaryWriter(logdir=storage.join(self.workdir, "tb"))
      # Grows: a resumed run continues the same log.
      self._jsonl = storage.GrowingFile(self.jsonl_path)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    if not self.enabled:
      return
    step = int(step)
    values = {name: _to_float(name, value) for name, value in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.flush()

  def write_hparams(self, hparams: Mapping | Any) -> None:
    """Saves the config as `workdir/config.json` and as a TensorBoard text summary."""
    if not self.enabled:
      return
    config = _jsonable(hparams)
    text = json.dumps(config, indent=2, sort_keys=True)
    storage.write_text(storage.join(self.workdir, "config.json"), text + "\n")
    # Indented lines render as a code block in TensorBoard's markdown.
    self._tb.add_text("hparams", "    " + text.replace("\n", "\n    "), global_step=0)
    self.flush()

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled and self._jsonl is not None:
      self.flush()
      self._tb.close()
      self._jsonl.close()
      self._jsonl = None
      self.enabled = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str) -> list[dict]:
  """Reads a JSONL metrics file; a torn last line (run killed mid-write) is skipped."""
  lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
      logging.warning("%s: skipping a torn last line.", path)
  return records


def progress(iterable: Iterable | None = None, *, total: int | None = None,
             desc: str | None = None, initial: int = 0,
             enabled: bool | None = None) -> tqdm.tqdm:
  """A tqdm bar for long host loops; silent on processes other than 0 or when not enabled."""
  return tqdm.tqdm(iterable, total=total, desc=desc, initial=initial,
                   disable=not _is_writer_process(enabled), dynamic_ncols=True)
