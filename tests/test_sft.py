"""SFT of the base policy: the assistant-only loss mask, the behaviour mixture, a short run that
learns the answer format, bit-identical resume, and config errors before any compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import conversation as conv_lib
from collab_rl import metrics as metrics_lib
from collab_rl import rollout as rollout_lib
from collab_rl import sft as sft_lib
from collab_rl.models import transformer as tfm
from collab_rl.tasks import registry, scoring
from collab_rl.tasks import slots as slots_lib
from collab_rl.tasks.ambig_math import AmbigMath
from collab_rl.tokenizer import ASSISTANT, CONTEXT, USER
from collab_rl.trainers import sft
from experiments import sft_base

TASK = AmbigMath()


def tiny_config(**overrides):
  c = sft_base.get_config("runlocal")
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.batch_size = 16
  c.eval_batch_size = 64
  c.num_steps = 40
  c.optimizer.warmup_steps = 5
  c.log_every = 10
  c.eval_every = 20
  c.checkpoint.every_steps = 20
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _hand_made_conversation():
  """<bos> <user> calc 3 + ? * 2 <eot> <assistant> ask n2 <eot> <user> n2 is 7 <eot>
  <assistant> answer 3 + 7 * 2 <eot>, and the role of every token written by hand."""
  tid = TASK.tokenizer.token_to_id
  pieces = [("<bos>", CONTEXT, True), ("<user>", CONTEXT, True),
            ("calc 3 + ? * 2 <eot>", USER, False), ("<assistant>", CONTEXT, True),
            ("ask n2 <eot>", ASSISTANT, False), ("<user>", CONTEXT, True),
            ("n2 is 7 <eot>", USER, False), ("<assistant>", CONTEXT, True),
            ("answer 3 + 7 * 2 <eot>", ASSISTANT, False)]
  conv = conv_lib.empty(2, 32)
  roles = []
  for text, role, new_turn in pieces:
    ids = jnp.asarray([[tid(w) for w in text.split()]] * 2, jnp.int32)
    conv = conv_lib.append(conv, ids, jnp.full((2,), ids.shape[1]), role, new_turn=new_turn)
    roles += [role] * ids.shape[1]
  expected = np.zeros((32,), bool)
  expected[:len(roles)] = np.asarray(roles) == ASSISTANT
  return conv, expected


def test_loss_mask_is_exactly_the_assistant_tokens():
  conv, expected = _hand_made_conversation()
  mask = np.asarray(sft_lib.loss_mask(conv.roles_BxL))
  assert mask[0].sum() == 3 + 7  # "ask n2 <eot>" and "answer 3 + 7 * 2 <eot>"
  np.testing.assert_array_equal(mask, np.stack([expected, expected]))
  # The loss is the mean -log p of exactly those tokens, with the whole conversation as context.
  model = tfm.Transformer(tfm.TransformerConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, heads=("lm", "value")))
  params = jax.jit(tfm.init_params, static_argnums=0)(model, jax.random.key(0))
  loss, (_, n) = jax.jit(sft_lib.sft_loss, static_argnums=0)(model, params, conv.tokens_BxL,
                                                             conv.roles_BxL)
  logits = jax.jit(model.apply)({"params": params}, conv.tokens_BxL,
                                valid_BxL=conv_lib.valid_mask(conv)).logits_BxLxV
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  toks = np.asarray(conv.tokens_BxL)
  pos = np.nonzero(expected)[0]
  want = -np.mean([logp[b, t - 1, toks[b, t]] for b in range(2) for t in pos])
  assert int(n) == 2 * len(pos)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def _conversation(texts_and_roles, width=40):
  tid = TASK.tokenizer.token_to_id
  conv = conv_lib.empty(1, width)
  for text, role in texts_and_roles:
    ids = jnp.asarray([[tid(w) for w in text.split()]], jnp.int32)
    conv = conv_lib.append(conv, ids, jnp.full((1,), ids.shape[1]), role,
                           new_turn=text not in ("<bos>", "<user>", "<assistant>"))
  return conv


def test_guess_mask_is_the_first_answers_values_of_the_missing_slots():
  """`train_guesses=False` drops from the loss exactly the values a first answer guesses: not
  the slots the request gives, not an answer after a question, not a retry after `wrong`."""
  header = lambda role: ("<assistant>" if role == ASSISTANT else "<user>", CONTEXT)
  def conv_of(turns):
    pieces = [("<bos>", CONTEXT)]
    for text, role in turns:
      pieces += [header(role), (text, role)]
    return _conversation(pieces)
  intent = TASK.sample_intents(jax.random.key(0), 1).replace(
      missing_BxK=jnp.asarray([[False, False, True, False, True]]))  # n2 and n3 missing
  guessed = conv_of([("calc 3 + ? * ? <eot>", USER), ("answer 3 + 5 * 1 <eot>", ASSISTANT),
                     ("wrong <eot>", USER), ("answer 3 + 6 * 2 <eot>", ASSISTANT)])
  mask = np.asarray(sft.guess_mask(TASK, intent, guessed.tokens_BxL, guessed.roles_BxL))[0]
  words = np.asarray(guessed.tokens_BxL)[0]
  marked = [TASK.tokenizer.decode([int(t)]) for t in words[mask]]
  assert marked == ["5", "1"] and mask.sum() == 2
  first_answer = np.nonzero(words == TASK.ids["answer"])[0][0]
  np.testing.assert_array_equal(np.nonzero(mask)[0], first_answer + np.array([3, 5]))
  asked = conv_of([("calc 3 + ? * ? <eot>", USER), ("ask n2 <eot>", ASSISTANT),
                   ("n2 is 7 <eot>", USER), ("answer 3 + 7 * 1 <eot>", ASSISTANT)])
  assert not np.asarray(sft.guess_mask(TASK, intent, asked.tokens_BxL, asked.roles_BxL)).any()


def test_mixture_asks_in_ask_share_of_conversations():
  share = 0.3
  run = rollout_lib.make_rollout(sft_lib.AskOrAnswerMix(TASK, share), TASK, batch=4096,
                                 num_turns=3, max_len=80)
  ro = jax.device_get(run(None, jax.random.key(0)))
  amb = np.asarray(ro.conv.intent.ambiguous_B)
  asked = np.asarray(ro.sim.first_action_B) == 1  # slots.ASKED
  assert abs(asked[amb].mean() - share) < 0.03  # ~2000 ambiguous rows: 3 standard errors
  assert not asked[~amb].any()  # the oracle answers a clear request at once too
  # The choice holds for the whole conversation: askers ask every missing slot and solve it,
  # answer-now rows never ask later.
  np.testing.assert_array_equal(np.asarray(ro.sim.score_B)[asked], 1.0)
  asst_asks = (ro.conv.tokens_BxL == TASK.ids["ask"]) & (ro.conv.roles_BxL == ASSISTANT)
  assert not asst_asks[~asked].any()


def test_short_run_learns_the_answer_format_and_resumes_bit_identically(tmp_path, monkeypatch):
  # The three runs share one config: compile once (build is a pure function of config and mesh).
  builds = {}
  build = sft.build
  monkeypatch.setattr(sft, "build", lambda config, mesh, task: builds.setdefault(
      config.to_json(), build(config, mesh, task)))
  config = tiny_config(**{"model.hidden_size": 64, "model.intermediate_size": 128,
                          "batch_size": 32, "optimizer.learning_rate": 1e-2, "num_steps": 60,
                          "eval_every": 30, "checkpoint.every_steps": 30})
  full = sft.train(config, str(tmp_path / "full"))
  evals = [r for r in metrics_lib.read_jsonl(str(tmp_path / "full" / "metrics.jsonl"))
           if "score" in r]
  assert [r["step"] for r in evals] == [0, 30, 60]
  assert evals[0]["well_formed"] < 0.1  # the untrained policy writes no well-formed reply
  final = full["final"]
  assert final["eval_loss"] < 0.5 * evals[0]["eval_loss"], evals
  assert final["well_formed_answer_clear"] >= 0.6, final
  assert final["answer_when_clear"] >= 0.9, final
  assert "value_head" in full["state"].params  # for the RL trainers' strict restore

  first = sft.train(config, str(tmp_path / "split"), stop_after=30)
  assert int(first["state"].step) == 30
  resumed = sft.train(config, str(tmp_path / "split"))
  assert resumed["how"] == "resumed step 30"
  assert len(builds) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(full["state"].params),
                         jax.device_get(resumed["state"].params))


def test_reactive_and_proactive_evaluations_share_one_program():
  """With instruction_share > 0 the base is evaluated as deployed and as the Proactive Base (every
  request instructed). One compiled rollout plays both, the rate an argument; its episodes are
  those of a program compiled for each task on its own, metric for metric."""
  config = tiny_config(instruction_share=0.3)
  mesh, task = sft.check_config(config)
  with jax.set_mesh(mesh):
    b = sft.build(config, mesh, task)
    params = b.create_fn().params
    policy = sft.eval_policy(config, b.model, task)

    def own_program(t):
      def episodes(params, key):
        ro = rollout_lib.rollout(policy, t, params, key, config.eval_batch_size,
                                 num_turns=config.num_turns, max_len=config.max_len, mesh=mesh)
        return {**scoring.episode_metrics(t, ro.conv, ro.sim),
                **sft.first_reply_format(t, ro.conv, ro.reply_lengths_BxT[:, 0])}
      return jax.jit(episodes)

    traced = []
    def listen(event, duration, **kwargs):
      del duration
      if event == "/jax/core/compile/jaxpr_trace_duration" and kwargs.get("fun_name") == "episodes":
        traced.append(1)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
      key = jax.random.key(4)
      shared = {prefix: jax.device_get(fn(params, key)) for prefix, fn in b.eval_fns.items()}
    finally:
      jax.monitoring.unregister_event_duration_listener(listen)
    assert sorted(shared) == ["", "proactive/"] and len(traced) == 1
    for prefix, t in [("", task), ("proactive/", registry.config_task(config, instruction_rate=1))]:
      want = jax.device_get(own_program(t)(params, key))
      assert sorted(want) == sorted(shared[prefix])
      for name in want:
        np.testing.assert_array_equal(want[name], shared[prefix][name], err_msg=prefix + name)
    # The rate reached the episodes: every Proactive request carries the word, no reactive one.
    np.testing.assert_array_equal(shared["proactive/"]["tokens_typed"],
                                  np.asarray(shared[""]["tokens_typed"]) + 1)


def test_instructed_conversations_follow_the_prompted_mixture():
  """The Proactive Base's data: instructed ambiguous requests ask in instructed_ask_share,
  instructed clear ones open with a needless question in instructed_confirm_share, and the
  uninstructed ones are the passive mixture, unchanged."""
  task = AmbigMath(slots_lib.SimConfig(instruction_rate=0.5))
  policy = sft_lib.AskOrAnswerMix(task, 0.2, instructed_ask_share=0.8,
                                  instructed_confirm_share=0.6)
  run = rollout_lib.make_rollout(policy, task, batch=4096, num_turns=3, max_len=84)
  ro = jax.device_get(run(None, jax.random.key(1)))
  amb = np.asarray(ro.conv.intent.ambiguous_B)
  ins = np.asarray(ro.conv.intent.instructed_B)
  assert abs(ins.mean() - 0.5) < 0.03
  # The opening shows the instruction exactly where it is on: `<bos> <user> clarify ...`.
  np.testing.assert_array_equal(np.asarray(ro.conv.tokens_BxL[:, 2]) == task.ids["clarify"], ins)
  asked = np.asarray(ro.sim.first_action_B) == 1  # slots.ASKED
  assert abs(asked[amb & ins].mean() - 0.8) < 0.05  # ~1000 rows each: >3 standard errors
  assert abs(asked[~amb & ins].mean() - 0.6) < 0.05
  assert abs(asked[amb & ~ins].mean() - 0.2) < 0.05
  assert not asked[~amb & ~ins].any()
  # A needless question costs a turn, not the answer: every confirming conversation is solved,
  # with exactly one irrelevant question.
  confirm = ~amb & ins & asked
  np.testing.assert_array_equal(np.asarray(ro.sim.score_B)[confirm], 1.0)
  np.testing.assert_array_equal(np.asarray(ro.sim.irrelevant_B)[confirm], 1)


@pytest.mark.parametrize("overrides, message", [
    ({"ask_share": 1.5}, "ask_share"),
    ({"ask_share": -0.1}, "ask_share"),
    ({"instruction_share": 1.5}, "instruction_share"),
    ({"instructed_confirm_share": -0.5}, "instructed_confirm_share"),
    ({"task": "chess"}, "unknown task 'chess'"),
    ({"data_source": "disk"}, "data_source"),
    ({"max_len": 40}, "max_len=40"),
    ({"model.vocab_size": 16}, "vocab_size"),
    ({"model.heads": ("value",)}, "'lm'"),
    ({"eval_batch_size": 12}, "eval_batch_size=12"),
    ({"microbatches": 3}, "config.microbatches=3 must be >= 1 and divide the 16 rows"),
])
def test_bad_config_fails_before_compiling(tmp_path, compile_counter, overrides, message):
  with compile_counter as counter, pytest.raises(ValueError, match=message):
    sft.train(tiny_config(**overrides), str(tmp_path))
  assert counter.count == 0
