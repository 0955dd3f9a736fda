"""Supervised fine-tuning on played conversations: the behaviour that writes the data and the loss.

The SFT base (`trainers/sft.py`) and the mediator (`trainers/mediator.py`) both train on episodes
played on device by `AskOrAnswerMix` against the task's scripted user, with the next-token loss on
the assistant's tokens only; every token before them is context, the `<assistant>` headers and
the user's turns included:

    L = - sum_{b,t} m_bt log p(x_bt | x_b,<t) / sum_{b,t} m_bt,   m_bt = [role_bt == ASSISTANT]
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from collab_rl import losses
from collab_rl import rollout as rollout_lib
from collab_rl import train_state as state_lib
from collab_rl.models import lora as lora_lib
from collab_rl.tokenizer import ASSISTANT, PAD

# ------------------------------------------------------------------------------------------------
# Behaviour: oracle or answer-now, one choice per conversation.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class MixState:
  ask_B: jax.Array  # bool: this conversation follows the oracle
  chosen: jax.Array  # bool scalar: the choice has been drawn (on the first turn)


class AskOrAnswerMix:
  """A scripted policy: per conversation, the oracle with probability `ask_share`, else
  answer-now. The choice is drawn from the first turn's key and kept in the policy state, so a
  conversation that opened with a question goes on asking until it can answer right.

  Conversations that carry the `clarify` instruction (`intent.instructed_B`) draw with
  `instructed_ask_share` instead, and when the request is clear open with a needless question
  about a given slot in `instructed_confirm_share` of them, then answer (the oracle)."""

  def __init__(self, task, ask_share: float, instructed_ask_share: float = 0.0,
               instructed_confirm_share: float = 0.0, context_ask_share: float = 0.0):
    self.task = task
    self.ask_share = float(ask_share)
    self.instructed_ask_share = float(instructed_ask_share)
    self.instructed_confirm_share = float(instructed_confirm_share)
    self.context_ask_share = float(context_ask_share)
    self.oracle = rollout_lib.oracle_policy(task)
    self.answer_now = rollout_lib.answer_now_policy(task)
    self.plan = None  # planned(): the behaviour of every row, drawn before the rollout

  def init(self, params, conv, prefix_width=None) -> MixState:
    del params, prefix_width
    return MixState(jnp.zeros((conv.batch,), bool), jnp.zeros((), bool))

  def choose(self, key, intent) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B] follow the oracle, [B] open with a needless question (clear, instructed rows), [B]
    the oracle's questions are context (rows that would otherwise answer at once)."""
    b = intent.values_BxK.shape[0]
    u_Bx3 = jax.random.uniform(key, (b, 3))
    instructed_B = (jnp.zeros((b,), bool) if intent.instructed_B is None
                    else intent.instructed_B)
    share_B = jnp.where(instructed_B, self.instructed_ask_share, self.ask_share)
    confirm_B = instructed_B & ~intent.ambiguous_B & (u_Bx3[:, 1] < self.instructed_confirm_share)
    # Context rows are drawn from every ambiguous row alike, asking or not, so that the first
    # replies the loss sees still ask in `share_B` of them: the base stays as passive as before.
    # Their own stream: the draws above stay what they were without them.
    u_ctx_B = jax.random.uniform(jax.random.fold_in(key, 2), (b,))
    context_B = intent.ambiguous_B & ~confirm_B & (u_ctx_B < self.context_ask_share)
    return u_Bx3[:, 0] < share_B, confirm_B, context_B

  def planned(self, plan: tuple[jax.Array, jax.Array, jax.Array]) -> "AskOrAnswerMix":
    """This mixture with every row's behaviour fixed (`choose`'s output), so that the caller
    knows which rows' questions are context."""
    out = AskOrAnswerMix(self.task, self.ask_share, self.instructed_ask_share,
                         self.instructed_confirm_share, self.context_ask_share)
    out.plan = plan
    return out

  def __call__(self, params, conv, sim, state: MixState, key):
    k_pick, k_guess = jax.random.split(key)
    b = conv.batch
    ask_now_B, confirm_B, context_B = (self.choose(k_pick, conv.intent) if self.plan is None
                                       else self.plan)
    ask_now_B = ask_now_B | context_B
    confirm_B = confirm_B & ~state.chosen  # only the first reply
    # A confirming conversation is answered right after the question: the oracle's part.
    ask_B = jnp.where(state.chosen, state.ask_B, ask_now_B | confirm_B)
    ask_toks, _, ask_len, _ = self.oracle(params, conv, sim, (), key)
    now_toks, _, now_len, _ = self.answer_now(params, conv, sim, (), k_guess)
    slot_B = jax.random.randint(jax.random.fold_in(k_pick, 1), (b,), 0, len(self.task.slots))
    confirm_toks = jnp.stack([jnp.full((b,), self.task.ids["ask"]),
                              jnp.asarray(self.task.name_ids_K)[slot_B],
                              jnp.full((b,), self.task.eot_id)], 1)
    n = max(ask_toks.shape[1], now_toks.shape[1])
    pad = lambda t: jnp.pad(t, ((0, 0), (0, n - t.shape[1])))
    toks = jnp.where(ask_B[:, None], pad(ask_toks), pad(now_toks))
    toks = jnp.where(confirm_B[:, None], pad(confirm_toks), toks).astype(jnp.int32)
    lengths = jnp.where(ask_B, ask_len, now_len)
    lengths = jnp.where(confirm_B, 3, lengths).astype(jnp.int32)
    return toks, jnp.zeros(toks.shape, jnp.float32), lengths, MixState(ask_B, jnp.ones((), bool))


# ------------------------------------------------------------------------------------------------
# Loss and step.
# ------------------------------------------------------------------------------------------------


def loss_mask(roles_BxL: jax.Array) -> jax.Array:
  """[B, L] the tokens the loss trains: the assistant's own (headers and padding excluded)."""
  return roles_BxL == ASSISTANT


def sft_loss(model, params, tokens_BxL, roles_BxL, key=None):
  """Mean -log p of the assistant tokens given everything before them; aux (accuracy, count).
  `key`: the step's dropout key (LoRA dropout: models/lora.py)."""
  valid_BxL = roles_BxL != PAD
  logits_BxLxV = model.apply({"params": params}, tokens_BxL, valid_BxL=valid_BxL,
                             heads=("lm",), rngs=lora_lib.dropout_rngs(key)).logits_BxLxV
  logp_BxL = losses.token_logprobs(logits_BxLxV, tokens_BxL)
  mask_BxL = loss_mask(roles_BxL)
  pred_BxL = jnp.pad(jnp.argmax(logits_BxLxV[:, :-1], -1), ((0, 0), (1, 0)))
  acc = losses.masked_mean((pred_BxL == tokens_BxL).astype(jnp.float32), mask_BxL)
  return -losses.masked_mean(logp_BxL, mask_BxL), (acc, mask_BxL.sum())


def train_step(model, tx, state: state_lib.TrainState, batch, microbatches: int = 1):
  """One AdamW step; with `microbatches` > 1 the gradient is accumulated over slices of the
  batch weighted by their assistant tokens, i.e. the same mean over all of them."""
  new, loss, (acc, _), m = state_lib.update(
      state, tx, lambda p, b, key=None: sft_loss(model, p, b["tokens"], b["roles"], key), batch,
      microbatches, weight_fn=lambda b: loss_mask(b["roles"]).sum(),
      dropout=lora_lib.uses_dropout(model))
  n = loss_mask(batch["roles"]).sum()
  return new, {"loss": loss, "token_acc": acc, "assistant_tokens": n, **m}
