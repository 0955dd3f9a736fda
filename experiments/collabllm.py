"""The language tier: a Hugging Face Llama/Qwen2 policy trained on CollabLLM records against an LM
user, CollabLLM's own experiment in JAX (issue 19).

  python -m collab_rl.data prepare --task collabllm --input records.jsonl --data_dir DATA
  python -m collab_rl.main --config experiments/collabllm.py:ppo_mr --workdir runs/mr \\
      --config.init_from_hf=POLICY_HF --config.sim.user_from=USER_HF --config.data_dir=DATA

Variants (after the colon): ppo_mr (MR, w = `window`, the method), ppo_ext / ppo_ext_int /
ppo_helpfulness (next-turn rewards), dpo_online (DPO on MR-ranked candidates sampled now),
data_engine then dpo_offline (the candidates written to data_dir first, then read back), sft
(SFT on the records' conversations: the passive base, or the user simulator with `side=user`),
runlocal (tiny sizes). `window=`, `side=` take values.
The policy's architecture comes from `init_from_hf`'s config.json; the user (`sim.user_from`)
may be the same folder. `config.export_hf` writes the trained policy as a Hugging Face folder
(WORKDIR/hf), which is how an SFT run hands its model to RL (`init_from_hf=<sft run>/hf`).
Expected (CollabLLM's finding, and the verifiable tier's): next-turn rewards keep the policy
passive; MR learns to ask when the request is ambiguous and to answer when it is clear.
"""

import ml_collections

from collab_rl.models import lora
from experiments import variants

REWARDS = {"ppo_mr": "mr", "ppo_ext": "next_turn_ext", "ppo_ext_int": "next_turn_ext_int",
           "ppo_helpfulness": "helpfulness", "ppo_final": "final"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = variants.parse(arg, "collabllm", options={
      "window": ("2", None), "side": ("assistant", ("assistant", "user"))},
      flags=("runlocal", *REWARDS, "sft", "dpo_online", "dpo_offline", "data_engine"))
  sft, engine = opts["sft"], opts["data_engine"]
  dpo = opts["dpo_online"] or opts["dpo_offline"]
  arm = next((a for a in REWARDS if opts[a]), "ppo_mr")
  c = ml_collections.ConfigDict()
  c.trainer = ("sft_records" if sft else "dpo" if dpo else "data_engine" if engine
               else "ppo")
  c.seed = 0

  c.task = "collabllm"  # the language tier (collab_rl/tasks/text.py)
  c.data_dir = ""  # prepared records: python -m collab_rl.data prepare --task collabllm
  c.tokenizer = ""  # the policy's tokenizer folder ("": init_from_hf's)
  c.sim = ml_collections.ConfigDict(dict(  # the LM user (tasks/text.py UserConfig)
      user_from="",  # its Hugging Face folder (may be the policy's)
      max_user_len=48,  # tokens of one user turn
      temperature=1.0,  # its sampling temperature (0: greedy)
      prompt="collabllm",  # collabllm (CollabLLM's role-play prompt) | short (small models)
      show_target=True,  # the reference answer is in the user's prompt, as in CollabLLM
      max_request_tokens=256,  # the policy's opening: template prefix + first request
      max_prompt_tokens=1024,  # the user's prompt: instructions, goal, first request
      first_turn="record"))  # who opens: record (its first turn) | user (the LM, from its goal)
  c.judge = ml_collections.ConfigDict(dict(
      folder="",  # an LM judge's Hugging Face folder ("": none; then w_int must be 0)
      ratings="1,2,3,4,5,6,7,8,9",  # single-token ratings, worst first
      min_mass=0.5))  # warn when the judge puts less probability on its ratings
  c.metric = "auto"  # the task score of records without a verifier: auto | answer | bleu | ...

  # The policy's architecture is read from init_from_hf's config.json (run.model_from_hf).
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0, hidden_size=0, intermediate_size=0, num_hidden_layers=0,
      num_attention_heads=0, num_key_value_heads=0, max_position_embeddings=0,
      heads=("lm", "value") if not (sft or dpo or engine) else ("lm",),
      dtype="float32", remat=False,
      # True: one scanned layer instead of the layers unrolled, params stacked under "layers"
      # (models/config.py); collabllm_8b.py sets it (2.4-3.4x faster compiles at 32 layers).
      scan_layers=False,
      # > 0: a prefill into a KV cache attended this many queries at a time (models/config.py),
      # the LM user's too; collabllm_8b.py sets it.
      cache_query_chunk=0))

  c.num_turns = 3  # assistant turns per conversation
  c.reply_tokens = 48  # budget of one assistant reply
  c.temperature = 1.0  # sampling temperature of the rollouts

  c.reward = ml_collections.ConfigDict()
  c.reward.kind = REWARDS[arm]  # mr | next_turn_ext | next_turn_ext_int | helpfulness | final
  c.reward.window = int(opts["window"])  # MR's forward turns
  c.reward.samples = 3  # MR's futures per reply
  c.reward.samples_chunk = 0  # futures played at once (0: all; fewer hold fewer KV caches)
  c.reward.w_ext = 1.0  # weight of the task score in R*
  c.reward.w_int = 0.0  # weight of the interactivity judge in R* (needs judge.folder)
  c.reward.token_cost = 5e-4  # lambda per token read (the paper's)

  # DPO (trainers/dpo.py): G candidates per conversation after `context_turns` turns, ranked
  # by MR; (best, worst) pairs whose MR gap passes `min_gap`.
  # The data engine (data/engine.py) writes such candidates for `num_conversations` of the
  # train split's records into data_dir/mr_candidates, which dpo_offline reads.
  c.dpo = ml_collections.ConfigDict(dict(source="offline" if opts["dpo_offline"] else "online",
                                         beta=0.1))
  c.candidates = 4
  c.min_gap = 0.05
  c.context_turns = 0
  c.num_conversations = 256
  c.validation_fraction = 0.05

  # gamma = 0: each reply is optimised for its own reward, as in CollabLLM, so the arms differ
  # only in that reward. With gamma > 0 a turn's advantage sums the later turns' rewards and turns
  # a next-turn reward into a conversation-level return (on this tier's demonstration too:
  # ppo_ext at gamma = 1 asked on every ambiguous request after 10 iterations).
  c.ppo = ml_collections.ConfigDict(dict(
      advantage="gae", group_size=4, gamma=0.0, lam=0.95, clip_eps=0.2, vf_coef=0.5,
      vf_clip=0.5, kl_coef=0.05, ent_coef=0.0, epochs=2, minibatches=2, whiten=True,
      logits_chunk=0, one_call=False))  # ppo_ambig_math.py says what each field is

  # SFT on the records' conversations (trainers/sft_records.py): the loss on the assistant's
  # tokens; side=user trains the user simulator on the same conversations, seen from the user's
  # chat (its prompt with the goal, roles swapped).
  c.side = opts["side"]
  c.max_len = 512  # SFT sequence length (longer conversations are cut, and counted)

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3 if sft else 1e-5, warmup_steps=20 if sft else 5, b1=0.9, b2=0.999,
      weight_decay=0.0, grad_clip=1.0, final_lr_fraction=0.1))
  # LoRA (collab_rl/models/lora.py): rank 0 trains every weight; CollabLLM trains r = 32 adapters
  # (`--config.lora.rank=32`), the base frozen and held once (it is the KL reference too).
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0,
                                          targets=list(lora.DEFAULT_TARGETS),
                                          trainable=[r"^value_head/"]))
  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, model)
  c.partition_rules = ml_collections.FieldReference(None, field_type=list)
  c.batch_size = 32 if sft else 16  # sequences per SFT step / conversations per iteration
  # Gradient accumulation: each update in this many slices of its rows (run.check_microbatches).
  c.microbatches = 1
  c.num_steps = 1000 if sft else 100  # SFT steps / RL iterations
  c.log_every = 10 if sft else 1
  c.eval_every = 100 if sft else 10
  c.eval_batch_size = 32  # held-out records per evaluation (the validation split's first)
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100 if sft else 10, max_to_keep=3,
                                                async_save=True))
  c.init_from = ""  # an earlier run's checkpoints (same architecture), or:
  c.init_from_hf = ""  # the policy's Hugging Face folder (architecture, weights, tokenizer)
  c.export_hf = True  # WORKDIR/hf at the end: the trained policy, loadable by transformers
  c.on_nonfinite = "stop"

  if opts["runlocal"]:
    c.num_turns = 2
    c.reply_tokens = 16
    c.sim.max_user_len = 12
    c.sim.max_request_tokens = 64
    c.sim.max_prompt_tokens = 256
    c.max_len = 128
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_steps = 2
    c.eval_every = 2
    c.reward.samples = 2
    c.reward.window = min(c.reward.window, 1)
    c.ppo.minibatches = 1
    c.checkpoint.every_steps = 1
  return c
