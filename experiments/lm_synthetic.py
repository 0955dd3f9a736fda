"""Next-token training of a small Llama-family model on a synthetic Markov corpus.

The smallest real training in the project: it exercises config -> sharded jitted step ->
checkpoints -> metrics -> resume end to end, on any machine.

  python -m collab_rl.main --config experiments/lm_synthetic.py --workdir /tmp/lm
  python -m collab_rl.main --config experiments/lm_synthetic.py:runlocal --workdir /tmp/lm_small

Expected: eval_loss falls from log(vocab) = 6.2 (default) towards the corpus floor log(branching)
= 1.4; on a 2-core CPU the default run takes a few minutes, `runlocal` under a minute.
"""

import ml_collections

from experiments import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  v = variants.parse(arg, "lm_synthetic")
  c = ml_collections.ConfigDict()
  c.trainer = "lm"  # collab_rl/trainers/lm.py
  c.seed = 0  # params, optimizer RNG and data order

  # Model: field names are Hugging Face LlamaConfig's (see collab_rl/models/transformer.py).
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 512  # token 0 is padding
  c.model.hidden_size = 128  # D
  c.model.intermediate_size = 344  # SwiGLU width, ~8/3 D as in Llama
  c.model.num_hidden_layers = 4
  c.model.num_attention_heads = 4  # H
  c.model.num_key_value_heads = 2  # K (grouped-query attention)
  c.model.head_dim = ml_collections.FieldReference(None, field_type=int)  # None: D // H
  c.model.rms_norm_eps = 1e-6
  c.model.rope_theta = 10_000.0
  c.model.rope_scaling = ml_collections.FieldReference(None, field_type=dict)  # None: plain RoPE
  c.model.max_position_embeddings = 2048
  c.model.tie_word_embeddings = False
  c.model.attention_bias = False  # True for Qwen2
  c.model.heads = ("lm",)  # lm / value / reward
  c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
  c.model.param_dtype = "float32"
  c.model.remat = False  # recompute layers in the backward pass to save memory
  c.model.remat_policy = "nothing_saveable"  # what remat keeps (models/config.py)
  c.model.scan_layers = False  # True: one scanned layer, compile time independent of depth
  c.model.causal_query_chunk = 64  # causal attention in query chunks (0: one block)

  # Mesh (data, fsdp, model); one -1 fills the devices. Batches split over data x fsdp.
  c.mesh_shape = (-1, 1, 1)
  # [(regex over "layers_0/self_attn/q_proj/kernel"-style paths, (mesh axis or None, ...))];
  # None: collab_rl.sharding.LLAMA_RULES.
  c.partition_rules = ml_collections.FieldReference(None, field_type=list)

  c.batch_size = 32  # global sequences per step
  # Gradient accumulation: each update in this many slices of its rows (run.check_microbatches).
  c.microbatches = 1
  c.seq_len = 128  # tokens per training sequence (inputs)
  c.num_steps = 600

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3  # peak, after linear warmup, then cosine decay
  c.optimizer.warmup_steps = 50
  c.optimizer.final_lr_fraction = 0.1  # end of cosine as a share of the peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 1.0  # global norm

  # The synthetic corpus: a sparse random Markov chain, variable-length right-padded records.
  c.corpus = ml_collections.ConfigDict()
  c.corpus.num_records = 20_000  # the second half is also the validation pool
  c.corpus.branching = 4  # successors per token: loss floor log(4) = 1.39
  c.corpus.min_len = 16  # shortest record (tokens); exercises padding
  c.corpus.seed = 0

  c.log_every = 20  # steps between metric writes
  c.eval_every = 100  # steps between held-out losses (a multiple of log_every)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
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
    c.model.vocab_size = 128
    c.model.hidden_size = 64
    c.model.intermediate_size = 128
    c.model.num_hidden_layers = 2
    c.batch_size = 16
    c.seq_len = 32
    c.num_steps = 100
    c.optimizer.warmup_steps = 10
    c.corpus.num_records = 2_000
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint.every_steps = 50
  return c
