"""SFT of the base policy on conversations, with the loss on the assistant's tokens only.

This trains the shared **base policy** every RL arm starts from (`init_from`). The base is
passive, as instruction-tuned models are: its data answers at once most of the time but holds
some clarifying questions. Each step plays a fresh batch of episodes on device against the
task's scripted user with a behaviour mixture chosen once per conversation: with probability
`ask_share` the oracle (asks for every missing slot, then answers right), else answer-now
(fills the missing slots with guesses and answers at once; after `wrong` it guesses again).

What to do with an answer is taught apart from whether to ask: with `context_ask_share` > 0, that
share of the conversations that would answer at once follow the oracle instead, but their
questions are context (not in the loss), as if the user had volunteered them. The base then sees
many more answers after a question, in every shape (1 and 2 missing), without learning to ask
more often: the ask decision is trained on the `ask_share` conversations only. `data_users` (a
`users.py` mixture, e.g. "reactive:3,sharded") plays the data against more than the training
user, so that answers after an unasked revelation are in it too.

The Proactive Base (CollabLLM's prompted baseline) comes from the same data: with
`instruction_share` > 0 that share of conversations opens with the `clarify` instruction, and
those follow a different mixture, the way a prompt shifts an instruction-tuned model without
teaching it when a question is needed: asking for the missing slots in `instructed_ask_share` of
the ambiguous ones, and in `instructed_confirm_share` of the clear ones a needless question about
a slot the request already gives (prompted models over-ask) before the answer. The base is then
evaluated without the instruction (Base) and with it on every request (Proactive Base).

The mixture (`sft.AskOrAnswerMix`) and the loss live in `collab_rl/sft.py`, which the mediator
trains with too: next-token cross-entropy on the ASSISTANT tokens of each conversation (reply
contents and their `<eot>`: exactly what the sampler generates); every token before them is
context, the `<assistant>` headers and the user's turns included:

    L = - sum_{b,t} m_bt log p(x_bt | x_b,<t) / sum_{b,t} m_bt,   m_bt = [role_bt == ASSISTANT]

Evaluation (step 0 of a fresh run, every `eval_every` steps and at the end) plays a fixed batch
of held-out episodes (keys no training step uses) with the policy itself and logs
`scoring.summarize` (score, score on clear / ambiguous requests, ask-when-ambiguous,
answer-when-clear, their macro F1, tokens, turns) plus the share of first replies that are
well-formed (`well_formed`; `well_formed_answer_clear`: a parseable answer to a clear request),
the score of the conversations that opened with a question (`score_asked_first`, nan if none),
and the teacher-forced loss on a held-out behaviour batch (`eval_loss`).

Episodes are a function of (seed, step), so a resumed run sees the same data and no iterator
state is checkpointed. The train step reads a `{"tokens", "roles"}` batch only: another source
(e.g. conversations read from disk with grain) is one more entry in `DATA_SOURCES`, which would
also hand its iterator state to the checkpointer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from collab_rl import rollout as rollout_lib
from collab_rl import run as run_lib
from collab_rl import sampling
from collab_rl import sft as sft_lib
from collab_rl import sharding as sharding_lib
from collab_rl import train_state as state_lib
from collab_rl.models import transformer
from collab_rl.tasks import registry
from collab_rl.tasks import scoring
from collab_rl.tokenizer import ASSISTANT, CONTEXT, PAD

# ------------------------------------------------------------------------------------------------
# Data sources: `(config, task, mesh) -> (key -> {"tokens": [B, L], "roles": [B, L]})`.
# ------------------------------------------------------------------------------------------------


def reply_starts(roles_BxL) -> tuple[jax.Array, jax.Array]:
  """[B, L] the assistant's tokens, and the first token of each of its replies."""
  asst_BxL = roles_BxL == ASSISTANT
  return asst_BxL, asst_BxL & ~jnp.pad(asst_BxL[:, :-1], ((0, 0), (1, 0)))


def question_mask(task, tokens_BxL, roles_BxL) -> jax.Array:
  """[B, L] the assistant tokens of replies that open with `ask` (the word, slot and `<eot>`)."""
  asst_BxL, start_BxL = reply_starts(roles_BxL)
  reply_BxL = jnp.cumsum(start_BxL, 1)  # which reply a token belongs to
  ask_id_BxL = jax.lax.cummax(jnp.where(start_BxL & (tokens_BxL == task.ids["ask"]), reply_BxL,
                                        0), axis=1)
  return asst_BxL & (ask_id_BxL == reply_BxL)


def guess_mask(task, intent, tokens_BxL, roles_BxL) -> jax.Array:
  """[B, L] the values a first reply that answers writes for the slots the request left out.

  Nothing in the conversation tells those values: `answer_now_policy` draws them at random, so
  their target is the uniform distribution over the slot's values, the same token positions
  where every conversation that asked must copy the user's reply instead (later answers are not
  included: after `wrong` the behaviour moves to the next value, which the conversation shows)."""
  asst_BxL, start_BxL = reply_starts(roles_BxL)
  first_BxL = asst_BxL & (jnp.cumsum(start_BxL, 1) == 1)
  pos_L = jnp.arange(tokens_BxL.shape[1])
  start_B = jnp.argmax(start_BxL, 1)
  answers_B = jnp.take_along_axis(tokens_BxL, start_B[:, None], 1)[:, 0] == task.ids["answer"]
  # The answer template's slot per reply offset (-1: a fixed word).
  slot_J = np.array([item if not isinstance(item, str) else -1 for item in task.answer_template]
                    + [-1])
  offset_BxL = jnp.clip(pos_L[None, :] - start_B[:, None], 0, len(slot_J) - 1)
  slot_BxL = jnp.asarray(slot_J)[offset_BxL]
  missing_BxL = jnp.take_along_axis(intent.missing_BxK, jnp.maximum(slot_BxL, 0), 1)
  return first_BxL & answers_B[:, None] & (slot_BxL >= 0) & missing_BxL


def behaviour_source(config, task, mesh) -> Callable[[jax.Array], dict]:
  """Fresh episodes of `AskOrAnswerMix` against the scripted user, all on device; the questions
  of the rows whose questions are context (`context_ask_share`) get the CONTEXT role."""
  policy = sft_lib.AskOrAnswerMix(task, config.ask_share, config.get("instructed_ask_share", 0.0),
                                  config.get("instructed_confirm_share", 0.0),
                                  config.get("context_ask_share", 0.0))
  train_guesses = config.get("train_guesses", True)

  def batch(key):
    ro, roles_BxL = behaviour_rollout(policy, task, config, key, mesh)
    if not train_guesses:
      guess_BxL = guess_mask(task, ro.conv.intent, ro.conv.tokens_BxL, ro.conv.roles_BxL)
      roles_BxL = jnp.where(guess_BxL, CONTEXT, roles_BxL)
    return {"tokens": ro.conv.tokens_BxL, "roles": roles_BxL}

  return jax.jit(batch, out_shardings=sharding_lib.batch_sharding(mesh))


def behaviour_rollout(policy: sft_lib.AskOrAnswerMix, task, config, key, mesh=None):
  """One batch of the behaviour data: the rollout, and the roles the loss reads (the questions
  of context rows turned to CONTEXT)."""
  k_int, k_plan, k_play = jax.random.split(key, 3)
  intent = task.sample_intents(k_int, config.batch_size)
  plan = policy.choose(k_plan, intent)
  ro = rollout_lib.rollout(policy.planned(plan), task, None, k_play, config.batch_size,
                           num_turns=config.num_turns, max_len=config.max_len, intent=intent,
                           mesh=mesh)
  tokens_BxL, roles_BxL = ro.conv.tokens_BxL, ro.conv.roles_BxL
  context_BxL = plan[2][:, None] & question_mask(task, tokens_BxL, roles_BxL)
  return ro, jnp.where(context_BxL, CONTEXT, roles_BxL)


DATA_SOURCES = {"behaviour": behaviour_source}

# ------------------------------------------------------------------------------------------------
# Evaluation: the policy itself against the scripted user.
# ------------------------------------------------------------------------------------------------


def first_reply_format(task, conv, len_B) -> dict[str, jax.Array]:
  """[B] bools: the first assistant reply is a well-formed answer (the task's answer template,
  then `<eot>`) / a well-formed question (`ask <slot> <eot>`)."""
  w = task.answer_len + 1
  start_B = jnp.argmax(conv.roles_BxL == ASSISTANT, 1)
  idx_BxW = jnp.clip(start_B[:, None] + jnp.arange(w)[None, :], 0, conv.max_len - 1)
  reply_BxW = jnp.take_along_axis(conv.tokens_BxL, idx_BxW, 1)
  reply_BxW = jnp.where(jnp.arange(w)[None, :] < len_B[:, None], reply_BxW, PAD)
  answer_ok = jnp.all(task.parse_answer(reply_BxW, len_B) >= 0, 1)
  ask_ok = ((len_B == 3) & (reply_BxW[:, 0] == task.ids["ask"])
            & (jnp.asarray(task.token_slot_V)[reply_BxW[:, 1]] >= 0)
            & (reply_BxW[:, 2] == task.eot_id))
  return {"answer_well_formed": answer_ok, "ask_well_formed": ask_ok}


def eval_policy(config, model, task) -> rollout_lib.LMPolicy:
  """The policy as evaluation plays it: one reply is at most the answer template and `<eot>`."""
  s = config.eval_sampling
  cfg = sampling.SamplingConfig(max_new_tokens=task.answer_len + 1, temperature=s.temperature,
                                greedy=s.greedy, stop_tokens=(task.eot_id,))
  return rollout_lib.lm_policy(model, cfg, chunk_width=rollout_lib.chunk_width(task),
                               max_turns=config.num_turns)


def summarize(episodes: dict) -> dict[str, float]:
  """Host-side means of the eval episodes: `scoring.summarize` plus the reply format."""
  m = {k: np.asarray(v) for k, v in episodes.items()}
  answer_ok, ask_ok = m.pop("answer_well_formed"), m.pop("ask_well_formed")
  clear = ~m["ambiguous"].astype(bool)
  out = scoring.summarize(m)
  out["well_formed"] = float(np.mean(answer_ok | ask_ok))
  out["well_formed_answer_clear"] = float(answer_ok[clear].mean()) if clear.any() else np.nan
  # Whether a question, once asked, pays off: what RL needs the base to do after asking.
  asked = m["asked_first"].astype(bool)
  out["score_asked_first"] = float(m["score"][asked].mean()) if asked.any() else np.nan
  return out


# ------------------------------------------------------------------------------------------------
# Build.
# ------------------------------------------------------------------------------------------------


class Built(NamedTuple):
  task: Any
  model: transformer.Transformer
  create_fn: Callable[[], state_lib.TrainState]
  abstract: state_lib.TrainState
  data_fn: Callable  # key -> {"tokens", "roles"} training batch
  step_fn: Callable  # (state, batch) -> (state, metrics); the state is donated
  loss_fn: Callable  # (params, batch) -> teacher-forced loss
  # metric prefix -> (params, key) -> [B] per-episode metrics of the policy's own rollouts:
  # "" on the task as deployed, "proactive/" with the instruction on every request.
  eval_fns: dict[str, Callable]


def instructed_task(config):
  """The task with the instruction on `instruction_share` of the requests (as deployed when the
  share is 0): the SFT data's mixture."""
  share = instruction_share(config)
  if share:
    return registry.config_task(config, instruction_rate=share)
  return registry.config_task(config)


def data_task(config):
  """The task the SFT data is played on: the instruction on `instruction_share` of the requests,
  and the users of `data_users` (a users.py mixture; "": the training user)."""
  task = instructed_task(config)
  if not config.get("data_users", ""):
    return task
  return registry.make_task(config.task, {**dataclasses.asdict(task.sim),
                                          "mixture": config.data_users})


def instruction_share(config) -> float:
  return float(config.get("instruction_share", 0.0))


def build(config, mesh, task) -> Built:
  init = run_lib.init_state(config, mesh,
                            run_lib.make_optimizer(config.optimizer, config.num_steps))
  model, tx, shardings = init.model, init.tx, init.shardings
  data_fn = DATA_SOURCES[config.data_source](config, data_task(config), mesh)
  batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  microbatches = config.get("microbatches", 1)
  step_fn = jax.jit(lambda s, b: sft_lib.train_step(model, tx, s, b, microbatches),
                    in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                    donate_argnums=0)
  loss_fn = jax.jit(lambda p, b: sft_lib.sft_loss(model, p, b["tokens"], b["roles"])[0],
                    in_shardings=(shardings.params, batch_sh), out_shardings=repl)
  policy = eval_policy(config, model, task)

  def episodes(eval_task, params, key, instruction_rate=None):
    intent = None
    if instruction_rate is not None:  # the intents `rollout` draws, at this rate
      intent = eval_task.sample_intents(jax.random.split(key)[0], config.eval_batch_size,
                                        instruction_rate)
    ro = rollout_lib.rollout(policy, eval_task, params, key, config.eval_batch_size,
                             num_turns=config.num_turns, max_len=config.max_len, intent=intent,
                             mesh=mesh)
    return {**scoring.episode_metrics(eval_task, ro.conv, ro.sim),
            **first_reply_format(eval_task, ro.conv, ro.reply_lengths_BxT[:, 0])}

  if instruction_share(config) == 0:
    eval_fns = {"": jax.jit(functools.partial(episodes, task),
                            in_shardings=(shardings.params, repl))}
  else:
    # The data taught the instruction: watch the Proactive Base too (every request instructed).
    # One program plays both, the rate an argument: the requests are as wide as an instructed
    # one, and the uninstructed rows carry a padding slot instead of the word. That saves a
    # compile (4-5 s of the base's 16-17 on the 2-core CPU). The per-episode metrics equal those
    # of a program compiled for the deployed task (test_sft; trained bases of all three tasks);
    # the attention sums over one more masked slot, so logits may differ by float rounding.
    both = jax.jit(functools.partial(episodes, registry.config_task(config, instruction_rate=1.0)),
                   in_shardings=(shardings.params, repl, repl))

    def at_rate(rate):
      return lambda params, key: both(params, key, np.float32(rate))

    eval_fns = {"": at_rate(task.sim.instruction_rate), "proactive/": at_rate(1.0)}
  return Built(task, model, init.create_fn, init.abstract, data_fn, step_fn, loss_fn, eval_fns)


def episode_len(config, task) -> int:
  """Tokens of the longest conversation: the opening, then every turn at its budget (header,
  the longest well-formed reply with `<eot>`, header, the user's budget with `<eot>`)."""
  opening = rollout_lib.opening_width(task)
  return opening + config.num_turns * (1 + task.answer_len + 1 + 1 + task.sim.max_user_len + 1)


def check_config(config):
  """Every check that can fail on the config, before anything compiles. Returns (mesh, task)."""
  mcfg = run_lib.check_model(config)
  if "lm" not in mcfg.heads:
    raise ValueError(f"config.model.heads={mcfg.heads} must include 'lm' (the policy)")
  if not 0.0 <= config.ask_share <= 1.0:
    raise ValueError(f"config.ask_share={config.ask_share} must be in [0, 1] (the share of "
                     "conversations that follow the asking oracle)")
  for name in ("instruction_share", "instructed_ask_share", "instructed_confirm_share",
               "context_ask_share"):
    if not 0.0 <= config.get(name, 0.0) <= 1.0:
      raise ValueError(f"config.{name}={config[name]} must be in [0, 1] (a share of "
                       "conversations)")
  if config.data_source not in DATA_SOURCES:
    raise ValueError(f"config.data_source={config.data_source!r} is not one of "
                     f"{sorted(DATA_SOURCES)}")
  task = registry.config_task(config)  # unknown task or simulator fields fail here
  try:
    data_task(config)
  except ValueError as e:
    raise ValueError(f"config.data_users={config.get('data_users')!r}: {e}") from None
  if mcfg.vocab_size < task.vocab_size:
    raise ValueError(f"config.model.vocab_size={mcfg.vocab_size} is smaller than the "
                     f"{config.task} vocabulary ({task.vocab_size} words)")
  run_lib.check_positive(config, ("num_steps", "num_turns", "max_len", "log_every", "eval_every",
                                  "eval_batch_size"))
  mesh = run_lib.check_run(config, batches=("batch_size", "eval_batch_size"))
  run_lib.check_microbatches(config, config.batch_size)
  need = episode_len(config, instructed_task(config))
  if config.max_len < need:
    # A cut conversation would train on replies without their <eot>.
    raise ValueError(f"config.max_len={config.max_len} cannot hold {config.num_turns} turns of "
                     f"{config.task} at their budgets ({need} tokens)")
  if mcfg.max_position_embeddings < config.max_len:
    raise ValueError(f"config.model.max_position_embeddings={mcfg.max_position_embeddings} < "
                     f"config.max_len={config.max_len}")
  eval_policy(config, None, task)  # SamplingConfig validates the temperature
  return mesh, task


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def evaluate(b: Built, params, eval_batch, eval_key) -> dict[str, float]:
  out = {}
  for prefix, fn in b.eval_fns.items():
    m = summarize(sharding_lib.to_host(fn(params, eval_key)))  # rows over hosts
    out.update({prefix + k: v for k, v in m.items()})
  out["eval_loss"] = float(b.loss_fn(params, eval_batch))
  return out


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains the base to `config.num_steps`, resuming from `workdir` if it holds a checkpoint.

  `stop_after` ends this process at that step, with a checkpoint (`run.Run.steps`).
  Returns {"state", "final", "how"}: `final` holds the latest value of every logged scalar, and
  always an evaluation of the returned policy (run unlogged if this process did none).
  """
  mesh, task = check_config(config)
  b = build(config, mesh, task)
  run = run_lib.Run(config, workdir, b.abstract, b.create_fn, tokenizer=task.tokenizer)
  state = run.state
  eval_batch = b.data_fn(jax.random.fold_in(run.keys.eval, 0))
  eval_key = jax.random.fold_in(run.keys.eval, 1)
  history = run.baseline(lambda: evaluate(b, state.params, eval_batch, eval_key))
  for step in run.steps(int(state.step), config.num_steps, stop_after, "sft"):
    state, m = b.step_fn(state, b.data_fn(jax.random.fold_in(run.keys.train, step)))
    history.update(run.end_step(step, state, m,
                                lambda: evaluate(b, state.params, eval_batch, eval_key),
                                {"episodes_per_s": config.batch_size}))
  if "score" not in history:  # e.g. the workdir held a finished run: report its policy anyway
    history.update(evaluate(b, state.params, eval_batch, eval_key))
  run.close()
  return {"state": state, "final": history, "how": run.how}
