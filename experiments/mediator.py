"""The mediator of the Mediator-Assistant arm (collab_rl/trainers/mediator.py), for an SFT base.

The mediator rewrites the conversation so far into one explicit request; the base (unchanged)
answers that request alone. It trains on the scripted user's episodes in both modes (reactive and
sharded), starting from the base's weights, and needs the base's checkpoint twice: `init_from`
(its starting weights) and `assistant_from` (the assistant it serves, saved in its config so that
`collab_rl.evaluate` loads both).

  python -m collab_rl.main --config experiments/sft_base.py:runlocal --workdir /tmp/sft_small
  python -m collab_rl.main --config experiments/mediator.py:runlocal --workdir /tmp/mediator \
      --config.init_from=/tmp/sft_small/checkpoints \
      --config.assistant_from=/tmp/sft_small/checkpoints

Expected (ambig_math, `runlocal`, 300 steps): exact match of the greedy rewrite climbs from 0 to
~0.7 in both modes (copying the operators around a `?` is what it still gets wrong). Against the
base alone on 256 test episodes (collab_rl.evaluate): sharded, the pair 0.76 vs the base 0.63,
since the rewrite collects the reveals; reactive, 0.59 vs 0.64, since the passive base behind it
never asks and, shown the same request again after `wrong`, greedily repeats its guess.
"""

import ml_collections

from collab_rl.tasks import registry
from experiments import sft_base, variants

_TASKS = ("ambig_math", "doc_edit", "code_spec")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  v = variants.parse(arg, "mediator", options={"task": ("ambig_math", _TASKS)})
  task = v["task"]
  base = sft_base.get_config(f"task={task}" + (",runlocal" if v["runlocal"] else ""))
  c = ml_collections.ConfigDict()
  c.trainer = "mediator"  # collab_rl/trainers/mediator.py
  c.seed = 0  # params, optimizer RNG and every episode (train and held-out)

  # Task, scripted user and model: the base's (the mediator starts from its weights). The
  # trainer plays both modes whatever `sim.sharded` says.
  c.task = task
  c.sim = base.sim
  c.model = base.model

  # The base: where the mediator's weights start ("": fresh) and the assistant it serves
  # (required: its WORKDIR/checkpoints, frozen, never saved here).
  c.init_from = ""
  # A Hugging Face Llama/Qwen2 folder to start from instead (its config.json sets the model's
  # architecture; heads it lacks, such as the value head, start fresh), or "".
  c.init_from_hf = ""
  # Also write the trained model as a Hugging Face folder (WORKDIR/hf: config.json,
  # model.safetensors and the tokenizer) at the end of the run.
  c.export_hf = False
  c.assistant_from = ""

  # Data: the SFT data's behaviour mixture (trainers/sft.py AskOrAnswerMix), cut after each
  # user turn. More asking than the base's data, so that answers to questions are well covered.
  c.ask_share = 0.5
  c.num_turns = 3  # assistant turns per training episode
  # The assistant's reply budget when the pair is evaluated: its longest answer, <eot>, spare.
  c.reply_tokens = registry.make_task(task).answer_len + 3
  c.batch_size = 32  # episodes per step, half reactive and half sharded
  # Gradient accumulation: each update in this many slices of its rows (run.check_microbatches).
  c.microbatches = 1
  # Rows per episode a step trains on, cuts with a target first (measured on ambig_math: ~2.0
  # of the 4 cuts of a reactive episode have one, ~1.6 of a sharded one; the rest follow a
  # `thanks`).
  c.cuts_per_episode = 2
  c.num_steps = 1000

  # The base's optimizer (warmup, then cosine), its peak too. The first target word (`calc`,
  # which the base never writes) costs ~6 nats at step 0, and lower peaks only learned slower.
  c.optimizer = ml_collections.ConfigDict(base.optimizer.to_dict())
  c.optimizer.warmup_steps = 50

  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, model); one -1 fills the devices
  c.partition_rules = ml_collections.FieldReference(None, field_type=list)  # None: LLAMA_RULES

  # Evaluation: per mode, this many held-out episodes, their cuts rewritten greedily, and the
  # Mediator-Assistant playing `eval_turns` turns (as collab_rl.evaluate does).
  c.eval_batch_size = 128
  c.eval_turns = 4
  c.log_every = 50
  c.eval_every = 250  # also at step 0 and at the end

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 250
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  if v["runlocal"]:
    c.num_steps = 300
    # Measured at step 300 from one small base (exact match reactive / sharded, 64 held-out
    # episodes each): 3e-3 0.57 / 0.42, 1e-2 0.72 / 0.77; 3e-4 was worse still on another base.
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 20
    c.eval_batch_size = 64
    c.log_every = 25
    c.eval_every = c.checkpoint.every_steps = 150
  return c
