"""PPO on ambig_math with a configurable per-turn reward: MR (the method) or a next-turn baseline.

  python -m collab_rl.main --config experiments/ppo_ambig_math.py:reward=mr,window=2 \
      --config.init_from=workdir/sft_base/checkpoints --workdir workdir/ppo_mr
  python -m collab_rl.main --config experiments/ppo_ambig_math.py:reward=next_turn_ext,runlocal ...

Variants: reward=mr|next_turn_ext|next_turn_ext_int|helpfulness|final, window=0..3,
advantage=gae|grpo|rloo, runlocal. Start from the shared SFT base (experiments/sft_base.py) with
`init_from`: from random weights the policy almost never writes a well-formed answer, so there is
nothing to reinforce. Expected (the CollabLLM finding): with MR the policy learns to ask on
ambiguous requests; next-turn rewards keep it passive.
"""

import ml_collections

from collab_rl.models import lora
from experiments import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = variants.parse(arg, "ppo_ambig_math", options={
      "reward": ("mr", None), "window": ("2", None), "advantage": ("gae", None)})
  c = ml_collections.ConfigDict()
  c.trainer = "ppo"  # collab_rl/trainers/ppo.py
  c.seed = 0

  c.task = "ambig_math"  # collab_rl/tasks/registry.py
  c.sim = ml_collections.ConfigDict(dict(  # the scripted user (tasks/slots.py SimConfig)
      ambiguous_rate=0.5, min_missing=1, max_missing=2, noise_vague=0.0, noise_wrong=0.0,
      feedback_reveals=False, sharded=False, max_user_len=12, mixture=""))

  c.model = ml_collections.ConfigDict()  # field names as in Hugging Face's LlamaConfig
  c.model.vocab_size = 37  # must equal the task's vocabulary (checked)
  c.model.hidden_size = 64
  c.model.intermediate_size = 128
  c.model.num_hidden_layers = 2
  c.model.num_attention_heads = 4
  c.model.num_key_value_heads = 2
  c.model.heads = ("lm", "value")  # the value head is the critic (advantage=gae)
  c.model.dtype = "float32"
  c.model.scan_layers = False  # True: one scanned layer, compile time independent of depth

  c.num_turns = 4  # assistant turns per conversation
  c.reply_tokens = 10  # budget of one assistant reply
  c.temperature = 1.0  # sampling temperature of the rollouts

  c.reward = ml_collections.ConfigDict()
  c.reward.kind = opts["reward"]  # mr | next_turn_ext | next_turn_ext_int | ...
  c.reward.window = int(opts["window"])  # MR's forward turns
  c.reward.samples = 3  # MR's futures per reply
  c.reward.samples_chunk = 0  # futures played at once (0: all; fewer hold fewer KV caches)
  c.reward.w_ext = 1.0  # weight of the task metric in R*
  c.reward.w_int = 0.5  # weight of interactivity in R*
  c.reward.token_cost = 5e-3  # lambda per token read (higher than the paper: short replies here)

  c.ppo = ml_collections.ConfigDict()
  c.ppo.advantage = opts["advantage"]  # gae (value head) | grpo | rloo
  c.ppo.group_size = 4  # conversations per intent for grpo/rloo
  c.ppo.gamma = 1.0  # per-turn discount
  c.ppo.lam = 0.95  # GAE lambda
  c.ppo.clip_eps = 0.2  # ratio clipping
  c.ppo.vf_coef = 0.5  # value loss weight
  c.ppo.vf_clip = 0.5  # value clipping
  c.ppo.kl_coef = 0.05  # k3 KL to the reference (the SFT base)
  c.ppo.ent_coef = 0.0  # entropy bonus
  c.ppo.epochs = 2  # passes over each batch
  c.ppo.minibatches = 2  # minibatches per pass
  c.ppo.whiten = True  # normalise token advantages
  # Positions whose LM-head logits are made at once in the update and the log-prob pass
  # (losses.head_token_stats); 0: all of them. A 128k vocabulary needs it at 4k tokens.
  c.ppo.logits_chunk = 0
  # Every update step of an iteration in one jitted call (a scan over the minibatches, gathered
  # on the device: ppo.jit_all_steps) instead of one call per step (ppo.jit_steps). Off: the
  # runs in the README were made with the loop (equal to 1e-5 per step, not bit for bit); on
  # this 2-core CPU one call makes an MR iteration 0.778 s against 0.870 s at batch 64
  # (experiments/bench/rl_idle.py).
  c.ppo.one_call = False

  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=10, b1=0.9,
                                               b2=0.999, weight_decay=0.0, grad_clip=1.0))
  # LoRA (collab_rl/models/lora.py): rank 0 trains every weight; rank > 0 trains adapters on
  # the `targets` kernels only, the base frozen and held once (it is the KL reference too).
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0,
                                          targets=list(lora.DEFAULT_TARGETS),
                                          trainable=[r"^value_head/"]))
  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, model)
  c.partition_rules = ml_collections.FieldReference(None, field_type=list)
  c.batch_size = 64  # conversations per iteration
  # Gradient accumulation: each update in this many slices of its rows (run.check_microbatches).
  c.microbatches = 1
  c.num_steps = 200  # iterations: rollouts, then their update epochs
  c.log_every = 1  # steps between training metric writes (and at every evaluation)
  c.eval_every = 20  # steps between greedy evaluations
  c.eval_batch_size = 256  # held-out conversations per evaluation
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=20, max_to_keep=3,
                                                async_save=True))
  c.init_from = ""  # the SFT base's checkpoint directory
  # A Hugging Face Llama/Qwen2 folder to start from instead (its config.json sets the model's
  # architecture; heads it lacks, such as the value head, start fresh), or "".
  c.init_from_hf = ""
  # Also write the trained model as a Hugging Face folder (WORKDIR/hf: config.json,
  # model.safetensors and the tokenizer) at the end of the run.
  c.export_hf = False
  c.on_nonfinite = "stop"  # stop | skip: what a NaN/inf loss or gradient does (never applied)

  if opts["runlocal"]:
    c.batch_size = 32
    c.num_steps = 20
    c.eval_every = 10
    c.eval_batch_size = 64
    c.reward.samples = 2
  return c
