"""The verifiable tasks: ideal and answer-now baselines, hand-worked metrics, the scripted user.

Every compilation is shared through the cached helpers below: on 2 CPU cores a rollout costs
seconds to compile and microseconds to run, so batches are large and compiled functions few.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import conversation as conv_lib
from collab_rl import rollout
from collab_rl.tasks import ambig_math, code_spec, doc_edit, scoring
from collab_rl.tasks import slots as slots_lib

TASKS = (ambig_math.AmbigMath, doc_edit.DocEdit, code_spec.CodeSpec)
MAX_LEN = 96
SIM_BATCH = 64


@functools.cache
def _task(cls, sim: slots_lib.SimConfig = slots_lib.SimConfig()) -> slots_lib.SlotTask:
  return cls(sim)


@functools.cache
def _oracle_run(cls):
  task = _task(cls)
  num_turns = task.sim.max_missing + 1  # one question per missing slot, then the answer
  run = rollout.make_rollout(rollout.oracle_policy(task), task, batch=256, num_turns=num_turns,
                             max_len=MAX_LEN)
  return jax.device_get(run(None, jax.random.key(0)))


@functools.cache
def _answer_now_run(cls):
  task = _task(cls)
  run = rollout.make_rollout(rollout.answer_now_policy(task), task, batch=1024, num_turns=1,
                             max_len=MAX_LEN)
  return jax.device_get(run(None, jax.random.key(1)))


@functools.cache
def _user_turn(cls, sim: slots_lib.SimConfig = slots_lib.SimConfig()):
  return jax.jit(_task(cls, sim).user_turn)


@functools.cache
def _metric(cls):
  return jax.jit(_task(cls).metric)


def _intents(cls, rows: slice) -> slots_lib.Intent:
  """Some of the oracle run's intents: sampling more would cost another compilation."""
  return jax.tree_util.tree_map(lambda x: x[rows], _oracle_run(cls).conv.intent)


def _plain_intent(values_BxK: np.ndarray) -> slots_lib.Intent:
  """An intent with nothing hidden (tasks without extra data)."""
  no = np.zeros(values_BxK.shape, bool)
  return slots_lib.Intent(values_BxK, no, no[:, 0])


def _summary(cls, ro) -> dict[str, float]:
  return scoring.summarize(scoring.episode_metrics(_task(cls), ro.conv, ro.sim))


def _text(task, toks, length) -> str:
  return task.tokenizer.decode(np.asarray(toks)[:int(length)].tolist())


task_classes = pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.name)

# ------------------------------------------------------------------------------------------------
# Baselines through the rollout.
# ------------------------------------------------------------------------------------------------


@task_classes
def test_oracle_gets_full_marks(cls):
  ro = _oracle_run(cls)
  s = _summary(cls, ro)
  assert s["score"] >= 0.95
  assert not ro.conv.overflow_B.any()
  assert ro.conv.done_B.all()  # every user said thanks
  assert s["ask_when_ambiguous"] == 1.0 and s["answer_when_clear"] == 1.0
  assert s["ask_answer_macro_f1"] == 1.0
  # Each missing slot asked exactly once, nothing irrelevant.
  np.testing.assert_array_equal(ro.sim.asked_BxK, ro.conv.intent.missing_BxK)
  assert not ro.sim.irrelevant_B.any()
  # Turns are the assistant's replies: one question per missing slot, then the answer.
  turns = scoring.episode_metrics(_task(cls), ro.conv, ro.sim)["turns"]
  np.testing.assert_array_equal(turns, ro.conv.intent.missing_BxK.sum(1) + 1)


def _chance_scores(task, intent: slots_lib.Intent, samples: int = 32) -> np.ndarray:
  """[B] expected metric of the intent with its missing slots guessed uniformly at random."""
  b, k = intent.values_BxK.shape

  @jax.jit
  def run(key):
    tiled = jax.tree_util.tree_map(lambda x: jnp.tile(x, (samples,) + (1,) * (x.ndim - 1)),
                                   intent)
    u = jax.random.uniform(key, (samples * b, k))
    guess = jnp.floor(u * jnp.asarray(task.num_values_K)).astype(jnp.int32)
    values = jnp.where(tiled.missing_BxK, guess, tiled.values_BxK)
    return task.metric(tiled, values).reshape(samples, b).mean(0)

  return np.asarray(run(jax.random.key(1234)))


@task_classes
def test_answer_now_is_at_chance_when_ambiguous(cls):
  task, ro = _task(cls), _answer_now_run(cls)
  s = _summary(cls, ro)
  amb = np.asarray(ro.conv.intent.ambiguous_B)
  score = np.asarray(ro.sim.score_B)
  assert s["score_clear"] >= 0.95
  chance = _chance_scores(task, ro.conv.intent)
  np.testing.assert_allclose(chance[~amb], 1.0, atol=1e-6)
  # Per-row guess minus per-row expectation has mean 0 at chance: 4 standard errors of slack.
  diff = score[amb] - chance[amb]
  tol = 4 * diff.std() / math.sqrt(amb.sum()) + 0.01
  assert abs(diff.mean()) < tol, (s["score_ambiguous"], chance[amb].mean(), tol)
  oracle = _summary(cls, _oracle_run(cls))
  assert s["score_ambiguous"] < oracle["score_ambiguous"] - 0.2
  # Never asks: recall of "ask" is 0, and only the answer class has a non-zero F1.
  p = amb.mean()
  assert s["ask_when_ambiguous"] == 0.0 and s["answer_when_clear"] == 1.0
  # F1(answer) = 2 clear / (2 clear + ambiguous); F1(ask) = 0.
  assert s["ask_answer_macro_f1"] == pytest.approx(0.5 * 2 * (1 - p) / (2 * (1 - p) + p))
  assert 0.3 < s["ask_answer_macro_f1"] < 0.5


@task_classes
def test_conversation_decodes(cls):
  task, ro = _task(cls), _oracle_run(cls)
  missing = np.asarray(ro.conv.intent.missing_BxK)
  row = int(np.argmax(missing.sum(1) == 1))  # an episode with exactly one slot left out
  slot = int(np.argmax(missing[row]))
  name = task.slots[slot].name
  value = task.slots[slot].values[int(ro.conv.intent.values_BxK[row, slot])]
  lines = conv_lib.decode(ro.conv, task.tokenizer, rows=[row])[0].split("\n")
  answer = _text(task, task.ideal_answer(ro.conv.intent)[row], task.answer_len)
  assert lines[0] == "<bos>"
  assert lines[1].startswith("<user> ") and " ? " in lines[1] and lines[1].endswith(" <eot>")
  assert lines[2:] == [f"<assistant> ask {name} <eot>", f"<user> {name} is {value} <eot>",
                       f"<assistant> {answer} <eot>", "<user> thanks <eot>"]


# ------------------------------------------------------------------------------------------------
# Hand-worked metrics.
# ------------------------------------------------------------------------------------------------


def _values(task, words_BxK) -> np.ndarray:
  return np.asarray([[task.slots[k].values.index(w) for k, w in enumerate(row)]
                     for row in words_BxK], np.int32)


def _set(values: np.ndarray, index, value: int) -> np.ndarray:
  out = values.copy()
  out[index] = value
  return out


def test_ambig_math_precedence():
  task = _task(ambig_math.AmbigMath)
  values = _values(task, [("2", "+", "3", "*", "4"), ("2", "*", "3", "+", "4"),
                          ("9", "-", "2", "-", "3")])
  np.testing.assert_array_equal(ambig_math.AmbigMath.evaluate(values), [14, 10, 4])
  # An equivalent expression earns full marks; an invalid one scores 0.
  intent = _plain_intent(values)
  other = _values(task, [("4", "*", "3", "+", "2"), ("9", "+", "1", "*", "1"),
                         ("9", "-", "3", "-", "2")])
  metric = _metric(ambig_math.AmbigMath)
  np.testing.assert_array_equal(metric(intent, other), [1.0, 1.0, 1.0])
  invalid = _set(other, (slice(None), 2), -1)
  np.testing.assert_array_equal(metric(intent, invalid), [0.0, 0.0, 0.0])


def test_bleu_by_hand():
  ids = lambda rows, n: np.asarray([r + [0] * (n - len(r)) for r in rows], np.int32)
  bleu = jax.jit(doc_edit.bleu)
  hyp = ids([[1, 2, 3, 4, 5], [1, 1, 1, 1], [1, 2, 3, 4, 5, 6]], 6)
  ref = ids([[1, 2, 3, 6, 5, 7], [1, 2], [1, 2, 3, 4, 5, 6]], 6)
  got = bleu(hyp, np.array([5, 4, 6]), ref, np.array([6, 2, 6]))
  # Row 0: unigrams 4/5; bigrams 2/4 -> (2+1)/(4+1); trigrams 1/3 -> 2/4; 4-grams 0/2 -> 1/3;
  # shorter than the reference: BP = exp(1 - 6/5).
  row0 = math.exp(1 - 6 / 5) * (4 / 5 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
  # Row 1: "1" is clipped to its one occurrence in the reference: 1/4; bigrams 0/3 -> 1/4;
  # trigrams 0/2 -> 1/3; 4-grams 0/1 -> 1/2; longer than the reference: no penalty.
  row1 = (1 / 4 * 1 / 4 * 1 / 3 * 1 / 2) ** 0.25
  np.testing.assert_allclose(got, [row0, row1, 1.0], rtol=1e-5)
  assert float(got[2]) == 1.0  # exact, so the user's full-marks test passes
  # No shared word: 0, whatever the smoothing of the higher orders.
  zero = bleu(ids([[3, 4]], 2), np.array([2]), ids([[1, 2]], 2), np.array([2]))
  assert float(zero[0]) == 0.0
  # Shorter than the higher orders: their smoothed precision is (0 + 1) / (0 + 1).
  one = bleu(ids([[5]], 1), np.array([1]), ids([[5]], 1), np.array([1]))
  assert float(one[0]) == 1.0


def test_doc_edit_metric_by_hand():
  task = _task(doc_edit.DocEdit)
  want = ("sports", "formal", "short", "music", "casual", "long", "food", "funny", "short")
  wrong_tone2 = want[:4] + ("serious",) + want[5:]
  values = _values(task, [want, wrong_tone2, want])
  intent = _plain_intent(np.tile(values[:1], (3, 1)))
  got = _metric(doc_edit.DocEdit)(intent, _set(values, (2, 0), -1))
  # The 5th of 9 words is wrong: it breaks 2 of 8 bigrams, 3 of 7 trigrams, 4 of 6 4-grams.
  one_wrong = (8 / 9 * (6 + 1) / (8 + 1) * (4 + 1) / (7 + 1) * (2 + 1) / (6 + 1)) ** 0.25
  np.testing.assert_allclose(got, [1.0, one_wrong, 0.0], rtol=1e-5)
  assert 0.65 < one_wrong < 0.66


def test_doc_edit_topics_are_distinct():
  values = np.asarray(_answer_now_run(doc_edit.DocEdit).conv.intent.values_BxK)
  topics = values[:, doc_edit.TOPIC_COLS]
  assert all(len(set(row)) == doc_edit.NUM_SECTIONS for row in topics.tolist())
  # Each section's topic stays uniform over the topics.
  counts = np.stack([np.bincount(topics[:, s], minlength=6) for s in range(3)])
  np.testing.assert_allclose(counts / len(values), 1 / 6, atol=0.05)


def test_code_spec_interpreter_by_hand():
  task = _task(code_spec.CodeSpec)
  programs = _values(task, [("gt", "2", "mul", "2", "desc", "3"),
                            ("lt", "5", "sub", "3", "asc", "5"),
                            ("eq", "7", "add", "1", "asc", "2"),
                            ("ne", "5", "add", "0", "asc", "4")])
  inputs = np.tile(np.asarray([[[3, 8, 1, 5, 9, 0, 5, 2]]], np.int32), (4, 1, 1))
  out, length = jax.jit(code_spec.run_program)(programs, inputs)
  # gt 2 keeps 3 8 5 9 5 -> *2: 6 16 10 18 10 -> desc: 18 16 10 10 6 -> take 3.
  # lt 5 keeps 3 1 0 2 -> -3: 0 -2 -3 -1 -> asc: -3 -2 -1 0 -> take 5 of 4 kept.
  # eq 7 keeps nothing. ne 5 keeps 3 8 1 9 0 2 -> asc: 0 1 2 3 -> take 4.
  np.testing.assert_array_equal(length[:, 0], [3, 4, 0, 4])
  np.testing.assert_array_equal(out[:, 0], [[18, 16, 10, 0, 0, 0, 0, 0],
                                            [-3, -2, -1, 0, 0, 0, 0, 0],
                                            [0] * 8,
                                            [0, 1, 2, 3, 0, 0, 0, 0]])


def test_code_spec_pass_rate():
  task, metric = _task(code_spec.CodeSpec), _metric(code_spec.CodeSpec)
  intent = _intents(code_spec.CodeSpec, slice(None))
  tests = np.asarray(intent.extra)
  assert tests.shape == (256, code_spec.NUM_TESTS, code_spec.TEST_LEN)
  assert all(set(row.ravel().tolist()) == set(range(10)) for row in tests)  # every digit
  _, length = jax.jit(code_spec.run_program)(intent.values_BxK, tests)
  assert (np.asarray(length).max(1) > 0).all()  # every filter keeps an item somewhere
  program = _values(task, [("gt", "4", "mul", "1", "asc", "3")] * 256)
  intent = intent.replace(values_BxK=program)
  same = _values(task, [("gt", "4", "add", "0", "asc", "3")] * 256)  # an equivalent map
  np.testing.assert_array_equal(metric(intent, same), 1.0)
  # gt 5 instead of gt 4 drops the 5s, the smallest kept values: it fails exactly the tests
  # that hold a 5, and the tests cover every digit, so some fail.
  off = _values(task, [("gt", "5", "mul", "1", "asc", "3")] * 256)
  by_hand = np.mean(~(tests == 5).any(-1), 1)
  score = np.asarray(metric(intent, off))
  np.testing.assert_allclose(score, by_hand)
  assert 0.0 < score.mean() < 1.0
  assert float(metric(intent, _set(off, (slice(None), 5), -1)).max()) == 0.0


# ------------------------------------------------------------------------------------------------
# The scripted user.
# ------------------------------------------------------------------------------------------------


def _ask(task, slot: int) -> tuple[np.ndarray, np.ndarray]:
  """`ask <slot name> <eot>` on every row, padded to the answer's width."""
  toks = np.zeros((SIM_BATCH, task.answer_len + 1), np.int32)
  toks[:, :3] = [task.ids["ask"], task.name_ids_K[slot], task.eot_id]
  return toks, np.full((SIM_BATCH,), 3, np.int32)


def _answer(task, values_BxK) -> tuple[np.ndarray, np.ndarray]:
  """`answer ... <eot>` spelling the given values."""
  values = np.asarray(values_BxK)
  cols = [np.full(len(values), task.tokenizer.token_to_id(w)) if isinstance(w, str)
          else task.value_ids_KxM[w, values[:, w]] for w in task.answer_template]
  toks = np.stack(cols + [np.full(len(values), task.eot_id)], 1).astype(np.int32)
  return toks, np.full((len(values),), task.answer_len + 1, np.int32)


def _ambiguous_intent(cls, part: int) -> slots_lib.Intent:
  intent = _intents(cls, slice(part * SIM_BATCH, (part + 1) * SIM_BATCH))
  # Every episode misses slots 0 and 2 (a fixed pattern keeps the expected replies simple).
  missing = np.zeros(intent.missing_BxK.shape, bool)
  missing[:, [0, 2]] = True
  return intent.replace(missing_BxK=missing, ambiguous_B=np.ones(SIM_BATCH, bool))


def _reveal_text(task, intent, row: int, slot: int) -> str:
  s = task.slots[slot]
  return f"{s.name} is {s.values[int(intent.values_BxK[row, slot])]}"


@task_classes
def test_user_answers_questions_and_judges_answers(cls):
  task = _task(cls)
  intent = _ambiguous_intent(cls, 0)
  sim = task.init_sim(intent)
  # Rows take turns: ask a missing slot, ask a given one, the right answer, every slot off by
  # one, the last slot off by one (partial credit for BLEU and pass rates).
  kind = np.arange(SIM_BATCH) % 5
  ask_missing, n_ask = _ask(task, 2)
  ask_known, _ = _ask(task, 1)
  all_off = (intent.values_BxK + 1) % task.num_values_K
  last_off = np.concatenate([intent.values_BxK[:, :-1], all_off[:, -1:]], 1)
  answer_values = intent.values_BxK.copy()
  answer_values[kind == 3] = all_off[kind == 3]
  answer_values[kind == 4] = last_off[kind == 4]
  answer, n_ans = _answer(task, answer_values)
  reply = np.select([kind[:, None] == 0, kind[:, None] == 1], [ask_missing, ask_known], answer)
  lengths = np.where(kind < 2, n_ask, n_ans)
  toks, lens, done, new = _user_turn(cls)(intent, sim, reply, lengths, jax.random.key(0))
  score = np.asarray(_metric(cls)(intent, answer_values))
  assert (score[kind == 3] < 1).mean() > 0.9  # shifted answers really are wrong
  if cls is not ambig_math.AmbigMath:
    assert ((score > 0) & (score < 1))[kind >= 3].any()
  for r in range(SIM_BATCH):
    text = _text(task, toks[r], lens[r])
    if kind[r] == 0:
      assert text == _reveal_text(task, intent, r, 2) + " <eot>"
    elif kind[r] == 1:
      assert text == "known <eot>"
    elif score[r] >= 1:
      assert text == "thanks <eot>" and done[r]
    else:  # partial credit is not enough to end the chat
      assert text == "wrong <eot>" and not done[r]
  assert (score[kind == 2] == 1).all()
  np.testing.assert_array_equal(new.known_BxK[:, 2], kind == 0)  # only what was told
  np.testing.assert_array_equal(new.asked_BxK[:, 2], kind == 0)
  np.testing.assert_array_equal(new.irrelevant_B, kind == 1)
  np.testing.assert_array_equal(new.answers_B, kind >= 2)
  np.testing.assert_array_equal(done, (kind >= 2) & (score >= 1))
  np.testing.assert_allclose(new.score_B, np.where(kind >= 2, score, 0.0))


def test_vague_user_and_revealing_feedback():
  """noise_vague = 1 turns every answer to a question into `unclear`; a wrong answer's feedback
  reveals the next slot nobody has told yet (slot 0 here)."""
  cls = ambig_math.AmbigMath
  config = slots_lib.SimConfig(noise_vague=1.0, feedback_reveals=True)
  task = _task(cls, config)
  intent = _ambiguous_intent(cls, 1)
  sim = task.init_sim(intent)
  ask, n_ask = _ask(task, 2)
  wrong, n_ans = _answer(task, np.zeros_like(intent.values_BxK))  # 0 + 0 + 0
  is_ask = np.arange(SIM_BATCH) % 2 == 0
  value = np.asarray(jax.jit(ambig_math.AmbigMath.evaluate)(intent.values_BxK))
  reply = np.where(is_ask[:, None], ask, wrong)
  toks, lens, done, new = _user_turn(cls, config)(intent, sim, reply,
                                                  np.where(is_ask, n_ask, n_ans),
                                                  jax.random.key(0))
  for r in range(SIM_BATCH):
    text = _text(task, toks[r], lens[r])
    if is_ask[r]:
      assert text == "unclear <eot>"
    elif value[r] != 0:
      assert text == f"wrong {_reveal_text(task, intent, r, 0)} <eot>"
  assert not np.asarray(new.known_BxK)[is_ask][:, [0, 2]].any()
  np.testing.assert_array_equal(new.known_BxK[:, 0], ~is_ask & (value != 0))
  assert not done[is_ask].any()


def test_sharded_user_reveals_one_slot_per_turn():
  cls = ambig_math.AmbigMath
  config = slots_lib.SimConfig(sharded=True)
  task = _task(cls, config)
  intent = _ambiguous_intent(cls, 2)
  sim = task.init_sim(intent)
  user_turn = _user_turn(cls, config)
  ask_known, n_ask = _ask(task, 1)  # never helps: slot 1 is given
  for shard in (0, 2):  # the missing slots, in order
    toks, lens, done, sim = user_turn(intent, sim, ask_known, n_ask, jax.random.key(shard))
    for r in range(SIM_BATCH):
      assert _text(task, toks[r], lens[r]) == (
          f"known also {_reveal_text(task, intent, r, shard)} <eot>")
    assert not done.any()
  assert np.asarray(sim.known_BxK).all()
  assert not np.asarray(sim.asked_BxK).any()  # revealed, not asked
  right, n_ans = _answer(task, intent.values_BxK)
  toks, lens, done, sim = user_turn(intent, sim, right, n_ans, jax.random.key(9))
  assert done.all() and _text(task, toks[0], lens[0]) == "thanks <eot>"


@pytest.mark.parametrize("cls", TASKS)
def test_instruction_opens_the_request_where_it_is_on(cls):
  """`clarify` precedes the request in the instructed episodes only; the episodes themselves
  (values, missing slots) are those of the task without the instruction."""
  plain, prompted = cls(), cls(slots_lib.SimConfig(instruction_rate=0.5))
  key = jax.random.key(3)
  a, b = plain.sample_intents(key, 512), prompted.sample_intents(key, 512)
  np.testing.assert_array_equal(a.values_BxK, b.values_BxK)
  np.testing.assert_array_equal(a.missing_BxK, b.missing_BxK)
  on = np.asarray(b.instructed_B)
  assert 0.4 < on.mean() < 0.6 and not np.asarray(a.instructed_B).any()
  req, n = plain.first_request(a)
  req_p, n_p = prompted.first_request(b)
  assert prompted.request_width == plain.request_width + 1 == req_p.shape[1] - 1
  np.testing.assert_array_equal(n_p, n + on)
  np.testing.assert_array_equal(req_p[on, 0], prompted.ids["clarify"])
  np.testing.assert_array_equal(req_p[on, 1:], req[on])
  np.testing.assert_array_equal(req_p[~on, :-1], req[~on])  # then one column of padding
  assert "clarify" in _text(prompted, req_p[int(np.argmax(on))], n_p[int(np.argmax(on))])
  with pytest.raises(ValueError, match="instruction_rate=1.5"):
    cls(slots_lib.SimConfig(instruction_rate=1.5))


def test_a_traced_instruction_rate_draws_what_the_simulators_rate_draws():
  """One compiled sampler serves every rate (the base's reactive and Proactive evaluations):
  at a traced rate r the intents are bit for bit those of a simulator whose rate is r."""
  prompted = ambig_math.AmbigMath(slots_lib.SimConfig(instruction_rate=1.0))
  draw = jax.jit(lambda key, rate: prompted.sample_intents(key, 256, rate))
  key = jax.random.key(5)
  for rate in (0.0, 0.3, 1.0):
    want = ambig_math.AmbigMath(slots_lib.SimConfig(instruction_rate=rate)).sample_intents(
        key, 256)
    got = draw(key, np.float32(rate))
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="instruction_rate is above 0"):
    ambig_math.AmbigMath().sample_intents(key, 4, 0.5)  # no room for the word in its requests
