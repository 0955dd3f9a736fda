"""Multi-turn DPO on ambig_math, pairs ranked by the multiturn-aware reward: online or offline.

  python -m collab_rl.main --config experiments/dpo_ambig_math.py \
      --config.init_from=workdir/sft_base/checkpoints --workdir workdir/dpo_mr
  python -m collab_rl.main --config experiments/dpo_ambig_math.py:source=offline \
      --config.init_from=workdir/sft_base/checkpoints --config.data_dir=data/ \
      --workdir workdir/dpo_offline

Offline reads the pairs that `experiments/data_engine.py` wrote (ranked once, by the policy that
made them); online samples and ranks them with the current policy every iteration.

Each step samples `candidates` replies per conversation (after `context_turns` turns of
history), ranks them by MR (window, samples), and trains on (best, worst) pairs whose gap passes
`min_gap`. Start from the SFT base with `init_from`. Expected: the chosen replies on
ambiguous requests are clarifying questions, so the ask rate on ambiguous requests rises.
"""

import ml_collections

from experiments import ppo_ambig_math, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = variants.parse(arg, "dpo_ambig_math",
                        options={"source": ("online", ("online", "offline"))})
  runlocal = opts["runlocal"]
  # Task, simulator, model, reward, optimizer and mesh as in the PPO config (one place to edit).
  c = ppo_ambig_math.get_config("runlocal" if runlocal else None)
  c.trainer = "dpo"  # collab_rl/trainers/dpo.py
  del c.ppo
  c.context_turns = 0  # turns of history played before the candidates (< num_turns)
  c.dpo = ml_collections.ConfigDict()
  c.dpo.source = opts["source"]  # online (sample + rank now) | offline (data engine records)
  c.data_dir = "data"  # offline: holds mr_candidates/1.0.0 (experiments/data_engine.py)
  c.candidates = 4  # G replies sampled per conversation
  c.dpo.beta = 0.1  # DPO temperature
  c.min_gap = 0.1  # keep a pair only if MR(best) - MR(worst) exceeds this
  c.optimizer.learning_rate = 5e-5
  return c
