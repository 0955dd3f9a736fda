"""CollabLLM's data engine on ambig_math: G candidates per turn ranked by MR, stored with TFDS.

  python -m collab_rl.main --config experiments/data_engine.py --workdir workdir/engine \
      --config.init_from=workdir/sft_base/checkpoints --config.data_dir=data/

Writes `data/mr_candidates/1.0.0` (train and validation splits, split by conversation): for every
assistant turn of `num_conversations` conversations, the history, `candidates` replies sampled
from the policy and each reply's MR (window, samples). Offline DPO reads it
(`experiments/dpo_ambig_math.py:source=offline`). Task, simulator, model and reward settings are
the PPO config's, so the data matches the policy trained on it. Variants: runlocal.
"""

import ml_collections

from experiments import ppo_ambig_math, variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  runlocal = variants.parse(arg, "data_engine")["runlocal"]
  base = ppo_ambig_math.get_config("runlocal" if runlocal else None)
  c = ml_collections.ConfigDict()
  c.trainer = "data_engine"  # collab_rl/data/engine.py
  c.seed = 0
  c.task = base.task
  c.sim = base.sim  # the scripted user (tasks/slots.py SimConfig)
  c.model = base.model  # must match the checkpoint of init_from
  c.reward = base.reward  # MR's window, samples and R* weights
  c.num_turns = base.num_turns  # assistant turns per conversation
  c.reply_tokens = base.reply_tokens  # budget of one candidate reply
  c.temperature = 1.0  # sampling temperature of the candidates (diversity to rank)
  c.candidates = 4  # G replies per turn
  c.num_conversations = 2048  # conversations played (records: one per live turn)
  c.batch_size = 64  # conversations per jitted call (x candidates x samples rows inside)
  c.validation_fraction = 0.05  # conversations held out
  c.data_dir = "data"  # the dataset goes to data_dir/mr_candidates/1.0.0
  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, model)
  c.init_from = ""  # the policy that writes the candidates (the SFT base's checkpoints)
  if runlocal:
    c.num_conversations = 256
  return c
