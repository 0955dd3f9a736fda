"""The learned reward model, its losses and pairs, the LM judge and its prompts, the trainer."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import conversation as conv_lib
from collab_rl import reward_model as rm
from collab_rl import rollout as rollout_lib
from collab_rl import sharding as sharding_lib
from collab_rl import tokenizer as tk
from collab_rl.models import transformer as tfm
from collab_rl.tasks import registry
from collab_rl.tokenizer import ASSISTANT, CONTEXT
from collab_rl.trainers import reward_model as trainer
from experiments import reward_model as rm_config

# ------------------------------------------------------------------------------------------------
# Losses, pairs and measures, worked by hand.
# ------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
  # d = 0: -log(1/2) = log 2. d = ln 3: sigmoid = 3/4. d = -1000: -log sigmoid = 1000, finite.
  r_c = jnp.array([0.5, math.log(3.0), -1000.0])
  r_r = jnp.array([0.5, 0.0, 0.0])
  each = [math.log(2.0), -math.log(0.75), 1000.0]
  np.testing.assert_allclose(rm.bradley_terry_loss(r_c[:2], r_r[:2]), np.mean(each[:2]),
                             rtol=1e-6)
  np.testing.assert_allclose(rm.bradley_terry_loss(r_c, r_r), np.mean(each), rtol=1e-6)
  # Weighted: sum w l / sum w.
  w = jnp.array([1.0, 3.0, 0.0])
  np.testing.assert_allclose(rm.bradley_terry_loss(r_c, r_r, w),
                             (each[0] + 3 * each[1]) / 4, rtol=1e-6)
  # No pair kept: loss 0 and a finite (zero) gradient.
  loss, grad = jax.value_and_grad(
      lambda c: rm.bradley_terry_loss(c, r_r, jnp.zeros(3)))(r_c)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
  # The gradient pushes r_c up by sigmoid(-d) / n: at d = ln 3, 1/4 / 2.
  g = jax.grad(lambda c: rm.bradley_terry_loss(c, r_r[:2]))(r_c[:2])
  np.testing.assert_allclose(g, [-0.5 / 2, -0.25 / 2], rtol=1e-6)


def test_regression_loss_by_hand():
  np.testing.assert_allclose(rm.regression_loss(jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0])),
                             (1 + 4) / 2)


def test_make_pairs_by_hand():
  mr_BxG = jnp.array([[1.0, 3.0, 2.0],     # best 1, worst 0, gap 2: kept
                      [0.5, 0.5, 0.5],     # all tied: nothing to prefer
                      [2.0, 1.95, 0.0],    # best 0, worst 2, gap 2: kept
                      [0.0, 0.05, 0.03],   # gap 0.05 below the threshold
                      [0.25, 0.0, 0.125]])  # gap exactly the threshold: not kept (strict)
  chosen, rejected, keep = rm.make_pairs(mr_BxG, 0.25)
  np.testing.assert_array_equal(chosen, [1, 0, 0, 1, 0])
  np.testing.assert_array_equal(rejected, [0, 0, 2, 0, 1])
  np.testing.assert_array_equal(keep, [True, False, True, False, False])


def test_rank_measures_by_hand():
  # Spearman of [1, 2, 3] vs [1, 3, 2]: 1 - 6 * 2 / (3 * 8) = 0.5; ties take average ranks.
  assert rm.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
  assert rm.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)
  assert rm.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
  assert rm.pearson([1, 1, 1], [2, 4, 6]) == 0.0
  pred = np.array([[0.0, 1.0, 2.0], [5.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
  mr = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
  # Row 0: pairs (1>0) right, (2>0) right, (1>2) wrong; row 1: (0>1), (0>2) right; row 2: none.
  acc, n = rm.order_accuracy(pred, mr, 0.1)
  assert n == 5 and acc == pytest.approx(4 / 5)
  # Row 0: rho([0, 1, 2], [0, 1, .5]) = 0.5; row 1: ranks [2, .5, .5] both: 1; row 2 skipped.
  assert rm.within_row_spearman(pred, mr) == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------------
# The scalar reward and the judge on a tiny transformer, 1 device vs 8.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  """A 2-layer model over ambig_math's words with both an LM and a reward head (one init)."""
  task = registry.make_task("ambig_math", {"ambiguous_rate": 1.0, "min_missing": 1,
                                           "max_missing": 1})
  model = tfm.Transformer(tfm.TransformerConfig(
      # Rounded up to even: the 8-device test splits the embedding's rows over 'model' = 2.
      vocab_size=task.vocab_size + task.vocab_size % 2, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      heads=("lm", "reward")))
  # Jitted: an eager init dispatches op by op, several times slower than compiling it.
  return task, model, jax.jit(lambda k: tfm.init_params(model, k))(jax.random.key(0))


def _sharded(params, batch, mesh):
  shardings = sharding_lib.param_shardings(params, mesh)
  put = lambda x: jax.device_put(x, sharding_lib.batch_sharding(mesh))
  return jax.device_put(params, shardings), jax.tree_util.tree_map(put, batch)


def test_score_reads_the_last_token_and_agrees_on_eight_devices(tiny):
  _, model, params = tiny
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 1, model.cfg.vocab_size)
  last = jnp.array([3, 11, 5, 7, 0, 9, 10, 4])
  valid = jnp.arange(12)[None, :] <= last[:, None]
  fn = jax.jit(lambda p, t, v, l: rm.score(model, p, t, v, l))

  @jax.jit
  def by_hand(p):
    full = model.apply({"params": p}, tokens, valid_BxL=valid).reward_BxL
    # What follows the last token must not matter (causal attention, masked padding).
    noise = rm.score(model, p, jnp.where(valid, tokens, 7), valid, last)
    return full[jnp.arange(8), last], noise

  one = fn(params, tokens, valid, last)
  want, noise = by_hand(params)
  np.testing.assert_allclose(one, want, atol=1e-6)
  np.testing.assert_allclose(noise, one, atol=1e-6)
  p8, (t8, v8, l8) = _sharded(params, (tokens, valid, last), sharding_lib.make_mesh((2, 2, 2)))
  np.testing.assert_allclose(fn(p8, t8, v8, l8), one, atol=1e-5)


def test_rating_readout_by_hand():
  # Ratings are tokens 1, 3, 5 with logits ln 1, ln 2, ln 5: p = [1, 2, 5] / 8; values 0, .5, 1.
  logits = jnp.log(jnp.array([[1.0, 1.0, 1.0, 2.0, 1.0, 5.0]]))
  out = rm.rating_readout(logits, [1, 3, 5])
  np.testing.assert_allclose(out.probs_BxR, [[1 / 8, 2 / 8, 5 / 8]], rtol=1e-6)
  np.testing.assert_allclose(out.rating_B, [2 / 8 * 0.5 + 5 / 8], rtol=1e-6)
  # The other three tokens have weight 1 each: 8 of 11 on the ratings.
  np.testing.assert_allclose(out.mass_B, [8 / 11], rtol=1e-6)
  custom = rm.rating_readout(logits, [1, 3, 5], values_R=[1.0, 0.0, 0.0])
  np.testing.assert_allclose(custom.rating_B, [1 / 8], rtol=1e-6)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _first_turn_with_reply(task, batch):
  intent = task.sample_intents(jax.random.key(0), batch)
  conv, sim = rollout_lib.start(task, intent, max_len=32)
  ones = jnp.ones((batch,), jnp.int32)
  conv = conv_lib.append(conv, jnp.full((batch, 1), task.assistant_header_id), ones, CONTEXT)
  toks, _, lens, _ = rollout_lib.oracle_policy(task)(None, conv, sim, (), jax.random.key(1))
  return conv_lib.append(conv, toks, lens, ASSISTANT, new_turn=False)


def test_task_judge_prompts_and_the_judge_on_eight_devices(tiny):
  task, model, params = tiny
  conv = _first_turn_with_reply(task, 8)
  words = task.tokenizer
  prompts = [rm.task_judge_prompt(task, conv, i, "interactivity") for i in range(8)]
  # The request shows one "?" and the oracle asks about that slot.
  lines = conv_lib.decode(conv, words, [0])[0].splitlines()
  request, reply = lines[1].removesuffix(" <eot>"), lines[2].removesuffix(" <eot>")
  assert request.startswith("<user> calc") and "?" in request
  assert reply.startswith("<assistant> ask")
  assert words.decode(prompts[0]) == (f"<bos> <system> 0 1 2 3 4 5 6 7 8 9 <eot> <user> {request} "
                                      f"{reply} <eot> <assistant>")
  assert prompts[0][-1] == task.assistant_header_id  # the rating is the next token
  ratings = rm.rating_ids(words, rm.task_rating_words(task))
  assert [words.decode([i]) for i in ratings] == [str(d) for d in range(10)]
  with pytest.raises(ValueError, match="no digit words"):
    rm.task_rating_words(registry.make_task("doc_edit"))

  tokens, length = rm.pad_prompts(prompts, width=int(max(map(len, prompts))) + 3)
  # Tied embeddings: the same params without lm_head, the output matrix is the embedding's.
  tied = tfm.Transformer(dataclasses.replace(model.cfg, tie_word_embeddings=True))
  variants = [(model, params), (tied, {k: v for k, v in params.items() if k != "lm_head"})]
  outs = []
  for m, p in variants:
    judge = rm.LMJudge(m, ratings)

    @jax.jit
    def both(p, m=m, judge=judge):
      # The one-position readout against the full model's logits at each prompt's last token.
      logits = m.apply({"params": p}, tokens, valid_BxL=jnp.arange(tokens.shape[1])[None]
                       < length[:, None], heads=("lm",)).logits_BxLxV
      return judge.judge(p, tokens, length), rm.rating_readout(
          logits[jnp.arange(8), length - 1], ratings)

    out, want = both(p)
    np.testing.assert_allclose(out.rating_B, want.rating_B, atol=1e-5)
    np.testing.assert_allclose(out.mass_B, want.mass_B, atol=1e-5)
    np.testing.assert_allclose(out.probs_BxR.sum(-1), 1.0, atol=1e-5)
    assert np.all((0 <= out.rating_B) & (out.rating_B <= 1))
    outs.append(out)
  mesh = sharding_lib.make_mesh((2, 2, 2))
  p8, _ = _sharded(params, (), mesh)
  many = rm.LMJudge(model, ratings, mesh=mesh)(p8, tokens, length)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), outs[0], many)


def test_chat_template_judge_prompt():
  words = ["You", "are", "a", "judge", "1", "2", "3", "10", "calc", "?", "ask", "n1"]
  tokenizer = tk.Tokenizer.for_words(words)
  conversation = [{"role": "user", "content": "calc ?"}, {"role": "assistant", "content": "ask n1"}]
  messages = rm.judge_messages(conversation, "interactivity", ("1", "2", "3"))
  assert messages[0]["role"] == "system"
  assert messages[0]["content"].startswith("You are a judge")
  assert "interactivity" in messages[0]["content"]
  assert messages[0]["content"].endswith("from 1 (worst) to 3 (best). Reply with the number only.")
  assert messages[1] == {"role": "user", "content": "User: calc ?\nAssistant: ask n1"}
  ids = rm.judge_prompt(tokenizer, conversation, "helpfulness", ("1", "2", "3"))
  text = tokenizer.render(rm.judge_messages(conversation, "helpfulness", ("1", "2", "3")),
                          add_generation_prompt=True)
  assert text.endswith("<user> User: calc ?\nAssistant: ask n1 <eot>\n<assistant> ")
  assert ids[-1] == tokenizer.token_to_id("<assistant>")
  assert rm.rating_ids(tokenizer, ("1", "2", "3", "10")) == [
      tokenizer.token_to_id(w) for w in ("1", "2", "3", "10")]
  with pytest.raises(ValueError, match="'7' is not a single token"):
    rm.rating_ids(tokenizer, ("1", "7"))
  with pytest.raises(ValueError, match="must end with the assistant"):
    rm.judge_messages(conversation[:1], "helpfulness")
  with pytest.raises(ValueError, match="unknown aspect"):
    rm.judge_messages(conversation, "politeness")


# ------------------------------------------------------------------------------------------------
# The trainer.
# ------------------------------------------------------------------------------------------------


def tiny_config(**overrides):
  c = rm_config.get_config("runlocal")
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.batch_size = 32
  c.num_steps = 200  # ~50 steps/s here: compilation, not steps, is most of the test's time
  c.optimizer.learning_rate = 1e-2
  c.optimizer.warmup_steps = 10
  c.log_every = 100
  c.eval_every = 200
  c.eval_batch_size = 128
  c.checkpoint.every_steps = 200
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_candidates_and_their_mr():
  config = tiny_config()
  mesh, task = trainer.check_config(config)
  built = trainer.build(config, mesh, task)
  batch = jax.device_get(built.data_fn(jax.random.key(0)))
  kinds, mr, amb = batch["kind_BxG"], batch["mr_BxG"], batch["ambiguous_B"]
  rows = config.batch_size
  assert batch["tokens_BxGxL"].shape == (rows, config.candidates, trainer.model_width(task))
  irrelevant = kinds == trainer.BEHAVIOURS.index("irrelevant")
  oracle = kinds == trainer.BEHAVIOURS.index("oracle")
  assert irrelevant.any() and oracle.any() and amb.any() and not amb.all()
  # A clarifying question beats an irrelevant one by the interactivity it earns and keeps.
  for i in range(rows):
    if oracle[i].any() and irrelevant[i].any():
      assert mr[i][oracle[i]].min() > mr[i][irrelevant[i]].max() + 0.1
  # On a clear request the oracle answers at once: full marks, less the 7 tokens read.
  clear_oracle = oracle & ~amb[:, None]
  np.testing.assert_allclose(mr[clear_oracle], 1.0 - 7 * 5e-4, atol=1e-6)
  # The reward model reads the request and the candidate, ending at the candidate's <eot>.
  last = batch["last_BxG"]
  assert np.all(batch["tokens_BxGxL"][np.arange(rows)[:, None], np.arange(4), last]
                == task.eot_id)


def test_reward_model_learns_the_mr_ranking(tmp_path):
  out = trainer.train(tiny_config(), str(tmp_path / "run"))
  final = out["final"]
  # Chance is 0.5 (the untrained model scores 0.5 to 0.6 here); this run reaches ~0.96 on the
  # ~110 held-out pairs, with a within-row Spearman of ~0.8.
  assert final["eval_kept_share"] > 0.7
  assert final["eval_pair_acc"] > 0.85, final
  assert final["eval_spearman"] > 0.6, final


@pytest.mark.parametrize("overrides, match", [
    ({"objective": "dpo"}, "objective='dpo'"),
    ({"reward.window": 4}, "window=4"),
    ({"batch_size": 12}, "batch_size=12 must be a positive multiple"),
    ({"candidates": 1}, "at least 2"),
    ({"model.heads": ("lm",)}, "must include 'reward'"),
    ({"init_from": "/nonexistent/rm/checkpoints"}, "/nonexistent/rm/checkpoints"),
])
def test_bad_config_fails_before_compiling(overrides, match, tmp_path, compile_counter):
  config = tiny_config(**overrides)
  with compile_counter as counter, pytest.raises(ValueError, match=match):
    trainer.train(config, str(tmp_path / "bad"))
  assert counter.count == 0
  assert not (tmp_path / "bad").exists()
