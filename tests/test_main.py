"""The absl entry point, run as users run it: a subprocess with config overrides."""

import json
import os
import subprocess
import sys

import pytest

import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=240):
  env = {**os.environ, "XLA_FLAGS": subprocess_env.xla_flags(2)}
  return subprocess.run([sys.executable, "-m", "collab_rl.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_end_to_end_run_writes_metrics_and_checkpoints(tmp_path):
  workdir = tmp_path / "run"
  r = _main("--config=experiments/lm_synthetic.py:runlocal", "--config.num_steps=20",
            "--config.log_every=10", "--config.eval_every=10", "--config.checkpoint.every_steps=10",
            "--config.seq_len=16", "--config.batch_size=8", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [10, 20]
  assert {"loss", "eval_loss", "grad_norm", "tokens_per_s"} <= set(lines[-1])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
  assert json.loads((workdir / "config.json").read_text())["num_steps"] == 20
  assert list((workdir / "tb").iterdir())


@pytest.mark.parametrize("override, match", [
    ("--config.no_such_field=1", "no_such_field"),
    ("--config.batch_size=many", "batch_size=many"),
    ("--config.trainer=ppo_v9", "config.trainer='ppo_v9' is not a known trainer"),
    # An older name (collab_rl/config_names.py) is answered with the one it has now.
    ("--config.num_iterations=5",
     "FATAL config error: config.num_iterations was renamed config.num_steps"),
])
def test_bad_overrides_give_one_clear_line(override, match, tmp_path):
  r = _main("--config=experiments/lm_synthetic.py:runlocal", override,
            f"--workdir={tmp_path / 'bad'}", timeout=120)
  assert r.returncode != 0
  assert match in r.stderr
  assert not (tmp_path / "bad").exists()
