"""The Mediator-Assistant: the explicit-request target on hand-made turns, the cuts of a played
conversation, the pair's plumbing with scripted stand-ins, a short mediator run that learns,
config errors before compiling, and evaluate's rows for a mediator run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import checkpoint as ckpt_lib
from collab_rl import conversation as conv_lib
from collab_rl import evaluate
from collab_rl import mediator
from collab_rl import metrics as metrics_lib
from collab_rl import restore as restore_lib
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl.models import transformer
from collab_rl.tasks import scoring, slots
from collab_rl.tasks.ambig_math import AmbigMath
from collab_rl.tokenizer import ASSISTANT
from collab_rl.trainers import mediator as mediator_trainer
from experiments import collab_arms

REACTIVE, SHARDED = AmbigMath(slots.SimConfig()), AmbigMath(slots.SimConfig(sharded=True))
TOK = REACTIVE.tokenizer


def _ids(text: str, b: int = 1):
  return jnp.asarray([[TOK.token_to_id(w) for w in text.split()]] * b, jnp.int32)


def _text(ids) -> str:
  return TOK.decode([int(i) for i in np.asarray(ids)])


def _intent(values, missing, b: int = 1):
  values = jnp.asarray([values] * b, jnp.int32)
  missing = jnp.asarray([missing] * b, bool)
  return slots.Intent(values, missing, jnp.any(missing, 1))


# 3 + 7 * 2 (op values: + 0, - 1, * 2).
VALUES = (3, 0, 7, 2, 2)
N2_MISSING = (False, False, True, False, False)


# (missing slots, the policy's reply, what the user says, the explicit request after it).
CASES = {
    REACTIVE: [
        # The answer to a question.
        (N2_MISSING, "ask n2 <eot>", "n2 is 7", "calc 3 + 7 * 2"),
        # Nothing new: the request stays as vague as it was.
        (N2_MISSING, "answer 3 + 5 * 2 <eot>", "wrong", "calc 3 + ? * 2"),
    ],
    SHARDED: [
        # A wrong answer, and the user reveals the missing slot unasked.
        (N2_MISSING, "answer 3 + 5 * 2 <eot>", "wrong also n2 is 7", "calc 3 + 7 * 2"),
        # Two missing: one reveal per turn.
        ((False, False, True, False, True), "ask n1 <eot>", "known also n2 is 7",
         "calc 3 + 7 * ?"),
    ],
}


@pytest.mark.parametrize("task", [REACTIVE, SHARDED], ids=["reactive", "sharded"])
def test_explicit_request_holds_what_the_user_has_said(task):
  cases = CASES[task]
  values = jnp.asarray([VALUES] * len(cases), jnp.int32)
  missing = jnp.asarray([c[0] for c in cases], bool)
  intent = slots.Intent(values, missing, jnp.any(missing, 1))
  width = max(len(c[1].split()) for c in cases)
  replies = jnp.concatenate([jnp.pad(_ids(c[1]), ((0, 0), (0, width - len(c[1].split()))))
                             for c in cases])
  lengths = jnp.asarray([len(c[1].split()) for c in cases])
  opening = mediator.explicit_request(task, values, ~missing)
  user, user_len, _, sim = jax.jit(task.user_turn)(intent, task.init_sim(intent), replies,
                                                   lengths, jax.random.key(0))
  after = mediator.explicit_request(task, values, sim.known_BxK)
  for i, (_, _, said, target) in enumerate(cases):
    # The opening: the first request itself.
    assert _text(opening[i]) == _text(task.first_request(intent)[0][i])
    assert _text(user[i, :int(user_len[i]) - 1]) == said
    assert _text(after[i]) == target + " <eot>"


def test_cuts_of_a_played_conversation():
  """The oracle asks for n2 and answers: two cuts with a target, the third after `thanks`."""
  task, b = REACTIVE, 8
  intent = _intent(VALUES, N2_MISSING, b)
  @jax.jit
  def cuts(intent):
    ro = rollout_lib.rollout(rollout_lib.oracle_policy(task), task, None, jax.random.key(0), b,
                             num_turns=3, max_len=rollout_lib.conversation_len(task, 3, 7),
                             intent=intent, watch=mediator_trainer.watch_cuts)
    return mediator.cut_examples(task, ro.conv, intent, ro.watched)

  rows = cuts(intent)
  assert rows["tokens"].shape[0] == 4 * b  # the opening and one cut per turn, cut-major
  np.testing.assert_array_equal(rows["valid"][::b], [True, True, False, False])
  want = ["<bos> <user> calc 3 + ? * 2 <eot> <assistant> calc 3 + ? * 2 <eot>",
          "<bos> <user> calc 3 + ? * 2 <eot> <assistant> ask n2 <eot> <user> n2 is 7 <eot> "
          "<assistant> calc 3 + 7 * 2 <eot>"]
  for c, text in enumerate(want):
    r = c * b
    toks, roles = np.asarray(rows["tokens"][r]), np.asarray(rows["roles"][r])
    n = int(np.sum(roles != 0))
    assert _text(toks[:n]) == text
    # The loss trains the rewrite only; the conversation's own reply is context.
    assert _text(toks[roles == ASSISTANT]) == text.split("<assistant> ")[-1]
    assert int(rows["prompt_len"][r]) == n - mediator.request_len(task)
  assert not np.any(np.asarray(rows["roles"][2 * b:]) == ASSISTANT)  # no target after thanks


def test_fresh_request_is_the_rewrite_alone():
  pair = mediator.MediatorAssistant(REACTIVE, None, None, None)
  done = sampling.SampleOutput(_ids("calc 3 + 7 * 2 <eot>"), jnp.zeros((1, 7)), jnp.array([7]),
                               jnp.array([True]))
  fresh, n = pair.fresh_request(done)
  assert _text(fresh[0, :int(n[0])]) == "<bos> <user> calc 3 + 7 * 2 <eot> <assistant>"
  cut = done.replace(tokens_BxN=_ids("calc 3 + 7 * 2 2"), stopped_B=jnp.array([False]))
  fresh, n = pair.fresh_request(cut)  # out of budget: closed with an <eot> all the same
  assert _text(fresh[0, :int(n[0])]) == "<bos> <user> calc 3 + 7 * 2 2 <eot> <assistant>"


class _Scripted(mediator.MediatorAssistant):
  """In the first half of the rows a perfect mediator (the target, from the simulator), in the
  second one that forgets everything after the first request; an assistant that reads the fresh
  conversation only: it answers the request when it is complete, else asks for its first `?`."""

  def __init__(self, task):
    super().__init__(task, None, None, None)

  def rewrite(self, params, conv, sim, active_B):
    perfect_B = jnp.arange(conv.batch) < conv.batch // 2
    known = jnp.where(perfect_B[:, None], sim.known_BxK, ~conv.intent.missing_BxK)
    toks = mediator.explicit_request(self.task, conv.intent.values_BxK, known)
    b, n = toks.shape
    return sampling.SampleOutput(toks, jnp.zeros((b, n)), jnp.full((b,), n), active_B)

  def answer(self, params, fresh_BxW, fresh_len_B, key, active_B):
    t, k = self.task, len(self.task.slots)
    body_BxK = fresh_BxW[:, 3:3 + k]  # <bos> <user> calc v1 ... vK <eot> <assistant>
    hole_BxK = body_BxK == t.ids["?"]
    ask = jnp.stack([jnp.full_like(body_BxK[:, 0], t.ids["ask"]),
                     jnp.asarray(t.name_ids_K)[jnp.argmax(hole_BxK, 1)],
                     jnp.full_like(body_BxK[:, 0], t.eot_id)], 1)
    ask = jnp.pad(ask, ((0, 0), (0, k - 1)))
    eot = jnp.full_like(body_BxK[:, :1], t.eot_id)
    ans = jnp.concatenate([jnp.full_like(eot, t.ids["answer"]), body_BxK, eot], 1)
    asking = jnp.any(hole_BxK, 1)
    toks = jnp.where(asking[:, None], ask, ans)
    lengths = jnp.where(asking, 3, k + 2) * active_B
    return sampling.SampleOutput(toks, jnp.zeros(toks.shape), lengths, active_B)


def test_pair_plumbing_with_a_perfect_mediator():
  """The assistant sees only the rewrite, the real conversation gets its replies: with the
  target as rewrite every episode is solved in both modes, and a mediator that never updates
  the request leaves the ambiguous ones unsolved."""
  b, turns = 64, 3
  for task in (REACTIVE, SHARDED):
    ro = jax.jit(lambda k, t=task: rollout_lib.rollout(
        _Scripted(t), t, {"mediator": None, "assistant": None}, k, b, num_turns=turns,
        max_len=rollout_lib.conversation_len(t, turns, 7)))(jax.random.key(1))
    m = scoring.episode_metrics(task, ro.conv, ro.sim)
    scores = {perfect: scoring.summarize(jax.tree_util.tree_map(lambda x, r=rows: x[r], m))
              for perfect, rows in ((True, slice(0, b // 2)), (False, slice(b // 2, b)))}
    text = conv_lib.decode(ro.conv, TOK)
    assert all(t_.count("calc") == 1 for t_ in text)  # rewrites never reach the conversation
    assert "<assistant> ask" in text[0] or "<assistant> answer" in text[0]
    assert scores[True]["score"] == 1.0
    assert scores[False]["score_clear"] == 1.0
    if task.sim.sharded:  # reveals arrive without asking, but only a mediator can use them
      assert scores[False]["score_ambiguous"] == 0.0
    else:
      assert scores[True]["ask_when_ambiguous"] == 1.0 and scores[False]["score_ambiguous"] == 0.0


# ------------------------------------------------------------------------------------------------
# The trainer, its config errors and evaluation.
# ------------------------------------------------------------------------------------------------


def _tiny_config(base_dir: str, **overrides):
  c = collab_arms.get_config("arm=mediator")
  c.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
  c.batch_size, c.eval_batch_size = 32, 16
  c.num_turns = c.eval_turns = 2
  c.num_steps, c.log_every, c.eval_every = 120, 20, 120
  c.checkpoint.every_steps = 120
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-2, 10  # from random weights
  c.init_from = c.assistant_from = base_dir
  for k, v in overrides.items():
    c[k] = v
  return c


def _save_base(path: str, config) -> None:
  """An untrained 'base' checkpoint with its config: what the mediator reads as its assistant."""
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(config.model.to_dict()))
  params = transformer.init_params(model, jax.random.key(0))
  with ckpt_lib.Checkpointer(path, async_save=False) as ck:
    ck.save(1, {"params": params}, config=config)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("mediator")
  base = str(root / "sft_base" / "checkpoints")
  cfg = _tiny_config(base)
  _save_base(base, cfg)
  out = mediator_trainer.train(cfg, str(root / "mediator"))
  return root, cfg, out


def test_training_lowers_the_loss_and_raises_exact_match(run):
  root, _, out = run
  rows = metrics_lib.read_jsonl(str(root / "mediator" / "metrics.jsonl"))
  start, end = rows[0], rows[-1]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < 0.5 * losses[0]
  for mode in mediator_trainer.MODES:
    assert end[f"{mode}/eval_loss"] < start[f"{mode}/eval_loss"] - 1.0
    assert end[f"{mode}/exact_match"] > start[f"{mode}/exact_match"] + 0.2, mode
    assert np.isfinite(end[f"{mode}/score"])  # the pair played (its random base scores ~0)
  saved = restore_lib.read_config(str(root / "mediator" / "checkpoints"))
  assert saved["assistant_from"] == str(root / "sft_base" / "checkpoints")
  assert out["how"].startswith("init_from")


def test_bad_configs_fail_before_compiling(tmp_path, run):
  root, cfg, _ = run
  base = str(root / "sft_base" / "checkpoints")
  with pytest.raises(ValueError, match="config.assistant_from is empty"):
    mediator_trainer.check_config(_tiny_config(base, assistant_from=""))
  with pytest.raises(ValueError, match="config.assistant_from='/nowhere'"):
    mediator_trainer.check_config(_tiny_config(base, assistant_from="/nowhere"))
  other = cfg.copy_and_resolve_references()
  other.task = "doc_edit"
  _save_base(str(tmp_path / "doc"), other)
  with pytest.raises(ValueError, match="assistant_from.*task 'doc_edit'"):
    mediator_trainer.check_config(_tiny_config(str(tmp_path / "doc")))
  other = cfg.copy_and_resolve_references()
  other.model.vocab_size = 64
  _save_base(str(tmp_path / "wide"), other)
  with pytest.raises(ValueError, match="assistant_from.*vocabulary \\(64\\)"):
    mediator_trainer.check_config(_tiny_config(str(tmp_path / "wide")))
  with pytest.raises(ValueError, match="cuts_per_episode"):
    mediator_trainer.check_config(_tiny_config(base, cuts_per_episode=4))


def test_evaluate_plays_a_mediator_run_in_both_modes(run, tmp_path):
  root, cfg, out = run
  run_dir = str(root / "mediator")
  task, policy, params, _, config = evaluate.load_policy(run_dir, 2, {"sharded": True})
  assert isinstance(policy, mediator.MediatorAssistant) and task.sim.sharded
  assert config["trainer"] == "mediator" and set(params) == {"mediator", "assistant"}
  for got, want in zip(jax.tree_util.tree_leaves(params["mediator"]),
                       jax.tree_util.tree_leaves(out["state"].params)):
    np.testing.assert_array_equal(got, want)
  # Sharded only: the reactive row is the same code with another simulator (one compile less).
  results = evaluate.evaluate_runs([(run_dir, "mediator", 0)], str(tmp_path), episodes=16,
                                   turns=2, batch=16, users=["sharded"])
  assert set(results) == {"ambig_math:mediator@sharded"}
  assert os.path.getsize(tmp_path / "samples" / "ambig_math_mediator@sharded.txt") > 0


def test_evaluation_rows_per_arm_and_mode():
  sims = lambda rows: [(r, dict(u.sim)) for r, u in rows]
  assert sims(evaluate.rows_of("ppo_ext", evaluate.MODES)) == [
      ("ppo_ext", {"sharded": False}), ("ppo_ext@sharded", {"sharded": True})]
  assert [r for r, _ in evaluate.rows_of("sft_base", evaluate.MODES)] == [
      "sft_base", "proactive_base", "sft_base@sharded", "proactive_base@sharded"]
  assert dict(sims(evaluate.rows_of("sft_base", ["sharded"])))["proactive_base@sharded"] == {
      "instruction_rate": 1.0, "sharded": True}
  with pytest.raises(ValueError, match="unknown user 'lost'"):
    evaluate.rows_of("sft_base", ["lost"])
