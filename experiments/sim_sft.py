"""SFT of the LM user simulator on the scripted user's transcripts (collab_rl/trainers/sim_sft.py).

Episodes are played on device against the task's scripted user by a per-turn mixture of
behaviours (oracle questions, answer-now guesses, random questions / answers / word salad); the
simulator LM learns the user's replies given the hidden goal and the conversation.

  python -m collab_rl.main --config experiments/sim_sft.py --workdir /tmp/sim_sft
  python -m collab_rl.main --config experiments/sim_sft.py:runlocal --workdir /tmp/sim_sft_small
  python -m collab_rl.main --config experiments/sim_sft.py:task=doc_edit --workdir /tmp/sim_doc

Expected (ambig_math, measured with `runlocal`: 3-4 minutes on a 2-core CPU): held-out
agreement with the scripted user goes from 2% of user tokens (step 0) to 96%; whole replies
0% -> 89% teacher-forced, and 0% -> 93% of free-running user turns identical to the script's.
Questions are answered right ("n2 is 7", "known", "what ?": 100%) once the model has learned to
copy from the goal (~1500 steps); "thanks" vs "wrong" after an answer stays at 83-85% (done
agreement 90-94%): the small model judges from the history (were the missing slots asked?)
instead of comparing the answer with the goal token by token. The default config (4 layers,
width 128) takes ~25 minutes on 2 cores and has not been run to the end.
"""

import ml_collections

from experiments import sft_base, variants

_TASKS = ("ambig_math", "doc_edit", "code_spec")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  v = variants.parse(arg, "sim_sft", options={"task": ("ambig_math", _TASKS)})
  task = v["task"]
  c = ml_collections.ConfigDict()
  c.trainer = "sim_sft"  # collab_rl/trainers/sim_sft.py
  c.seed = 0  # params, optimizer RNG and every episode (train and held-out)

  # The task whose scripted user is imitated (collab_rl/tasks/registry.py) and its user config:
  # the user the SFT base and every RL arm meet (experiments/sft_base.py documents the fields).
  c.task = task
  c.sim = sft_base.get_config(f"task={task}").sim

  # Behaviour mixture, drawn per turn and per row (relative weights).
  c.behaviour = ml_collections.ConfigDict()
  c.behaviour.oracle = 1.0  # asks the next missing slot, then answers right
  c.behaviour.answer_now = 1.0  # answers at once, guessing what it was not told
  c.behaviour.random = 1.0  # any slot asked (known ones too), random answers, word salad

  c.num_turns = 4  # assistant turns per episode (each answered by the user)
  c.max_len = 96  # conversation tokens; the simulator's view adds the goal (answer + 2)

  # The simulator's sampling when it plays (free-running evaluation; rollouts that use it).
  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0  # the learned distribution as it is
  c.sampling.top_k = 0  # 0 disables
  c.sampling.top_p = 1.0  # 1.0 disables
  c.sampling.greedy = False  # True: argmax (the scripted user is deterministic without noise)

  # Model: field names are Hugging Face LlamaConfig's (see collab_rl/models/transformer.py).
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 64  # >= the task's word vocabulary (ambig_math 37, doc_edit/code_spec < 64)
  c.model.hidden_size = 128  # D
  c.model.intermediate_size = 344  # SwiGLU width, ~8/3 D as in Llama
  c.model.num_hidden_layers = 4
  c.model.num_attention_heads = 4  # H
  c.model.num_key_value_heads = 2  # K (grouped-query attention)
  c.model.head_dim = ml_collections.FieldReference(None, field_type=int)  # None: D // H
  c.model.rms_norm_eps = 1e-6
  c.model.rope_theta = 10_000.0
  c.model.rope_scaling = ml_collections.FieldReference(None, field_type=dict)  # None: plain RoPE
  c.model.max_position_embeddings = 512  # >= max_len + goal
  c.model.tie_word_embeddings = False
  c.model.attention_bias = False  # True for Qwen2
  c.model.heads = ("lm",)  # lm / value / reward
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

  c.batch_size = 64  # episodes per step (global)
  c.num_steps = 3000

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3  # peak, after linear warmup, then cosine decay (3e-3 stalls
  # the copy of values from the goal for many more steps)
  c.optimizer.warmup_steps = 100
  c.optimizer.final_lr_fraction = 0.1  # end of cosine as a share of the peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 1.0  # global norm

  c.log_every = 50  # steps between metric writes
  c.eval_every = 500  # steps between agreement evaluations (a multiple of log_every)
  # Held-out episodes (fixed keys, never trained on), played in batches of batch_size.
  c.eval_batch_size = 256
  c.eval_rollout = True  # also the free-running agreement (one more compilation)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  # Another run's checkpoint directory (WORKDIR/checkpoints) to take params from, or "".
  c.init_from = ""
  # A Hugging Face Llama/Qwen2 folder to start from instead (its config.json sets the model's
  # architecture; heads it lacks, such as the value head, start fresh), or "".
  c.init_from_hf = ""
  # Also write the trained model as a Hugging Face folder (WORKDIR/hf: config.json,
  # model.safetensors and the tokenizer) at the end of the run.
  c.export_hf = False

  if v["runlocal"]:
    c.model.hidden_size = 64
    c.model.intermediate_size = 176
    c.model.num_hidden_layers = 2
    c.num_turns = 3
    c.max_len = 80
    c.batch_size = 32
    c.num_steps = 3000
    c.optimizer.warmup_steps = 50
    c.log_every = 50
    c.eval_every = 1000
    c.eval_batch_size = 64
    c.checkpoint.every_steps = 1000
  return c
