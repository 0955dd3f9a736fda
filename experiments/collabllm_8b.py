"""Llama-3.1-8B-Instruct trained with MR against a Llama-3.1-8B-Instruct user on a TPU slice:
experiments/collabllm.py at CollabLLM's sizes (issue 19).

  python -m launch.tpu watch --name=cllm-8b --zone=us-west4-a --accelerator=v5litepod-64 --spot \\
      --config=experiments/collabllm_8b.py:slice=v5litepod-64 --workdir=gs://BUCKET/cllm-8b \\
      --stage=/tmp/llama31=gs://BUCKET/models/Llama-3.1-8B-Instruct \\
      --stage=/tmp/collabllm=gs://BUCKET/collabllm_data \\
      -- --config.init_from_hf=/tmp/llama31 --config.sim.user_from=/tmp/llama31 \\
      --config.data_dir=/tmp/collabllm

`slice=` names the launcher's --accelerator (v5litepod-64 by default; v4-64, v5litepod-256, ...):
it sets the mesh (pods.policy_8b_mesh) and the batch (one conversation a chip in each update
step, two per iteration). The records are prepared here
(`python -m collab_rl.data prepare --task collabllm --input records.jsonl --data_dir D`, then
`gcloud storage rsync -r D gs://...`). The library reads the Hugging Face folders and the records
as local paths, so `--stage=LOCAL=gs://...` copies them onto every worker before each run (again
after each preemption); the launcher refuses a gs:// folder, an unset one or one it does not
stage. `--dry-run` prints every command.
The per-chip memory plan: `python -m experiments.memory_plan --collabllm`.

Variants (after the colon, with slice=): collabllm.py's reward arms (ppo_mr, the default;
ppo_ext, ppo_ext_int, ppo_helpfulness, ppo_final), `window=` (MR's forward turns, 2), `judge`
(R_int from an LM judge, weight 1 as in CollabLLM's R*: add --config.judge.folder=/tmp/llama31)
and `tensor=` (chips a conversation's weights and activations are split over, 1: with the
scanned layers a full fine-tune fits v5e at 1, as LoRA does).
Expected: collabllm.py's result at scale: MR learns to ask when the request is ambiguous and to
answer when it is clear; the next-turn arms stay passive.
"""

import ml_collections

from experiments import collabllm
from experiments import pods
from experiments import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = variants.parse(arg, "collabllm_8b", flags=(*collabllm.REWARDS, "judge"), options={
      "slice": ("v5litepod-64", None), "window": ("2", None), "tensor": ("1", None)})
  arm = next((a for a in collabllm.REWARDS if opts[a]), "ppo_mr")
  c = collabllm.get_config(f"{arm},window={opts['window']}")
  s = pods.get_slice(opts["slice"])  # an unknown accelerator type fails here, naming the known

  # bf16 compute with fp32 master weights (AdamW's updates at lr 1e-6 vanish in bf16), every
  # layer rematerialised: a 4k-token conversation's activations then fit a v5e chip's 16 GiB.
  # The architecture fields stay 0: init_from_hf's config.json sets them (run.model_from_hf).
  c.model.dtype = "bfloat16"  # compute, and the rollout's KV caches
  c.model.param_dtype = "float32"  # the policy's (and its value head's) master weights
  c.model.remat = True  # recompute each layer in the backward pass
  c.model.remat_policy = "nothing_saveable"  # keep only each layer's input (models/config.py)
  # Attention's backward through its softmax, not the custom recomputing one: with every layer
  # rematerialised it saves no memory here (the v5e-64 update's temporaries 5.96 GiB with it,
  # 5.90 without, compiled), and its speed on a TPU is not measured.
  c.model.attention_recompute = False
  # The 32 layers as one scanned layer (params stacked under "layers"): XLA then gathers one
  # layer's fsdp-split weights at a time, where it scheduled the unrolled layers' gathers early
  # and held 19 layers' MLP kernels at once. The full fine-tune's update on v5e-64 compiles at
  # 7.30 GiB of 16 (17.84, refused, unrolled; README "Scale out"), and the programs compile
  # 2.4-3.4x faster at this depth (README "Benchmarks", measured on CPU).
  c.model.scan_layers = True

  # Params over fsdp (partition_rules None: the Llama rules, pods.RULES_8B), conversations over
  # data x fsdp: (1, 64, 1) on v5e-64, (1, 32, 1) on v4-64, (4, 64, 1) on v5e-256. The launcher
  # checks it against --accelerator.
  # tensor=T splits each weight and each conversation's activations over T chips too (the
  # `model` axis), fsdp shrinking by T. With the layers unrolled a full fine-tune's update on
  # v5e's 16 GiB needed it (17.84 GiB with (1, 64, 1), 6.76 with tensor=2, (1, 32, 2)); scanned
  # it fits at 1 (README "Scale out": memory_plan --compile). One conversation per T chips, so
  # T times fewer per iteration.
  data, fsdp, _ = pods.policy_8b_mesh(s)
  tensor = int(opts["tensor"])
  if tensor < 1 or fsdp % tensor:
    raise ValueError(f"collabllm_8b tensor={opts['tensor']}: must divide the slice's fsdp ways "
                     f"({fsdp} on {s.accelerator_type})")
  c.mesh_shape = pods.check_mesh((data, fsdp // tensor, tensor), s)
  rows = c.mesh_shape[0] * c.mesh_shape[1]

  # CollabLLM's sizes. A conversation reaches sim.max_request_tokens + (num_turns + window) x
  # (reply_tokens + max_user_len + 10 template ids) = 512 + 6 x 586 = 4028 <= 4096 columns.
  c.num_turns = 4  # assistant turns per conversation
  c.reply_tokens = 384  # one reply's budget (a longer one is cut, its end of turn added)
  c.temperature = 1.0  # the policy's sampling temperature in rollouts
  c.sim.max_user_len = 192  # one user turn's budget
  c.sim.temperature = 1.0  # the user's sampling temperature (its futures differ per sample)
  c.sim.prompt = "collabllm"  # CollabLLM's role-play prompt (an 8B user follows it)
  c.sim.show_target = True  # the reference answer is in the user's prompt, as in CollabLLM
  # Llama-3.1's template opens with its dated system header (~25 ids), then the request; a
  # longer request (a whole document) fails naming its record: raise this, lower reply_tokens.
  c.sim.max_request_tokens = 512
  c.sim.max_prompt_tokens = 2048  # role-play instructions + goal + reference answer

  c.reward.window = int(opts["window"])  # MR's forward turns (the paper's w = 2)
  c.reward.samples = 3  # S futures per reply: B x S rows decode beside the B conversations
  # The rollout as XLA's TPU compiler lays it out (README "Scale out": memory_plan --compile),
  # two conversations a chip (below), a prefill into a KV cache attended 128 queries at a time.
  # v5e's 16 GiB: the futures one at a time, 11.71 GiB a chip (12.36 without the query chunks;
  # all 3 at once held 15.34 for one conversation, too close to the 15.75 XLA may use). 32 GiB
  # chips: all 3 at once (a third of the decoding steps of one at a time), 26.86 GiB on v4-64
  # (32.43 without the query chunks; one future at a time 15.30).
  c.reward.samples_chunk = 0 if s.hbm_gib >= 32 else 1
  c.model.cache_query_chunk = 128
  c.reward.token_cost = 5e-4  # lambda per token read (the paper's; 1e-4 for documents)
  c.reward.w_int = 1.0 if opts["judge"] else 0.0  # R_int needs --config.judge.folder

  # Conversations a chip: 2 on every slice (with tensor=T, one a T chips, as it was compiled). A
  # decoding step gathers each layer's fsdp-split weights whatever the rows it decodes, so a
  # chip's second conversation should add little to the rollout's time (the reason; not
  # measured on a TPU). The rollout holds both with their futures in both KV caches (the
  # figures above; v5e-64 with LoRA r = 32: 12.87 GiB); the log-prob pass reads both (3.78 GiB
  # on v5e-64); each update step trains one (7.30). `python -m experiments.memory_plan
  # --collabllm [--compile]` prints them.
  per_row = 2 if tensor == 1 else 1  # conversations per data x fsdp row of the mesh
  c.batch_size = per_row * rows  # conversations per iteration
  c.eval_batch_size = rows  # validation records per evaluation (one per row)
  c.ppo.minibatches = per_row  # so each update step trains one 4k-token conversation per row
  c.ppo.epochs = 2  # passes over each iteration's conversations
  c.ppo.kl_coef = 0.05  # k3 KL to the frozen reference (the starting policy)
  # LM-head logits 512 positions at a time: whole, a conversation's fp32 logits, their
  # log-softmax and gradients are 2 GiB each (memory_plan --compile measures the programs).
  c.ppo.logits_chunk = 512
  c.optimizer.learning_rate = 1e-6  # an 8B policy's PPO step
  c.optimizer.warmup_steps = 10  # optimizer steps (epochs x minibatches per iteration)
  c.num_steps = 200  # iterations: 200 x batch_size conversations
  c.log_every = 1
  c.eval_every = 20  # a greedy pass over the validation records, scored on the host
  # Spot slices are preempted: a checkpoint every 10 iterations (96 GB: fp32 params + AdamW),
  # the last two kept; frozen params (reference, user, judge) are never saved.
  c.checkpoint.every_steps = 10
  c.checkpoint.max_to_keep = 2
  c.export_hf = True  # WORKDIR/hf at the end: the trained policy, for transformers or a next run
  return c
