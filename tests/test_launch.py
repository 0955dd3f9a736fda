"""Launchers and pod plans: the dry run of a spot v5e-256 sweep, the preemption loop against a fake
gcloud, clear errors for bad input, local.sh's checks, slice tables and the README memory plan."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from experiments import memory_plan
from experiments import pods
from experiments import collab_arms_sweep
from launch import checks
from launch import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = ["sweep", "--sweep=experiments/collab_arms_sweep.py", "--name=abl",
         "--zone=us-west4-a", "--accelerator=v5e-256", "--spot", "--workdir=gs://bkt/ablation",
         "--dry-run"]
MAIN_ARGS = ["--config.batch_size=256", "--config.eval_batch_size=256"]  # 256 chips: 256 rows


def _commands(out: str) -> list[list[str]]:
  return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("queued", [False, True])
def test_dry_run_of_a_spot_v5e_256_sweep(queued, capsys):
  tpu.main(SWEEP + (["--queued"] if queued else []) + ["--", *MAIN_ARGS])
  commands = _commands(capsys.readouterr().out)
  assert all(c[:3] == ["gcloud", "compute", "tpus"] for c in commands)
  arms = [name for name, _ in collab_arms_sweep.ARMS]
  group = "queued-resources" if queued else "tpu-vm"
  for arm in arms:
    name = f"abl-{arm}"
    mine = [c for c in commands if name in c or any(a.startswith(f"{name}:") for a in c)]
    verbs = [(c[3], c[4]) for c in mine]
    assert verbs == [(group, "create"), ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                     (group, "delete")], verbs
    create, scp, install, train, delete = mine
    assert {"--zone=us-west4-a", "--accelerator-type=v5litepod-256", "--spot"} <= set(create)
    assert ("--runtime-version=v2-alpha-tpuv5-lite" if queued
            else "--version=v2-alpha-tpuv5-lite") in create
    assert (f"--node-id={name}" in create) == queued
    assert "--worker=all" in scp and "--worker=all" in install and "--worker=all" in train
    assert "jax[tpu]" in install[-2]  # the --command, then the keep-alive --ssh-flag
    command = next(a for a in train if a.startswith("--command="))
    main_argv = shlex.split(command.split("&&", 1)[1].split("2>&1")[0])
    variant = dict(collab_arms_sweep.ARMS)[arm]
    assert main_argv[1:] == [
        "-m", "collab_rl.main",
        f"--config=experiments/collab_arms.py:arm={variant},task=ambig_math,seed=0,size=small",
        f"--workdir=gs://bkt/ablation/{arm}", "--distributed",
        "--config.init_from=gs://bkt/ablation/sft_base/checkpoints",
        "--config.batch_size=256", "--config.eval_batch_size=256"]
    assert ("--force" in delete) == queued and "--quiet" in delete


STAGE = ["--stage=/tmp/llama31=gs://bkt/models/Llama-3.1-8B-Instruct",
         "--stage=/tmp/collabllm=gs://bkt/collabllm_data"]
FOLDERS = ["--config.init_from_hf=/tmp/llama31", "--config.sim.user_from=/tmp/llama31",
           "--config.data_dir=/tmp/collabllm"]


def _collabllm_8b(accelerator, flags=(), main_args=FOLDERS, variant=""):
  return ["watch", "--name=cllm", "--zone=us-west4-a", f"--accelerator={accelerator}", "--spot",
          f"--config=experiments/collabllm_8b.py:slice={accelerator}{variant}",
          "--workdir=gs://bkt/cllm", *STAGE, "--dry-run", *flags, "--", *main_args]


@pytest.mark.parametrize("lora_rank", [0, 32])
@pytest.mark.parametrize("accelerator, chips, mesh, batch", [
    ("v5litepod-64", 64, "(1, 64, 1)", 128), ("v4-64", 32, "(1, 32, 1)", 64),
    ("v5litepod-256", 256, "(4, 64, 1)", 512)])
def test_dry_run_of_llama_8b_collabllm(accelerator, chips, mesh, batch, lora_rank, capsys):
  """Full fine-tuning, and LoRA r = 32 as CollabLLM trains it (`--config.lora.rank=32`)."""
  folders = FOLDERS + ([f"--config.lora.rank={lora_rank}"] if lora_rank else [])
  tpu.main(_collabllm_8b(accelerator, main_args=folders))
  commands = _commands(capsys.readouterr().out)
  verbs = [(c[3], c[4]) for c in commands]
  assert verbs == [("tpu-vm", "create"), ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                   ("tpu-vm", "ssh"), ("tpu-vm", "delete")], verbs
  create, scp, install, stage, train, delete = commands
  s = pods.get_slice(accelerator)
  assert {f"--accelerator-type={accelerator}", f"--version={s.runtime_version}", "--spot",
          "--zone=us-west4-a"} <= set(create)
  assert all("--worker=all" in c for c in (scp, install, stage, train))
  assert "jax[tpu]" in install[-2]
  # Every worker copies the checkpoint and the records to the folders the config names, then runs.
  assert next(a for a in stage if a.startswith("--command=")) == (
      "--command=mkdir -p /tmp/llama31 && gcloud storage rsync --recursive "
      "gs://bkt/models/Llama-3.1-8B-Instruct /tmp/llama31 && mkdir -p /tmp/collabllm && "
      "gcloud storage rsync --recursive gs://bkt/collabllm_data /tmp/collabllm")
  command = next(a for a in train if a.startswith("--command="))
  main_argv = shlex.split(command.split("&&", 1)[1].split("2>&1")[0])
  assert main_argv[1:] == ["-m", "collab_rl.main",
                           f"--config=experiments/collabllm_8b.py:slice={accelerator}",
                           "--workdir=gs://bkt/cllm", "--distributed", *folders]
  assert delete[-1] == "--quiet"
  # The config the workers load: the 8B mesh for this slice, one conversation a chip per update
  # step (two a chip per iteration), bf16 compute over fp32 master weights.
  config = checks.load_config(f"experiments/collabllm_8b.py:slice={accelerator}", folders)
  assert config.lora.rank == lora_rank
  assert (str(tuple(config.mesh_shape)), config.batch_size) == (mesh, batch)
  assert mesh == str(pods.policy_8b_mesh(accelerator))
  assert config.batch_size // config.ppo.minibatches == chips == config.eval_batch_size
  assert (config.model.dtype, config.model.param_dtype, config.model.remat) == (
      "bfloat16", "float32", True)
  assert (config.reward.kind, config.reward.window, config.reward.samples) == ("mr", 2, 3)


@pytest.mark.parametrize("flags, main_args, variant, match", [
    ([], FOLDERS[:2] + ["--config.data_dir=gs://bkt/collabllm_data"], "",
     "config.data_dir='gs://bkt/collabllm_data': the workers read it as a local folder, not from "
     "GCS; copy it there with --stage=/tmp/collabllm_data=gs://bkt/collabllm_data"),
    ([], FOLDERS[:2] + ["--config.data_dir=/home/me/data"], "",
     "config.data_dir='/home/me/data' is not on the workers"),
    ([], FOLDERS[1:], "", "config.init_from_hf is not set"),
    ([], FOLDERS + ["--config.lora.rank=32", "--config.lora.dropout=1.5"], "",
     "lora.dropout=1.5 must be in [0, 1)"),
    ([], FOLDERS, ",judge", "config.judge.folder is not set"),
    (["--stage=llama=gs://bkt/x"], FOLDERS, "", "--stage='llama=gs://bkt/x': give LOCAL=gs://"),
    (["--accelerator=v4-64"], FOLDERS, "", "config.mesh_shape=(1, 64, 1) of experiments/"
     "collabllm_8b.py:slice=v5litepod-64: mesh shape {'data': 1, 'fsdp': 64, 'model': 1} needs "
     "64 devices"),
])
def test_bad_llama_8b_input_names_the_field(flags, main_args, variant, match):
  argv = _collabllm_8b("v5litepod-64", main_args=main_args, variant=variant)
  for f in flags:  # a later flag wins in argparse
    argv.insert(argv.index("--"), f)
  with pytest.raises(checks.LaunchError, match=re.escape(match)):
    tpu.main(argv)


@pytest.mark.parametrize("flags, main_args, match", [
    (["--accelerator=v9-8"], MAIN_ARGS, "--accelerator: unknown accelerator type 'v9-8'"),
    (["--mesh=3,5,1"], MAIN_ARGS, "--mesh=3,5,1: mesh shape {'data': 3, 'fsdp': 5, 'model': 1} "
                                  "uses 15 of 256 devices"),
    (["--mesh=many"], MAIN_ARGS, "--mesh='many': give data,fsdp,model"),
    (["--workdir=/tmp/run"], MAIN_ARGS, "--workdir='/tmp/run' must be a gs:// path"),
    (["--name=Abl_1"], MAIN_ARGS, "--name='Abl_1' is not a valid TPU name"),
    ([], ["--config.mesh_shape=(2,2,1)"], "config.mesh_shape=(2, 2, 1) of experiments/collab"),
    ([], ["--config.batch_size=96"], "config.batch_size=96 of experiments/collab_arms.py"
                                     ":arm=ppo_helpfulness,task=ambig_math,seed=0,size=small is "
                                     "not a multiple of data x fsdp = 256"),
    ([], ["--config.no_such_field=1"], "no field 'no_such_field' in the config"),
    (["--sweep=experiments/lm_synthetic.py"], MAIN_ARGS, "defines no get_sweep"),
])
def test_bad_input_names_the_flag(flags, main_args, match):
  replaced = {f.split("=")[0] for f in flags}
  argv = [a for a in SWEEP if a.split("=")[0] not in replaced] + flags + ["--", *main_args]
  with pytest.raises(checks.LaunchError, match=re.escape(match)):
    tpu.main(argv)


_FAKE_GCLOUD = """#!{python}
# A stand-in for gcloud: one TPU whose state lives in a file; the first training run is preempted.
import os, sys
d = os.path.dirname(os.path.abspath(__file__))
state, log = os.path.join(d, "state"), os.path.join(d, "calls")
args = sys.argv[1:]
with open(log, "a") as f:
  f.write(" ".join(args[2:5]) + "\\n")
verb = args[3]
if verb == "describe":
  if not os.path.exists(state):
    sys.exit(1)
  print(open(state).read())
elif verb == "create":
  open(state, "w").write("READY")
elif verb == "delete":
  os.remove(state)
elif verb == "ssh" and any("collab_rl.main" in a for a in args):
  runs = os.path.join(d, "runs")
  n = len(open(runs).read()) if os.path.exists(runs) else 0
  open(runs, "a").write("x")
  if n == 0:
    open(state, "w").write("PREEMPTED")
    print("worker 3: connection lost")
    sys.exit(255)
  print("step 100: done")
"""


def test_watch_recreates_and_resumes_after_preemption(tmp_path, monkeypatch):
  fake = tmp_path / "gcloud"
  fake.write_text(_FAKE_GCLOUD.format(python=sys.executable))
  fake.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  job = tpu.job_from_args(tpu.parse_args([
      "watch", "--name=lm", "--zone=z", "--accelerator=v4-16", "--spot",
      "--config=experiments/lm_synthetic.py", "--workdir=gs://bkt/lm"]),
      "experiments/lm_synthetic.py")
  archive = tmp_path / "code.tar.gz"
  archive.write_text("")
  out = tmp_path / "out.txt"
  with open(out, "w") as f:
    tpu.watch(tpu.Shell(False, f), job, str(archive), max_restarts=2, poll_s=0,
              delete_after=True)
  calls = (tmp_path / "calls").read_text().split("\n")
  verbs = [c.split()[1] for c in calls if c and c.split()[1] != "describe"]
  assert verbs == ["create", "scp", "ssh", "ssh",  # run 1: preempted
                   "delete", "create", "scp", "ssh", "ssh",  # recreated, resumed
                   "delete"]  # finished: the VM goes
  assert "step 100: done" in out.read_text()
  assert not (tmp_path / "state").exists()


def test_watch_gives_up_on_a_failing_run_on_a_healthy_slice(tmp_path, monkeypatch):
  fake = tmp_path / "gcloud"
  fake.write_text(_FAKE_GCLOUD.format(python=sys.executable).replace(
      'open(state, "w").write("PREEMPTED")', "pass"))
  fake.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  job = tpu.job_from_args(tpu.parse_args([
      "watch", "--name=lm", "--zone=z", "--accelerator=v4-16",
      "--config=experiments/lm_synthetic.py", "--workdir=gs://bkt/lm"]),
      "experiments/lm_synthetic.py")
  with open(tmp_path / "out.txt", "w") as f, pytest.raises(checks.LaunchError, match="exited 255"):
    tpu.watch(tpu.Shell(False, f), job, str(tmp_path / "code.tar.gz"), max_restarts=2,
              poll_s=0, delete_after=True)


@pytest.mark.parametrize("args, match", [
    (["-n", "0", "--", "--workdir=/tmp/x"], "-n must be a positive integer"),
    (["-d", "x", "--", "--workdir=/tmp/x"], "-d must be a positive integer"),
    (["--", "--process_id=1"], "do not pass --process_id"),
    ([], "no collab_rl.main flags"),
])
def test_local_sh_rejects_bad_input(args, match):
  r = subprocess.run([os.path.join(ROOT, "launch", "local.sh"), *args], capture_output=True,
                     text=True, timeout=30)
  assert r.returncode == 2
  assert match in r.stderr


def test_slices_and_meshes():
  v5e = pods.get_slice("v5e-256")
  assert (v5e.accelerator_type, v5e.chips, v5e.hosts, v5e.topology) == (
      "v5litepod-256", 256, 64, "16x16")
  v4 = pods.get_slice("v4-64")
  assert (v4.chips, v4.hosts, v4.devices_per_host, v4.runtime_version) == (
      32, 8, 4, "tpu-ubuntu2204-base")
  assert pods.get_slice("v5litepod-8").hosts == 1
  assert pods.policy_8b_mesh("v4-8") == (1, 4, 1)
  assert pods.policy_8b_mesh("v4-64") == (1, 32, 1)
  assert pods.policy_8b_mesh("v5e-256") == (4, 64, 1)
  assert pods.check_mesh((-1, 8, 2), "v5e-64") == (4, 8, 2)
  with pytest.raises(ValueError, match="not divisible by 3 .*v4-16 has 8 chips"):
    pods.check_mesh((-1, 3, 1), "v4-16")
  with pytest.raises(ValueError, match="unknown accelerator type 'v4-9'"):
    pods.get_slice("v4-9")


def test_readme_memory_plan_is_the_scripts_output():
  """The README's tables are what experiments/memory_plan.py prints with its defaults, and with
  --collabllm (experiments/collabllm_8b.py on v5e-64, v4-64 and v5e-256)."""
  defaults = dict(context=4096, rollout_rows=512, train_rows=1)
  plans = [memory_plan.plan_slice(a, **defaults) for a in ("v4-64", "v5e-256")]
  v4 = plans[0]
  # Spot checks of the eval_shape sizes: fp32 params over 32 chips (norms replicated), Adam
  # twice that.
  assert v4["params"] == pytest.approx(v4["policy_params"] * 4 / 32, rel=2e-3)
  assert v4["adam"] == pytest.approx(2 * v4["params"], rel=1e-3)
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  assert memory_plan.markdown(plans, **defaults) in readme

  text = [memory_plan.plan_collabllm(a) for a in memory_plan.COLLABLLM_SLICES]
  v5e, v4 = text[:2]
  # The same checks worked out by hand for Llama-3.1-8B on 64 chips: fp32 policy and reference,
  # unshared bf16 user and judge (the same 8B weights, no value head), norms replicated; a KV
  # cache row holds 32 layers x (k, v) x 8 heads x 128 dims in bf16 a token, for each
  # conversation and the futures it plays at once: one on v5e (reward.samples_chunk = 1), all 3
  # on v4; either chip holds two conversations.
  assert v5e["params"] == v5e["reference"] == pytest.approx(v5e["policy_params"] * 4 / 64,
                                                            rel=3e-3)
  assert v5e["user"] == v5e["judge"] == 0  # they read the reference (run_text.shared_models)
  assert v5e["user_copy"] == pytest.approx(v5e["user_params"] * 2 / 64, rel=3e-3)
  kv_token = 32 * 2 * 8 * 128 * 2
  assert (v5e["rows"], v4["rows"], v5e["copies"], v4["copies"], v5e["max_len"]) == (
      2, 2, 2, 4, 4028)  # <= 4096
  assert v5e["policy_kv"] == pytest.approx(2 * 2 * v5e["policy_cache"] * kv_token, rel=1e-3)
  assert v5e["user_kv"] == pytest.approx(2 * 2 * v5e["user_cache"] * kv_token, rel=1e-3)
  assert v4["user_kv"] == 2 * v5e["user_kv"]
  assert v5e["logprob_pass"] == 2 * 2 * 4028 * 128_256 * 4
  assert all(p["peak"] / memory_plan.GIB < p["slice"].hbm_gib for p in text)
  assert memory_plan.markdown_collabllm(text) in readme


def test_tensor_splits_a_conversation_over_chips_as_the_compiled_plan_did():
  """collabllm_8b.py's tensor=2: the mesh and batch of the full fine-tune that compiled within
  a v5e chip (`memory_plan --compile --compile_overrides mesh_shape=1x32x2,batch_size=32,
  eval_batch_size=32`, README "Scale out"); a split that does not divide fsdp is refused."""
  from experiments import collabllm_8b, memory_compiled  # pylint: disable=g-import-not-at-top
  config = collabllm_8b.get_config("slice=v5litepod-64,tensor=2")
  planned = collabllm_8b.get_config("slice=v5litepod-64")
  # What was compiled then, one conversation a chip: a minibatch of the whole batch.
  memory_compiled.override(planned, ["mesh_shape=1x32x2", "batch_size=32", "eval_batch_size=32",
                                     "ppo.minibatches=1"])
  for key in ("mesh_shape", "batch_size", "eval_batch_size", "ppo", "model"):
    assert config[key] == planned[key], key
  with pytest.raises(ValueError, match="tensor=3: must divide the slice's fsdp ways"):
    collabllm_8b.get_config("slice=v5litepod-64,tensor=3")
