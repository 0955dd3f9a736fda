"""SFT of the shared base policy (collab_rl/trainers/sft.py) that every RL arm starts from.

The base is passive, as instruction-tuned models are: per conversation it imitates the asking
oracle with probability `ask_share` and otherwise answers at once, guessing what the request
leaves out. The loss is on the assistant's tokens only. The model has a value head (untrained
here) so that the RL trainers can restore this checkpoint strictly with `init_from`.

  python -m collab_rl.main --config experiments/sft_base.py --workdir /tmp/sft_base
  python -m collab_rl.main --config experiments/sft_base.py:runlocal --workdir /tmp/sft_small
  python -m collab_rl.main --config experiments/sft_base.py:task=doc_edit --workdir /tmp/sft_doc
  # then, in an RL config: init_from = "/tmp/sft_base/checkpoints"

Expected (ambig_math, greedy evaluation of 256 held-out episodes): the untrained policy writes
no well-formed reply and scores 0. `runlocal` (300 steps, about 75 s on a 2-core CPU, half of
it compiling) learns the format by step 100 and ends with well_formed 1.0, score_clear 1.0,
answer_when_clear 1.0, ask_when_ambiguous 0.0 (greedy takes the 80% branch) and score_ambiguous
~0.24 (guesses, retried after `wrong`). Sampled at temperature 1 (`eval_sampling.greedy=False`)
ask_when_ambiguous is ~ask_share (0.18), but answers after a question rarely use what the user
said (score_asked_first ~0.13; ~0.44 after 1200 steps). The default model does better: at step
500 of 2000 (sampled) ask_when_ambiguous 0.22, score_clear 1.0, score_asked_first 0.49.
"""

import ml_collections

from experiments import variants

_TASKS = ("ambig_math", "doc_edit", "code_spec")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  v = variants.parse(arg, "sft_base", options={"task": ("ambig_math", _TASKS)})
  task = v["task"]
  c = ml_collections.ConfigDict()
  c.trainer = "sft"  # collab_rl/trainers/sft.py
  c.seed = 0  # params, optimizer RNG and every episode (train and held-out)

  # The verifiable task (collab_rl/tasks/registry.py) and its scripted user (slots.SimConfig).
  c.task = task
  c.sim = ml_collections.ConfigDict()
  c.sim.ambiguous_rate = 0.5  # share of first requests with missing slots
  c.sim.min_missing = 1  # slots left out of an ambiguous request
  c.sim.max_missing = 2
  c.sim.noise_vague = 0.0  # chance a truthful answer becomes "unclear"
  c.sim.noise_wrong = 0.0  # chance the user gives a wrong value
  c.sim.feedback_reveals = False  # a wrong answer's feedback also gives a missing slot
  c.sim.sharded = False  # every user turn reveals the next missing slot unasked
  c.sim.max_user_len = 12  # user reply budget (tokens, without <eot>)
  # Users drawn per episode (collab_rl/tasks/users.py, e.g. "reactive:3,sharded"); "": the user
  # the fields above describe.
  c.sim.mixture = ""

  # SFT data: "behaviour" plays episodes on device (sft.DATA_SOURCES).
  c.data_source = "behaviour"
  c.ask_share = 0.2  # conversations that follow the asking oracle; the rest answer at once
  # The Proactive Base's instruction (trainers/sft.py): conversations opening with `clarify`, and
  # how their behaviour differs. 0.0: the data never shows the instruction.
  c.instruction_share = 0.0
  c.instructed_ask_share = 0.8  # ambiguous instructed requests: ask for the missing slots
  c.instructed_confirm_share = 0.6  # clear instructed requests: a needless question first
  # Conversations that would answer at once but follow the oracle with its questions as context
  # (not trained): answers after a question without more asking (trainers/sft.py).
  c.context_ask_share = 0.0
  # Users the SFT data is played against (a users.py mixture); "": the training user (sim).
  c.data_users = ""
  # False: the loss skips the values a first answer guesses for the slots the request left out
  # (random draws that nothing in the conversation tells: trainers/sft.py guess_mask).
  c.train_guesses = True
  c.num_turns = 3  # assistant turns per episode: max_missing questions, then the answer
  # Conversation tokens; must hold num_turns turns at their budgets (sft.episode_len: 75, 95, 96,
  # one more with the instruction's word).
  c.max_len = {"ambig_math": 80, "doc_edit": 96, "code_spec": 100}[task]

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
  c.model.max_position_embeddings = 512  # >= max_len
  c.model.tie_word_embeddings = False
  c.model.attention_bias = False  # True for Qwen2
  # The value head is untrained here; PPO restores this checkpoint strictly and needs it.
  c.model.heads = ("lm", "value")
  c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
  c.model.param_dtype = "float32"
  c.model.remat = False  # recompute layers in the backward pass to save memory
  c.model.remat_policy = "nothing_saveable"  # what remat keeps (models/config.py)
  # One scanned layer instead of num_hidden_layers unrolled: compile time independent of depth;
  # params stacked under "layers" (models/config.py).
  c.model.scan_layers = False

  # Mesh (data, fsdp, model); one -1 fills the devices. Batches split over data x fsdp.
  c.mesh_shape = (-1, 1, 1)
  # [(regex over "layers_0/self_attn/q_proj/kernel"-style paths, (mesh axis or None, ...))];
  # None: collab_rl.sharding.LLAMA_RULES.
  c.partition_rules = ml_collections.FieldReference(None, field_type=list)

  c.batch_size = 64  # episodes per step (global)
  # Gradient accumulation: each update in this many slices of its rows (run.check_microbatches).
  c.microbatches = 1
  c.num_steps = 2000

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3  # peak, after linear warmup, then cosine decay
  c.optimizer.warmup_steps = 100
  c.optimizer.final_lr_fraction = 0.1  # end of cosine as a share of the peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 1.0  # global norm

  # Evaluation: the policy's own rollouts on fixed held-out episodes.
  c.eval_sampling = ml_collections.ConfigDict()
  c.eval_sampling.greedy = True  # argmax: the policy's most likely behaviour, no sampling noise
  c.eval_sampling.temperature = 1.0  # used when greedy is False
  c.eval_batch_size = 256  # held-out episodes (a multiple of the data-parallel size)

  c.log_every = 50  # steps between training metric writes
  c.eval_every = 500  # steps between evaluations (also at step 0 and at the end)

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
    c.batch_size = 32
    c.num_steps = 300
    c.optimizer.warmup_steps = 20
    c.log_every = 25
    c.eval_every = 100
    c.checkpoint.every_steps = 100
  return c
