"""The reward ablation of CollabLLM over experiments/ppo_ambig_math.py: one arm per reward.

Immediate rewards (helpfulness, extrinsic only, extrinsic + intrinsic at w = 0) against the
multiturn-aware reward with w = 1, 2, 3 forward turns; every arm starts from the same SFT base,
expected in `{workdir}/sft_base` (the launcher fills in the sweep's --workdir).

  python -m launch.tpu watch --name=abl-sft --config=experiments/sft_base.py \
      --workdir=gs://BUCKET/ablation/sft_base --zone=... --accelerator=v5e-256 --spot
  python -m launch.tpu sweep --sweep=experiments/ppo_ambig_math_sweep.py --name=abl \
      --workdir=gs://BUCKET/ablation --zone=... --accelerator=v5e-256 --spot
  python -m launch.tpu sweep ... --dry-run     # every gcloud command, nothing run

Locally, each arm is `python -m collab_rl.main --config=<config> --config.init_from=... `.
The argument `runlocal` shrinks every arm as the config's own `runlocal` does.
"""

from experiments import variants

ARMS = (  # (arm name, variant of ppo_ambig_math)
    ("helpfulness", "reward=helpfulness"),
    ("ext", "reward=next_turn_ext"),
    ("ext-int", "reward=next_turn_ext_int"),
    ("mr-w1", "reward=mr,window=1"),
    ("mr-w2", "reward=mr,window=2"),
    ("mr-w3", "reward=mr,window=3"),
)


def get_sweep(arg: str | None = None) -> list[dict]:
  v = variants.parse(arg, "ppo_ambig_math_sweep")
  suffix = ",runlocal" if v["runlocal"] else ""
  return [{"name": name, "config": f"experiments/ppo_ambig_math.py:{variant}{suffix}",
           "overrides": {"init_from": "{workdir}/sft_base/checkpoints"}}
          for name, variant in ARMS]
