"""Multi-host training: 2 local processes x 4 CPU devices over gloo train as 1 process x 8 does.

The two-process run is "preempted" after step 3 (a checkpoint, then exit) and restarted with
`launch/local.sh`, which runs `python -m collab_rl.main --distributed` exactly as a TPU slice
does; the resumed run must end on the single-process run's params.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import subprocess_env
from collab_rl import checkpoint as ckpt_lib
from collab_rl.trainers import lm
from experiments import lm_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny lm_synthetic:runlocal; the same overrides go to the in-process run and to the command line.
OVERRIDES = {
    "model.vocab_size": 64, "model.hidden_size": 32, "model.intermediate_size": 64,
    "batch_size": 8, "seq_len": 16, "corpus.min_len": 6, "corpus.num_records": 256,
    "num_steps": 6, "log_every": 2, "eval_every": 2, "checkpoint.every_steps": 2,
}
CONFIG_FLAGS = ["--config=experiments/lm_synthetic.py:runlocal",
                *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]

# One process of the interrupted run: what collab_rl.main does, plus `stop_after`; then a check
# of sharding.to_host across processes.
_WORKER = """
import sys
import jax
tests_dir, address, process_id, workdir = sys.argv[1:]
jax.distributed.initialize(coordinator_address=address, num_processes=2,
                           process_id=int(process_id))
sys.path.insert(0, tests_dir)
import numpy as np
import test_multihost
from collab_rl import sharding
from collab_rl.trainers import lm
lm.train(test_multihost._config(), workdir, stop_after=3)
# Rows held by different processes come back whole on each (how trainers read evaluations).
rows = sharding.shard_batch(np.arange(4) + 4 * jax.process_index(), sharding.make_mesh())
assert (sharding.to_host(rows) == np.arange(8)).all()
"""


def _config():
  config = lm_synthetic.get_config("runlocal")
  config.update_from_flattened_dict(OVERRIDES)
  return config


def _env(cache_dir: str):
  """The processes' environment: 4 CPU devices each (with the suite's compiler flags), gloo,
  and one compilation cache, so the restarted run's processes read what the interrupted run's
  compiled."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=subprocess_env.xla_flags(4), JAX_PLATFORMS="cpu",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_interrupted(workdir: str, env: dict) -> None:
  address = f"127.0.0.1:{_free_port()}"
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, tests_dir, address, str(i), workdir],
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for i, p in enumerate(procs):
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"


def test_two_processes_match_one_process_and_resume(tmp_path):
  config = _config()
  one = lm.train(config, str(tmp_path / "one"))  # 1 process x 8 devices, in this process
  params_one = jax.device_get(one["state"].params)

  workdir, env = tmp_path / "two", _env(str(tmp_path / "jit_cache"))
  _run_interrupted(str(workdir), env)
  r = subprocess.run([os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "-d", "4", "--",
                      *CONFIG_FLAGS, f"--workdir={workdir}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=240)
  logs = [(workdir / "logs" / f"process_{i}.log").read_text() for i in range(2)]
  assert r.returncode == 0, r.stderr[-2000:] + logs[1][-2000:]
  for log in logs:
    assert "8 devices (4 local)" in log
    assert "Train state: resumed step 3." in log

  # Only process 0 writes metrics: one line per logged step across the restart.
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4, 6]

  # Both processes' checkpoint restores here into the 8-device shardings.
  built = lm.build(config, lm.check_config(config))
  with ckpt_lib.Checkpointer(str(workdir / "checkpoints")) as checkpointer:
    assert checkpointer.latest_step() == 6
    state_two, data_state = checkpointer.restore(built.abstract)
  assert data_state is not None
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      params_one, jax.device_get(state_two.params))
