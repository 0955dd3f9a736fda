"""The language tier shown to learn, with nothing downloaded (issue 19 item 6).

  python -m experiments.language_demo --workdir runs/lang --seeds 0,1,2

Everything is made here, on English renderings of ambig_math (`experiments/english_tasks.py`):
1. records: `sft` (the passive base's conversations: 70% answer at once with guesses, 30% ask
   for the missing pieces first), `user` (the user's conversations, more questions) and `rl`
   (opening requests only; half ambiguous), each prepared as a CollabLLM dataset;
2. a byte-level BPE tokenizer trained with `tokenizers` on them, with Llama-3's special tokens
   and chat template, and two random Llama-architecture Hugging Face folders;
3. the passive base: SFT of the first folder on the `sft` conversations (`collabllm.py:sft`),
   exported as a Hugging Face folder (`base/hf`);
4. the user simulator: SFT of the second folder on the `user` conversations seen from the
   user's side (`collabllm.py:sft,side=user`, the short role-play prompt with the goal);
5. per seed, PPO from `base/hf` against that user: `ppo_ext` (next-turn extrinsic reward: the
   task score of the reply alone) and `ppo_mr` (MR, window 2, 3 futures), `w_int = 0` (no
   judge is trained here);
6. `collab_rl.evaluate` on the `rl` records' test split: the base and every arm, greedy.

Steps 1-4 happen once (the environment: records, tokenizer, base and user are shared by the
seeds; the base and the user are trained with seed 0), step 5 once per seed. Each run is
`python -m collab_rl.main` in a child process logging to `<run>/log.txt`; a finished run
(`<run>/DONE`) is not repeated and an interrupted one resumes. Every number this writes comes
from models trained here on synthetic English conversations, not from a real LM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags, logging

from experiments import english_tasks, hf_models

flags.DEFINE_string("workdir", None, "Where everything goes.")
flags.DEFINE_list("seeds", ["0"], "PPO seeds.")
flags.DEFINE_list("arms", ["ppo_ext", "ppo_mr"], "PPO arms (experiments/collabllm.py variants).")
flags.DEFINE_integer("episodes", 256, "Test records each run is evaluated on.")
flags.DEFINE_multi_string("override", [], "--config.x=y added to every PPO run.")
flags.DEFINE_bool("evaluate", True, "Evaluate the runs at the end.")
flags.DEFINE_enum("size", "small", ["small", "tiny"], "small: the README's demonstration; tiny: "
                  "the same pipeline in a few minutes (plumbing, not learning).")
flags.DEFINE_integer("devices", 1, "XLA CPU devices each run splits its batches over (8: the "
                     "tests' fake devices).")
flags.DEFINE_bool("check_hf", False, "Load every PPO run's exported Hugging Face folder with "
                  "transformers and print the largest logit difference against collab_rl's.")

RECORDS = {"sft": 8192, "user": 8192, "rl": 4096}
TINY = {"records": {"sft": 512, "user": 512, "rl": 512},
        "steps": ["--config.num_steps=40", "--config.eval_every=40", "--config.eval_batch_size=32"],
        "ppo": ["--config.num_steps=2", "--config.eval_every=2", "--config.batch_size=16",
                "--config.eval_batch_size=16", "--config.checkpoint.every_steps=2"]}
POLICY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024)
USER = dict(POLICY)
SIM = ["--config.sim.prompt=short", "--config.sim.max_user_len=24",
       "--config.sim.max_request_tokens=48", "--config.sim.max_prompt_tokens=160"]
SFT = {"base": ["--config.num_steps=1000", "--config.max_len=128", "--config.batch_size=32",
                "--config.eval_batch_size=64", "--config.optimizer.learning_rate=2e-3"],
       "user": ["--config.num_steps=800", "--config.max_len=224", "--config.batch_size=32",
                "--config.eval_batch_size=64", "--config.optimizer.learning_rate=2e-3",
                "--config.side=user"]}
PPO = ["--config.num_turns=3", "--config.reply_tokens=20", "--config.batch_size=32",
       "--config.num_steps=40", "--config.eval_every=10", "--config.eval_batch_size=64",
       "--config.optimizer.learning_rate=2e-4", "--config.sim.temperature=0.0",
       "--config.checkpoint.every_steps=10"]


def make_environment(workdir: str, records=None) -> dict[str, str]:
  """Records, datasets, tokenizer and the two untrained folders (once; kept if present)."""
  records = records or RECORDS
  from collab_rl.data import builders  # pylint: disable=g-import-not-at-top

  paths = {k: os.path.join(workdir, "data", k) for k in records}
  paths.update(policy0=os.path.join(workdir, "init", "policy"),
               user0=os.path.join(workdir, "init", "user"))
  done = os.path.join(workdir, "init", "DONE")
  if os.path.exists(done):
    return paths
  texts = []
  for seed, (kind, n) in enumerate(records.items()):
    recs = english_tasks.records(kind, n, seed=100 + seed)
    texts += english_tasks.corpus(recs)
    os.makedirs(paths[kind], exist_ok=True)
    jsonl = english_tasks.write(os.path.join(paths[kind], f"{kind}.jsonl"), recs)
    builders.prepare_collabllm(jsonl, paths[kind], validation_fraction=0.0625,
                               test_fraction=0.125)
  tok = hf_models.train_tokenizer(texts, "llama3", vocab_size=512)
  for name, size, seed in (("policy0", POLICY, 0), ("user0", USER, 1)):
    hf_models.save_folder(paths[name], tok, hf_models.model_config(tok, "llama3", **size),
                          seed=seed)
  with open(done, "w") as f:
    f.write("ok\n")
  return paths


def commands(workdir: str, paths: dict[str, str], seeds, arms, overrides=(), tiny=False):
  """(run directory, argv) of every run, in the order they must run."""
  main = [sys.executable, "-m", "collab_rl.main"]
  sft_extra, ppo_extra = (TINY["steps"], TINY["ppo"]) if tiny else ((), ())
  base, user = os.path.join(workdir, "base"), os.path.join(workdir, "user")
  out = [(base, [*main, "--workdir", base, "--config=experiments/collabllm.py:sft",
                 f"--config.init_from_hf={paths['policy0']}", f"--config.data_dir={paths['sft']}",
                 *SIM, *SFT["base"], *sft_extra]),
         (user, [*main, "--workdir", user, "--config=experiments/collabllm.py:sft",
                 f"--config.init_from_hf={paths['user0']}", f"--config.data_dir={paths['user']}",
                 *SIM, *SFT["user"], *sft_extra])]
  for seed in seeds:
    for arm in arms:
      d = os.path.join(workdir, f"seed{seed}", arm)
      out.append((d, [*main, "--workdir", d, f"--config=experiments/collabllm.py:{arm}",
                      f"--config.seed={seed}", f"--config.init_from_hf={base}/hf",
                      f"--config.sim.user_from={user}/hf", f"--config.data_dir={paths['rl']}",
                      *SIM, *PPO, *ppo_extra, *overrides]))
  return out


def run_all(jobs, devices: int = 1) -> list[str]:
  """Runs each job not marked DONE, one at a time (the runs use every core), each on `devices`
  XLA CPU devices; returns the failed runs."""
  failed = []
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.getcwd()] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  if devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  for d, cmd in jobs:
    if os.path.exists(os.path.join(d, "DONE")):
      continue
    os.makedirs(d, exist_ok=True)
    t0 = time.perf_counter()
    print(f"run {d}", flush=True)
    with open(os.path.join(d, "log.txt"), "w") as log:
      rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc:
      failed.append(d)
      print(f"FAILED ({rc}): {d}; see {d}/log.txt", flush=True)
      if os.path.basename(d) in ("base", "user"):
        break  # every PPO run needs both
      continue
    with open(os.path.join(d, "DONE"), "w") as f:
      f.write(f"{time.perf_counter() - t0:.1f} s\n")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
  return failed


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  workdir = os.path.abspath(f.workdir)
  logging.set_verbosity(logging.WARNING)
  tiny = f.size == "tiny"
  paths = make_environment(workdir, TINY["records"] if tiny else None)
  failed = run_all(commands(workdir, paths, f.seeds, f.arms, f.override, tiny), f.devices)
  if f.check_hf:
    for s in f.seeds:
      for a in f.arms:
        folder = os.path.join(workdir, f"seed{s}", a, "hf")
        if os.path.isdir(folder):
          print(f"{folder}: transformers' logits differ from collab_rl's by at most "
                f"{hf_models.logit_gap(folder):.2e}")
  if f.evaluate and not failed:
    from collab_rl import evaluate_text  # pylint: disable=g-import-not-at-top
    runs = [(os.path.join(workdir, "base"), "sft_base", 0)]
    runs += [(os.path.join(workdir, f"seed{s}", a), a, int(s)) for s in f.seeds for a in f.arms]
    runs = [r for r in runs if os.path.exists(os.path.join(r[0], "DONE"))]
    results = evaluate_text.evaluate_runs(
        runs, workdir, episodes=16 if tiny else f.episodes, turns=3, batch=16 if tiny else 64,
        split="test",
        data_dir=paths["rl"], user_from=os.path.join(workdir, "user", "hf"))
    print(evaluate_text.results_lib.table(results, evaluate_text.METRICS))
  if failed:
    raise SystemExit(f"{len(failed)} run(s) failed: {failed}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
