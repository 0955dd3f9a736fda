"""The Mediator-Assistant ("Intent Mismatch"): a model that rewrites the conversation so far into
one explicit request, in front of an assistant that is left as it is.

The mediator's job, as data: after each user turn, the explicit request is the task's request
template with every slot the user has stated so far (in the first request, in answers to
questions, in feedback or sharded reveals: `SimState.known_BxK`) and `?` for the rest, then
`<eot>`. The mediator is a `Transformer` over the task's vocabulary that reads the conversation
tokens followed by an `<assistant>` header and writes that request, the way a policy writes a
reply:

  <bos> <user> calc 3 + ? * 2 <eot> <assistant> ask n2 <eot> <user> n2 is 7 <eot> <assistant>
      -> calc 3 + 7 * 2 <eot>

`MediatorAssistant` is a rollout policy (`rollout.py`'s interface) with
`params = {"mediator": ..., "assistant": ...}`. Every turn the mediator greedily rewrites the whole
conversation (recomputed from scratch: it is short, and evaluation is not the hot path), then the
assistant answers a fresh conversation `<bos> <user> explicit request <eot> <assistant>` with its
own sampler. That reply is what the real conversation gets, so the simulator and every metric
see the pair as one policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from collab_rl import conversation as conv_lib
from collab_rl import sampling
from collab_rl.models.attention import KVCache
from collab_rl.models.transformer import Transformer
from collab_rl.tasks import slots as slots_lib
from collab_rl.tokenizer import ASSISTANT, CONTEXT, PAD

# ------------------------------------------------------------------------------------------------
# The target, and training examples cut from played conversations.
# ------------------------------------------------------------------------------------------------


def request_len(task) -> int:
  """Tokens of an explicit request, `<eot>` included: every request has the template's length."""
  return len(task.request_template) + 1


def explicit_request(task, values_BxK: jax.Array, known_BxK: jax.Array) -> jax.Array:
  """[B, request_len] the request with every known slot's value, `?` elsewhere, then `<eot>`."""
  # pylint: disable-next=protected-access
  body_BxN = task._render(task.request_template, values_BxK, ~known_BxK)
  eot_Bx1 = jnp.full((body_BxN.shape[0], 1), task.eot_id, jnp.int32)
  return jnp.concatenate([body_BxN, eot_Bx1], 1)


def examples(task, tokens_BxL, roles_BxL, cut_B, values_BxK, known_BxK, valid_B) -> dict:
  """Training rows: the conversation's first `cut_B` tokens, `<assistant>`, the explicit request.

  Returns {"tokens", "roles"} of width L + 1 + request_len, with the request as the only
  ASSISTANT tokens (the conversation's own replies become CONTEXT: the mediator reads them, it
  does not learn to write them), plus "prompt_len" (through the header), "target" and "valid".
  Rows with `valid_B` False keep their prefix but get no target, so no loss.
  """
  b, l = tokens_BxL.shape
  n = request_len(task)
  keep_BxL = jnp.arange(l)[None, :] < cut_B[:, None]
  roles_BxL = jnp.where(roles_BxL == ASSISTANT, CONTEXT, roles_BxL)
  pad = lambda x, fill: jnp.pad(jnp.where(keep_BxL, x, fill), ((0, 0), (0, 1 + n)),
                                constant_values=fill)
  conv = conv_lib.Conversation(
      tokens_BxL=pad(tokens_BxL, 0), roles_BxL=pad(roles_BxL, PAD),
      turns_BxL=pad(jnp.zeros_like(tokens_BxL), -1), cursor_B=cut_B.astype(jnp.int32),
      num_turns_B=jnp.ones((b,), jnp.int32), done_B=jnp.zeros((b,), bool),
      overflow_B=jnp.zeros((b,), bool), intent=None)
  ones_B = jnp.ones((b,), jnp.int32)
  conv = conv_lib.append(conv, jnp.full((b, 1), task.assistant_header_id), ones_B, CONTEXT)
  target_BxN = explicit_request(task, values_BxK, known_BxK)
  conv = conv_lib.append(conv, target_BxN, jnp.where(valid_B, n, 0), ASSISTANT, new_turn=False)
  return {"tokens": conv.tokens_BxL, "roles": conv.roles_BxL, "prompt_len": cut_B + 1,
          "target": target_BxN, "valid": valid_B}


def cut_examples(task, conv, intent, cuts) -> dict:
  """Every cut of a batch of conversations, flattened to rows: the opening, then after each user
  turn of a row still going. `cuts` = (cursor_TxB, known_TxBxK, done_TxB), taken after each turn."""
  cursor_TxB, known_TxBxK, done_TxB = cuts
  b = conv.batch
  opening_B = 2 + task.first_request(intent)[1]  # <bos> <user> request <eot>
  cut_CxB = jnp.concatenate([opening_B[None], cursor_TxB], 0)
  known_CxBxK = jnp.concatenate([~intent.missing_BxK[None], known_TxBxK], 0)
  valid_CxB = jnp.concatenate([jnp.ones((1, b), bool), ~done_TxB], 0)
  c = cut_CxB.shape[0]
  tile = lambda x: jnp.tile(x, (c,) + (1,) * (x.ndim - 1))  # row i of cut j at j * B + i
  flat = lambda x: x.reshape((c * b,) + x.shape[2:])
  return examples(task, tile(conv.tokens_BxL), tile(conv.roles_BxL), flat(cut_CxB),
                  tile(intent.values_BxK), flat(known_CxBxK), flat(valid_CxB))


# ------------------------------------------------------------------------------------------------
# Writing with a model from a fresh cache.
# ------------------------------------------------------------------------------------------------


def generate(model: Transformer, cfg: sampling.SamplingConfig, params, prompt_BxL, prompt_len_B,
             key, active_B=None) -> sampling.SampleOutput:
  """Prefill `prompt_len_B` tokens of each row into a fresh cache, then sample (jittable)."""
  b, l = prompt_BxL.shape
  cache = KVCache.init(model.cfg, b, l + cfg.max_new_tokens)
  return sampling.prefill_and_decode(model, cfg, params, cache, prompt_BxL, prompt_len_B,
                                     jnp.zeros((b,), jnp.int32), key, active_B)[0]


def rewrite_config(task) -> sampling.SamplingConfig:
  """The mediator writes greedily, one explicit request and its `<eot>`."""
  return sampling.SamplingConfig(max_new_tokens=request_len(task), greedy=True,
                                 stop_tokens=(task.eot_id,))


def exact_match(task, out: sampling.SampleOutput, target_BxN) -> jax.Array:
  """[B] the rewrite is the target token for token, `<eot>` included."""
  n = request_len(task)
  return (out.lengths_B == n) & jnp.all(out.tokens_BxN[:, :n] == target_BxN, 1)


# ------------------------------------------------------------------------------------------------
# The policy.
# ------------------------------------------------------------------------------------------------


class MediatorAssistant:
  """Mediator rewrites, assistant answers the rewrite alone; `params = {"mediator", "assistant"}`.

  Stateless across turns: the mediator rereads the whole conversation every turn, and the
  assistant never sees the real conversation, only the explicit request. `rewrite` and `answer`
  are the two models' parts (tests put scripted stand-ins there).
  """

  def __init__(self, task, mediator: Transformer | None, assistant: Transformer | None,
               assistant_cfg: sampling.SamplingConfig):
    self.task, self.mediator, self.assistant = task, mediator, assistant
    self.rewrite_cfg, self.assistant_cfg = rewrite_config(task), assistant_cfg

  def init(self, params, conv, prefix_width=None):
    del params, conv, prefix_width
    return ()

  def rewrite(self, params, conv, sim, active_B) -> sampling.SampleOutput:
    """The mediator's explicit request for a conversation that ends with `<assistant>`."""
    del sim  # the mediator reads the conversation only
    return generate(self.mediator, self.rewrite_cfg, params, conv.tokens_BxL, conv.cursor_B,
                    jax.random.key(0), active_B)

  def answer(self, params, fresh_BxW, fresh_len_B, key, active_B) -> sampling.SampleOutput:
    """The assistant's reply to the fresh conversation, with its own sampler."""
    return generate(self.assistant, self.assistant_cfg, params, fresh_BxW, fresh_len_B, key,
                    active_B)

  def fresh_request(self, out: sampling.SampleOutput):
    """`<bos> <user> request <eot> <assistant>` per row, and its lengths: the rewrite up to its
    `<eot>` (a rewrite that ran out of budget is closed with one)."""
    t = self.task
    b = out.tokens_BxN.shape[0]
    body_len_B = out.lengths_B - out.stopped_B.astype(jnp.int32)
    two = jnp.full((b,), 2, jnp.int32)
    head = jnp.tile(jnp.array([[t.bos_id, t.user_header_id]], jnp.int32), (b, 1))
    tail = jnp.tile(jnp.array([[t.eot_id, t.assistant_header_id]], jnp.int32), (b, 1))
    return slots_lib.pack([(head, two), (out.tokens_BxN, body_len_B), (tail, two)],
                          4 + out.tokens_BxN.shape[1])

  def __call__(self, params, conv, sim, state, key):
    active_B = ~conv.done_B
    request = self.rewrite(params["mediator"], conv, sim, active_B)
    fresh_BxW, fresh_len_B = self.fresh_request(request)
    out = self.answer(params["assistant"], fresh_BxW, fresh_len_B, key, active_B)
    return out.tokens_BxN, out.logprobs_BxN, out.lengths_B, state
