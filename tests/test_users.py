"""Users drawn per episode (tasks/users.py), rejected answers counted by the scripted user, the
answer-now baseline that does not repeat itself, and the SFT data whose questions are context."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from collab_rl import rollout
from collab_rl import sft as sft_lib
from collab_rl.tasks import ambig_math, scoring, users
from collab_rl.tasks import slots as slots_lib
from collab_rl.tokenizer import ASSISTANT, CONTEXT, USER
from collab_rl.trainers import sft


def test_named_users_and_mixture_parsing():
  assert users.overrides("amb0.2") == {"ambiguous_rate": 0.2}
  assert users.overrides("missing3") == {"min_missing": 3, "max_missing": 3}
  assert users.parse_mixture("reactive:3,sharded") == (("reactive", 0.75), ("sharded", 0.25))
  with pytest.raises(ValueError, match="unknown user 'shy'"):
    users.parse_mixture("reactive,shy")
  with pytest.raises(ValueError, match="must be positive"):
    users.parse_mixture("reactive:0")
  with pytest.raises(ValueError, match="is not a number"):
    users.parse_mixture("reactive:x")
  with pytest.raises(ValueError, match="max_missing <= 5 slots"):
    ambig_math.AmbigMath(slots_lib.SimConfig(mixture="missing6"))


def test_mixture_draws_each_episodes_user_at_its_weight():
  task = ambig_math.AmbigMath(slots_lib.SimConfig(mixture="reactive:3,sharded,amb1.0"))
  intent = jax.jit(lambda k: task.sample_intents(k, 8192))(jax.random.key(0))
  comp = np.asarray(intent.user.component_B)
  np.testing.assert_allclose(np.bincount(comp, minlength=3) / len(comp), [0.6, 0.2, 0.2],
                             atol=0.02)
  np.testing.assert_array_equal(np.asarray(intent.user.sharded_B), comp == 1)
  amb = np.asarray(intent.ambiguous_B)
  assert amb[comp == 2].all()  # amb1.0: every request of that user is ambiguous
  assert abs(amb[comp == 0].mean() - 0.5) < 0.03
  # Sharded rows reveal a piece unasked, the others never do.
  run = rollout.make_rollout(rollout.answer_now_policy(task), task, batch=512, num_turns=2,
                             max_len=64)
  ro = jax.device_get(run(None, jax.random.key(1)))
  also = np.any((ro.conv.tokens_BxL == task.ids["also"]) & (ro.conv.roles_BxL == USER), 1)
  sharded = np.asarray(ro.conv.intent.user.sharded_B)
  assert also[sharded & np.asarray(ro.conv.intent.ambiguous_B)].mean() > 0.5
  assert not also[~sharded].any()


def test_user_counts_answers_that_repeat_a_rejected_one():
  task = ambig_math.AmbigMath()
  intent = slots_lib.Intent(jnp.array([[3, 0, 7, 1, 2]]), jnp.zeros((1, 5), bool),
                            jnp.zeros((1,), bool))
  sim = task.init_sim(intent)

  def say(words):
    ids = [task.tokenizer.token_to_id(w) for w in words.split()] + [task.eot_id]
    return jnp.array([ids + [0] * (8 - len(ids))]), jnp.array([len(ids)])

  key = jax.random.key(0)
  repeats = []
  for words in ("answer 1 + 1 + 1", "answer 2 + 1 + 1", "answer 1 + 1 + 1", "answer 1 + 1 + 1",
                "answer 2 + 1 + 1", "answer 3 + 7 - 2"):
    _, _, done, sim = task.user_turn(intent, sim, *say(words), key)
    repeats.append(int(sim.repeats_B[0]))
  # The third, fourth and fifth answers repeat rejected ones; the right one ends the chat.
  assert repeats == [0, 0, 1, 2, 3, 3] and bool(done[0])


def test_answer_now_never_repeats_the_answer_just_rejected():
  task = ambig_math.AmbigMath()
  run = rollout.make_rollout(rollout.answer_now_policy(task), task, batch=1024, num_turns=3,
                             max_len=64)
  ro = jax.device_get(run(None, jax.random.key(0)))
  m = scoring.episode_metrics(task, ro.conv, ro.sim)
  # Three answers of a shifted guess never meet an earlier one (every slot has >= 3 values).
  assert int(np.sum(m["repeats_rejected"])) == 0
  amb = np.asarray(ro.conv.intent.ambiguous_B)
  assert np.asarray(m["score"])[amb].mean() > 0.3  # the search finds some of them


def test_context_questions_are_not_trained_and_the_base_stays_as_passive():
  task = ambig_math.AmbigMath()
  config = ml_collections.ConfigDict(dict(
      ask_share=0.3, instructed_ask_share=0.0, instructed_confirm_share=0.0,
      context_ask_share=0.5, batch_size=4096, num_turns=3, max_len=80))
  policy = sft_lib.AskOrAnswerMix(task, 0.3, context_ask_share=0.5)
  ro, roles = jax.device_get(jax.jit(lambda k: sft.behaviour_rollout(policy, task, config, k))(
      jax.random.key(0)))
  toks = np.asarray(ro.conv.tokens_BxL)
  amb = np.asarray(ro.conv.intent.ambiguous_B)
  context_row = np.any(roles != ro.conv.roles_BxL, 1)
  assert abs(context_row[amb].mean() - 0.5) < 0.03 and not context_row[~amb].any()
  # Context rows: every question is context, every answer is trained and right.
  assert not np.any((roles == ASSISTANT) & (toks == task.ids["ask"]) & context_row[:, None])
  assert np.any((roles == CONTEXT) & (toks == task.ids["ask"]), 1)[context_row].all()
  np.testing.assert_array_equal(np.asarray(ro.sim.score_B)[context_row], 1.0)
  # The first replies the loss trains still ask in ask_share of the ambiguous requests.
  trained = amb & ~context_row
  asked = np.asarray(ro.sim.first_action_B) == slots_lib.ASKED
  assert abs(asked[trained].mean() - 0.3) < 0.04
