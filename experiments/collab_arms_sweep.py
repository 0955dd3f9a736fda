"""The headline arms as a sweep for `launch.tpu sweep`: one job per arm, each on its own slice.

Every arm starts from the same SFT base, expected in `{workdir}/sft_base` (the launcher fills in
the sweep's --workdir), which is trained first:

  python -m launch.tpu watch --name=abl-sft --config=experiments/collab_arms.py:arm=sft_base \
      --workdir=gs://BUCKET/ablation/sft_base --zone=... --accelerator=v5e-256 --spot
  python -m launch.tpu sweep --sweep=experiments/collab_arms_sweep.py --name=abl \
      --workdir=gs://BUCKET/ablation --zone=... --accelerator=v5e-256 --spot
  python -m launch.tpu sweep ... --dry-run     # every gcloud command, nothing run

The arms are CollabLLM's reward ablation (helpfulness, extrinsic only, extrinsic + intrinsic at
w = 0; MR with w = 1, 2, 3) and online DPO on MR. Offline DPO is not in it: it reads the data
engine's dataset, so it runs after that job (`experiments/headline.py` orders the two locally).
The argument takes collab_arms' options: `task=doc_edit,seed=1,size=full`.
"""

from experiments import collab_arms, variants

ARMS = (  # (job name, collab_arms arm)
    ("helpfulness", "ppo_helpfulness"),
    ("ext", "ppo_ext"),
    ("ext-int", "ppo_ext_int"),
    ("mr-w1", "ppo_mr_w1"),
    ("mr-w2", "ppo_mr_w2"),
    ("mr-w3", "ppo_mr_w3"),
    ("dpo-online", "dpo_online"),
)


def get_sweep(arg: str | None = None) -> list[dict]:
  v = variants.parse(arg, "collab_arms_sweep", flags=(), options={
      "task": ("ambig_math", collab_arms.TASKS), "seed": ("0", None),
      "size": ("small", tuple(collab_arms.SIZES))})
  suffix = f",task={v['task']},seed={v['seed']},size={v['size']}"
  return [{"name": name, "config": f"experiments/collab_arms.py:arm={arm}{suffix}",
           "overrides": {"init_from": "{workdir}/sft_base/checkpoints"}}
          for name, arm in ARMS]
