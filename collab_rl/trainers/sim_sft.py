"""SFT of the LM user simulator on scripted-user transcripts generated on device.

Every step plays a fresh batch of episodes against the task's scripted user with a mixture of
behaviour policies (each turn, each row asks what the oracle would, answers at once with guesses,
or does something random: asks about any slot, answers right or one slot off whatever it was
told, writes word salad),
renders each conversation as the simulator reads it (`simulators.view_of`: the goal after
`<bos>`, then the conversation) and trains next-token cross-entropy on the user's replies only:
their tokens and their `<eot>`, the targets the simulator samples at rollout time. The first
request is excluded: the task writes it, never the simulator, and it is mostly random draws.

Evaluation, on held-out episodes (keys no training step uses), measures agreement with the
scripted user: teacher-forced (`eval_token_acc` on user tokens, `eval_done_acc`: the predicted
first token is `thanks` exactly when the script's is, `eval_reply_exact`: every token of a reply
right) and free-running (`rollout_reply_match`, `rollout_done_match`: the LM simulator writes the
user turns of a rollout with the same behaviours, compared turn by turn with what the scripted
user says to the same replies). A fresh run evaluates at step 0 too, the untrained baseline.

Episodes are a function of (seed, step), so a resumed run sees the same data: no data iterator
state to checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from collab_rl import conversation as conv_lib
from collab_rl import rollout as rollout_lib
from collab_rl import run as run_lib
from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl import simulators
from collab_rl import train_state as state_lib
from collab_rl.models import transformer
from collab_rl.tasks import registry
from collab_rl.tokenizer import USER, WORD_SPECIALS

# ------------------------------------------------------------------------------------------------
# Behaviour policies: what the simulator must learn to answer.
# ------------------------------------------------------------------------------------------------


def random_replies(task, intent, key, b: int):
  """Questions about any slot (known or not: `known`), answers that are right or one slot off
  whatever the history (`thanks` / `wrong`), word salad (`what ?`). (tokens_BxN, lengths_B),
  N = answer template + `<eot>`."""
  n, k = task.answer_len + 1, len(task.slots)
  k_kind, k_slot, k_val, k_words, k_len = jax.random.split(key, 5)
  kind_B = jax.random.randint(k_kind, (b,), 0, 3)
  eot = jnp.full((b, 1), task.eot_id, jnp.int32)
  slot_B = jax.random.randint(k_slot, (b,), 0, k)
  ask_BxN = jnp.concatenate([jnp.full((b, 1), task.ids["ask"], jnp.int32),
                             jnp.asarray(task.name_ids_K)[slot_B][:, None], eot], 1)
  ask_BxN = jnp.pad(ask_BxN, ((0, 0), (0, n - 3)))
  # The intended answer, half the time with one slot redrawn: "thanks" must then come from
  # comparing the answer with the goal, not from whether the missing slots were asked.
  k_which, k_new, k_off = jax.random.split(k_val, 3)
  which_BxK = jax.nn.one_hot(jax.random.randint(k_which, (b,), 0, k), k, dtype=bool)
  which_BxK &= (jax.random.uniform(k_off, (b,)) < 0.5)[:, None]
  values_BxK = jnp.where(which_BxK, task.sample_values(k_new, b), intent.values_BxK)
  guess_BxN = jnp.concatenate(
      [task._render(task.answer_template, values_BxK, jnp.zeros((b, k), bool)), eot], 1)
  # Salad: ordinary words (no specials), cut at a random length that ends with `<eot>`.
  salad_len_B = jax.random.randint(k_len, (b,), 1, n + 1)
  words_BxN = jax.random.randint(k_words, (b, n), len(WORD_SPECIALS), task.vocab_size)
  pos_N = jnp.arange(n)[None, :]
  salad_BxN = jnp.where(pos_N < salad_len_B[:, None] - 1, words_BxN,
                        jnp.where(pos_N == salad_len_B[:, None] - 1, task.eot_id, 0))
  toks = jnp.where((kind_B == 0)[:, None], ask_BxN,
                   jnp.where((kind_B == 1)[:, None], guess_BxN, salad_BxN))
  lengths = jnp.where(kind_B == 0, 3, jnp.where(kind_B == 1, n, salad_len_B))
  return toks.astype(jnp.int32), lengths.astype(jnp.int32)


class BehaviourMix:
  """A scripted policy: each turn, each row follows oracle / answer-now / random, drawn with
  `weights`. Mixing per turn, not per episode, covers many more (history, reply) pairs."""

  def __init__(self, task, weights: Sequence[float]):
    self.task = task
    self.log_w = jnp.log(jnp.asarray(weights, jnp.float32))
    self.oracle = rollout_lib.oracle_policy(task)
    self.answer_now = rollout_lib.answer_now_policy(task)

  def init(self, params, conv, prefix_width=None):
    return ()

  def __call__(self, params, conv, sim, state, key):
    b = conv.batch
    k_pick, k_now, k_rand = jax.random.split(key, 3)
    outs = [self.oracle(params, conv, sim, (), key)[::2],
            self.answer_now(params, conv, sim, (), k_now)[::2],
            random_replies(self.task, conv.intent, k_rand, b)]
    n = max(t.shape[1] for t, _ in outs)
    pick_B = jax.random.categorical(k_pick, self.log_w, shape=(b,))
    toks = jnp.zeros((b, n), jnp.int32)
    lengths = jnp.zeros((b,), jnp.int32)
    for i, (t, l) in enumerate(outs):
      toks = jnp.where((pick_B == i)[:, None], jnp.pad(t, ((0, 0), (0, n - t.shape[1]))), toks)
      lengths = jnp.where(pick_B == i, l, lengths)
    return toks, jnp.zeros((b, n), jnp.float32), lengths, state


# ------------------------------------------------------------------------------------------------
# Loss and agreement.
# ------------------------------------------------------------------------------------------------


def target_mask(task, view: conv_lib.Conversation) -> jax.Array:
  """[B, L] the simulator's own tokens: user role, after the first request, before the cursor."""
  pos_L = jnp.arange(view.max_len)[None, :]
  return ((view.roles_BxL == USER) & (pos_L >= simulators.first_reply_position(task))
          & (pos_L < view.cursor_B[:, None]))


def _logits(model, params, view):
  inputs = view.tokens_BxL[:, :-1]
  valid = jnp.arange(inputs.shape[1])[None, :] < view.cursor_B[:, None]
  return model.apply({"params": params}, inputs, valid_BxL=valid).logits_BxLxV


def sim_loss(model, task, params, conv):
  """Mean cross-entropy over the user-reply targets; aux: token accuracy and target count."""
  view = simulators.view_of(task, conv)
  logits = _logits(model, params, view)
  targets, mask = view.tokens_BxL[:, 1:], target_mask(task, view)[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  n = jnp.maximum(mask.sum(), 1)
  acc = jnp.sum((jnp.argmax(logits, -1) == targets) & mask) / n
  return jnp.sum(ce * mask) / n, (acc, n)


def agreement(model, task, params, conv, num_turns: int) -> dict[str, jax.Array]:
  """Teacher-forced agreement with the scripted user's replies in `conv` (see module doc)."""
  view = simulators.view_of(task, conv)
  num_messages = 3 + 2 * num_turns  # bos, goal, request, then assistant/user pairs
  logits = _logits(model, params, view)
  targets, mask = view.tokens_BxL[:, 1:], target_mask(task, view)[:, 1:]
  pred = jnp.argmax(logits, -1)
  right = pred == targets
  n = jnp.maximum(mask.sum(), 1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  # A reply's first token follows the `<user>` header, which is not a target.
  first = mask & ~jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))
  thanks = task.ids["thanks"]
  done_ok = (pred == thanks) == (targets == thanks)
  in_msg_BxLxT = jax.nn.one_hot(view.turns_BxL[:, 1:], num_messages, dtype=bool) & mask[..., None]
  has_BxT = jnp.any(in_msg_BxLxT, 1)
  wrong_BxT = jnp.any(in_msg_BxLxT & ~right[..., None], 1)
  return {"eval_loss": jnp.sum(ce * mask) / n,
          "eval_token_acc": jnp.sum(right & mask) / n,
          "eval_done_acc": jnp.sum(done_ok & first) / jnp.maximum(first.sum(), 1),
          "eval_reply_exact": jnp.sum(has_BxT & ~wrong_BxT) / jnp.maximum(has_BxT.sum(), 1)}


def train_step(model, tx, task, state: state_lib.TrainState, conv):
  new, loss, (acc, n), m = state_lib.update(state, tx,
                                            lambda p: sim_loss(model, task, p, conv))
  return new, {"loss": loss, "token_acc": acc, "target_tokens": n, **m}


# ------------------------------------------------------------------------------------------------
# Build.
# ------------------------------------------------------------------------------------------------


class Built(NamedTuple):
  task: Any
  model: transformer.Transformer
  create_fn: Callable[[], state_lib.TrainState]
  abstract: state_lib.TrainState
  data_fn: Callable  # (None, key) -> Rollout against the scripted user
  step_fn: Callable  # (state, conv) -> (state, metrics); the state is donated
  agree_fn: Callable  # (params, conv) -> teacher-forced agreement
  free_fn: Callable  # (None, sim_params, key) -> Rollout with the LM simulator


def make_simulator(config, task, model) -> simulators.LMSimulator:
  """The simulator this run trains, as rollouts use it (policy replies: answer template + eot)."""
  s = config.sampling
  cfg = sampling.SamplingConfig(max_new_tokens=task.sim.max_user_len + 1,
                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                greedy=s.greedy, stop_tokens=(task.eot_id,))
  return simulators.LMSimulator(task, model, cfg, max_len=config.max_len,
                                chunk_width=task.answer_len + 5, max_turns=config.num_turns)


def build(config, mesh, task) -> Built:
  init = run_lib.init_state(config, mesh,
                            run_lib.make_optimizer(config.optimizer, config.num_steps))
  model, tx, shardings = init.model, init.tx, init.shardings
  b = config.behaviour
  mix = BehaviourMix(task, (b.oracle, b.answer_now, b.random))
  kw = dict(batch=config.batch_size, num_turns=config.num_turns, max_len=config.max_len,
            mesh=mesh)
  data_fn = rollout_lib.make_rollout(mix, task, **kw)
  batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  step_fn = jax.jit(lambda s, c: train_step(model, tx, task, s, c),
                    in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl),
                    donate_argnums=0)
  agree_fn = jax.jit(lambda p, c: agreement(model, task, p, c, config.num_turns),
                     in_shardings=(shardings.params, batch_sh), out_shardings=repl)
  free_fn = simulators.make_lm_user_rollout(mix, make_simulator(config, task, model), **kw)
  return Built(task, model, init.create_fn, init.abstract, data_fn, step_fn, agree_fn, free_fn)


def check_config(config):
  """Every check that can fail on the config, before anything compiles. Returns (mesh, task)."""
  mcfg = run_lib.check_model(config)
  task = registry.config_task(config)
  if mcfg.vocab_size < task.vocab_size:
    raise ValueError(f"config.model.vocab_size={mcfg.vocab_size} is smaller than the "
                     f"{config.task} vocabulary ({task.vocab_size} words)")
  mesh = run_lib.check_run(config)
  run_lib.check_positive(config, ("num_steps", "num_turns", "log_every", "eval_every",
                                  "eval_batch_size"))
  run_lib.check_eval_batches(config)
  one_turn = 2 + task.request_width + 1 + task.answer_len + 2 + task.sim.max_user_len + 2
  if config.max_len < one_turn:
    raise ValueError(f"config.max_len={config.max_len} cannot hold one exchange of "
                     f"{config.task} ({one_turn} tokens)")
  view_len = config.max_len + simulators.goal_width(task)
  if mcfg.max_position_embeddings < view_len:
    raise ValueError(f"config.model.max_position_embeddings={mcfg.max_position_embeddings} < "
                     f"the simulator's view length {view_len} (max_len + goal)")
  weights = [config.behaviour[k] for k in ("oracle", "answer_now", "random")]
  if min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(f"config.behaviour weights {weights} must be >= 0 with a positive sum")
  make_simulator(config, task, None)  # SamplingConfig validates temperature, top_k, top_p
  return mesh, task


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def evaluate(b: Built, config, params, eval_key) -> dict[str, float]:
  """Agreement on held-out episodes: keys from their own branch of the seed, never trained on."""
  n = config.eval_batch_size // config.batch_size
  keys = [jax.random.fold_in(eval_key, i) for i in range(n + 1)]
  per_batch = [jax.device_get(b.agree_fn(params, b.data_fn(None, k).conv)) for k in keys[:-1]]
  out = {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}
  if config.eval_rollout:
    sim = sharding_lib.to_host(b.free_fn(None, params, keys[-1]).sim)  # rows over hosts
    turns = max(int(sim.turns_B.sum()), 1)
    out["rollout_reply_match"] = float(sim.reply_match_B.sum()) / turns
    out["rollout_done_match"] = float(sim.done_match_B.sum()) / turns
  return out


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  """Teaches the simulator the scripted user's replies for `config.num_steps` steps in `workdir`
  (resumed if it holds a checkpoint; `stop_after`: see `run.Run.steps`)."""
  mesh, task = check_config(config)
  b = build(config, mesh, task)
  run = run_lib.Run(config, workdir, b.abstract, b.create_fn, tokenizer=task.tokenizer)
  state = run.state
  history = run.baseline(lambda: evaluate(b, config, state.params, run.keys.eval))
  for step in run.steps(int(state.step), config.num_steps, stop_after, "sim_sft"):
    conv = b.data_fn(None, jax.random.fold_in(run.keys.train, step)).conv
    state, m = b.step_fn(state, conv)
    m.pop("target_tokens")  # not a metric: the loss's denominator
    history.update(run.end_step(
        step, state, m, lambda: evaluate(b, config, state.params, run.keys.eval),
        {"steps_per_s": 1}))
  run.close()
  return {"state": state, "final": history, "how": run.how}
