"""Real training processes for the reliability tests: launch, watch, read back, compare.

Every process is `python -m collab_rl.main` on a tiny `lm_synthetic:runlocal` (or the same entry
point with one planted SIGKILL, `faulty_main.py`) on 2 fake CPU devices. The processes of a test
session share a persistent compilation cache: only the first one compiles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULTY_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faulty_main.py")
EVERY = 4  # checkpoint and evaluation interval, steps


def tiny_args(num_steps: int) -> list[str]:
  return ["--config=experiments/lm_synthetic.py:runlocal", "--config.model.vocab_size=64",
          "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
          "--config.batch_size=8", "--config.seq_len=16", "--config.corpus.min_len=6",
          "--config.corpus.num_records=256", f"--config.num_steps={num_steps}",
          "--config.log_every=1", f"--config.eval_every={EVERY}",
          f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.max_to_keep=1000"]


def process_env(cache_dir: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(XLA_FLAGS=subprocess_env.xla_flags(2), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def launch(env: dict[str, str], workdir: str, num_steps: int, fault: str | None = None,
           fault_log: str | None = None, extra_args=()) -> subprocess.Popen:
  script = [FAULTY_MAIN] if fault else ["-m", "collab_rl.main"]
  extra = {"FAULT": fault, "FAULT_LOG": str(fault_log)} if fault else {}
  return subprocess.Popen([sys.executable, *script, *tiny_args(num_steps), *extra_args,
                           f"--workdir={workdir}"],
                          cwd=ROOT, env={**env, **extra}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


class Process:
  """A launched training process whose stderr is drained by a thread (so it never blocks)."""

  def __init__(self, proc: subprocess.Popen):
    self.proc, self.lines, self.started = proc, [], threading.Event()
    self._reader = threading.Thread(target=self._drain, daemon=True)
    self._reader.start()

  def _drain(self) -> None:
    for line in self.proc.stderr:
      self.lines.append(line)
      if "Train state:" in line:  # logged once the state is restored, right before step 1
        self.started.set()
    self.started.set()

  def wait(self, timeout: float = 240) -> int:
    rc = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return rc

  def how(self) -> str:
    found = [m.group(1) for line in self.lines if (m := re.search(r"Train state: (.*)\.$", line))]
    assert len(found) == 1, "".join(self.lines[-40:])
    return found[0]


def complete_steps(workdir: str) -> list[int]:
  """Steps committed on disk (an unfinished save is a `<step>.orbax-checkpoint-tmp-*` dir)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def read_state(workdir: str, step: int) -> dict:
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, restore_args=args)


def metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def assert_same_run(reference: str, workdir: str, num_steps: int) -> None:
  """Final states equal bit for bit; every logged step (replays included) equals the reference."""
  want, got = read_state(reference, num_steps), read_state(workdir, num_steps)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  jax.tree.map(np.testing.assert_array_equal, want, got)
  by_step = {m["step"]: m for m in metrics(reference)}
  seen = metrics(workdir)
  assert {m["step"] for m in seen} == set(by_step)
  for m in seen:  # throughput differs from run to run; everything else must not
    for key, value in m.items():
      if key != "tokens_per_s":
        assert value == by_step[m["step"]][key], (m["step"], key)
