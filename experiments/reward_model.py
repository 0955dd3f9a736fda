"""A learned reward model fitted to MR (collab_rl/trainers/reward_model.py).

Each step: fresh episodes stopped at the policy's first turn, G candidate replies from scripted
behaviours (clarifying question / ideal answer, guess, irrelevant question), each scored by MR
with oracle futures against the scripted user; the reward model (a transformer with a scalar
head, reading the conversation and the candidate, never the intent) is fitted by Bradley-Terry
on the (best, worst) pairs, or by regression on MR.

  python -m collab_rl.main --config experiments/reward_model.py --workdir /tmp/rm
  python -m collab_rl.main --config experiments/reward_model.py:runlocal --workdir /tmp/rm_small
  python -m collab_rl.main --config experiments/reward_model.py:objective=regression \
      --workdir /tmp/rm_reg

Expected (ambig_math, window 2). What the model must learn: an answer to a clear request beats
any question; a question about a slot shown as "?" beats one about a slot the request already
gave (matching the slot's name to its position in the request); an irrelevant question is worst.
Whether a guess happens to be right is hidden, so a few pairs of answers stay unpredictable.
`runlocal`, measured on a 2-core CPU shared with other jobs, compilation included:

  bradley_terry  eval_pair_acc 0.53 at step 0 -> 1.00 at step 600 on one CPU device (25 s wall),
                 0.98 on 8 fake devices (40 s); eval_order_acc 0.95, eval_spearman (within rows)
                 0.86 to 0.88
  regression     (8 fake devices, 55 s) eval_pair_acc 0.92, eval_spearman 0.75, pooled Spearman
                 0.93 and Pearson 0.97: regression fits MR's level too, while Bradley-Terry leaves
                 each context's offset free, so its pooled correlations mean nothing

The default config (width 128, 4 layers, 2000 steps) was not measured on CPU.
"""

import ml_collections

from experiments import sft_base, variants

_TASKS = ("ambig_math", "doc_edit", "code_spec")
_OBJECTIVES = ("bradley_terry", "regression")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  v = variants.parse(arg, "reward_model", options={"task": ("ambig_math", _TASKS),
                                                     "objective": ("bradley_terry", _OBJECTIVES)})
  task, objective = v["task"], v["objective"]
  c = ml_collections.ConfigDict()
  c.trainer = "reward_model"  # collab_rl/trainers/reward_model.py
  c.seed = 0  # params, optimizer RNG and every episode (train and held-out)

  # The task whose episodes are scored (collab_rl/tasks/registry.py) and its scripted user: the
  # user the SFT base and every RL arm meet (experiments/sft_base.py documents the fields).
  c.task = task
  c.sim = sft_base.get_config(f"task={task}").sim

  # Candidates per row and the behaviours they are drawn from (relative weights, per candidate).
  c.candidates = 4  # G
  c.behaviour = ml_collections.ConfigDict()
  c.behaviour.oracle = 1.0  # asks about a missing slot; the ideal answer when the request is clear
  c.behaviour.answer_now = 1.0  # answers at once, guessing the missing slots
  c.behaviour.irrelevant = 1.0  # asks about a slot the user already gave

  # MR of each candidate (collab_rl/rewards.py): oracle futures against the scripted user.
  c.reward = ml_collections.ConfigDict()
  c.reward.window = 2  # forward turns after the candidate (0..3; the paper's default is 2)
  c.reward.samples = 1  # futures per candidate; 1 is exact while the user has no noise
  c.reward.samples_chunk = 0  # futures played at once (0: all; fewer hold fewer KV caches)
  c.reward.token_cost = 5e-4  # lambda per policy token (paper: 5e-4)
  c.reward.w_ext = 1.0  # weight of the task metric
  c.reward.w_int = 1.0  # weight of interactivity

  c.objective = objective  # bradley_terry (on MR-ranked pairs) or regression (on MR)
  # Pairs (best, worst) are kept when their MR gap exceeds this; the token cost alone separates
  # equivalent replies by ~0.005, which is no preference worth learning.
  c.min_gap = 0.05

  # Model: field names are Hugging Face LlamaConfig's (see collab_rl/models/transformer.py).
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 64  # >= the task's word vocabulary (ambig_math 37, code_spec 49)
  c.model.hidden_size = 128  # D
  c.model.intermediate_size = 344  # SwiGLU width, ~8/3 D as in Llama
  c.model.num_hidden_layers = 4
  c.model.num_attention_heads = 4  # H
  c.model.num_key_value_heads = 2  # K (grouped-query attention)
  c.model.head_dim = ml_collections.FieldReference(None, field_type=int)  # None: D // H
  c.model.rms_norm_eps = 1e-6
  c.model.rope_theta = 10_000.0
  c.model.rope_scaling = ml_collections.FieldReference(None, field_type=dict)  # None: plain RoPE
  c.model.max_position_embeddings = 128  # >= the tokens it reads (prompt + reply: 17 here)
  c.model.tie_word_embeddings = False
  c.model.attention_bias = False  # True for Qwen2
  c.model.heads = ("reward",)  # the scalar head only: no LM head to train or store
  c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
  c.model.param_dtype = "float32"
  c.model.remat = False  # recompute layers in the backward pass to save memory
  c.model.remat_policy = "nothing_saveable"  # what remat keeps (models/config.py)
  c.model.scan_layers = False  # True: one scanned layer, compile time independent of depth

  # Mesh (data, fsdp, model); one -1 fills the devices. Batches split over data x fsdp.
  c.mesh_shape = (-1, 1, 1)
  # [(regex over "layers_0/self_attn/q_proj/kernel"-style paths, (mesh axis or None, ...))];
  # None: collab_rl.sharding.LLAMA_RULES.
  c.partition_rules = ml_collections.FieldReference(None, field_type=list)

  c.batch_size = 64  # episodes per step (global); each has G candidates
  c.num_steps = 2000

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3  # peak, after linear warmup, then cosine decay
  c.optimizer.warmup_steps = 100
  c.optimizer.final_lr_fraction = 0.1  # end of cosine as a share of the peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 1.0  # global norm

  c.log_every = 50  # steps between metric writes
  c.eval_every = 250  # steps between held-out evaluations (a multiple of log_every)
  # Held-out episodes (fixed keys, never trained on), played in batches of batch_size.
  c.eval_batch_size = 256

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  # An earlier reward-model run's checkpoint directory (WORKDIR/checkpoints), or "". The params
  # must match leaf for leaf: an LM-only policy checkpoint has no reward head to restore.
  c.init_from = ""
  # A Hugging Face Llama/Qwen2 folder to start from instead (its config.json sets the model's
  # architecture; heads it lacks, such as the value head, start fresh), or "".
  c.init_from_hf = ""

  if v["runlocal"]:
    c.model.hidden_size = 64
    c.model.intermediate_size = 176
    c.model.num_hidden_layers = 2
    c.batch_size = 32
    c.num_steps = 600
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 20
    c.log_every = 50
    c.eval_every = 200
    c.eval_batch_size = 128
    c.checkpoint.every_steps = 200
  return c
