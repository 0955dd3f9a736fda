"""The language tier on tiny random Hugging Face checkpoints made here (Llama-3 and Qwen2 chat
templates): the device rollout against an LM user, the goal kept from the policy, MR's batched
futures against single futures played one by one, PPO and SFT on records, resume, the HF export,
and bad input failing before anything compiles."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from collab_rl import frozen_base
from collab_rl import rewards
from collab_rl import rollout as rollout_lib
from collab_rl import run_rl
from collab_rl import sampling
from collab_rl import text_scores
from collab_rl.data import builders
from collab_rl.models import hf, transformer
from collab_rl.tasks import text as text_lib
from collab_rl.tasks import verifiers
from collab_rl.tokenizer import ASSISTANT, CONTEXT, USER
from experiments import collabllm, english_tasks, hf_models

TURNS, REPLY = 2, 12


def _records(n: int, seed: int = 0) -> list[dict]:
  return english_tasks.records("sft", n, seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Records (prepared), and per chat style a tiny random folder used as policy and user."""
  root = tmp_path_factory.mktemp("text")
  recs = _records(48)
  jsonl = english_tasks.write(str(root / "records.jsonl"), recs)
  builders.prepare_collabllm(jsonl, str(root / "data"), validation_fraction=0.25,
                             test_fraction=0.25)
  texts = english_tasks.corpus(recs)
  folders = {}
  for style in ("llama3", "qwen2"):
    tok = hf_models.train_tokenizer(texts, style, vocab_size=400)
    cfg = hf_models.model_config(tok, style, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1)
    folders[style] = hf_models.save_folder(root / style, tok, cfg, seed=3)
  return {"root": root, "data": str(root / "data"), "records": recs, **folders}


def _config(world, style: str = "llama3", arm: str = "ppo_mr") -> ml_collections.ConfigDict:
  c = collabllm.get_config(f"{arm},runlocal")
  c.init_from_hf = world[style]
  c.sim.user_from = world[style]
  c.data_dir = world["data"]
  c.num_turns, c.reply_tokens = TURNS, REPLY
  c.sim.prompt = "short"
  c.sim.max_user_len = 10
  c.sim.max_request_tokens = 96  # Qwen2 opens with its default system prompt
  c.sim.max_prompt_tokens = 256
  c.batch_size = c.eval_batch_size = 8
  return c


def _task(world, style="llama3", **sim):
  c = _config(world, style)
  c.sim.update(sim)
  return text_lib.from_config(c, max_turns=TURNS + 1)


def _policy(task, model, greedy=False):
  sc = sampling.SamplingConfig(max_new_tokens=REPLY, greedy=greedy, stop_tokens=task.stop_tokens)
  return rollout_lib.lm_policy(model, sc, chunk_width=task.chunk_width, max_turns=TURNS + 1)


def _play(task, model, params, user_params, records, key, policy=None):
  policy = policy or _policy(task, model)
  run = jax.jit(lambda p, u, i, k: rollout_lib.rollout(
      policy, task.bind(u), p, k, len(records), num_turns=TURNS,
      max_len=task.conversation_len(TURNS, REPLY), intent=i))
  return run(params, user_params, task.encode(records), key)


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_rollout_writes_each_template_and_ends_every_turn(world, style):
  task = _task(world, style)
  model, params = hf.load_pretrained(world[style])
  ro = _play(task, model, params, params, world["records"][:4], jax.random.key(0))
  conv = jax.device_get(ro.conv)
  toks, roles = np.asarray(conv.tokens_BxL), np.asarray(conv.roles_BxL)
  asst_h = list(task.assistant_header)
  for b in range(4):
    n = int(conv.cursor_B[b])
    row, rl = toks[b, :n].tolist(), roles[b, :n]
    # The opening is the policy template's rendering of the first request (nothing else).
    want, want_roles = text_lib.opening_ids(task.tokenizer,
                                            text_lib.first_request(world["records"][b]))
    assert row[:len(want)] == want.tolist() and (rl[:len(want)] == want_roles).all()
    # Every reply follows the assistant header, every user turn the user header and ends with
    # the template's end of turn: the rollout wrote whole template turns around what it sampled.
    starts = [i for i in range(n) if rl[i] == ASSISTANT and rl[i - 1] != ASSISTANT]
    assert len(starts) == TURNS or conv.done_B[b]
    for i in starts:
      assert row[i - len(asst_h):i] == asst_h and (rl[i - len(asst_h):i] == CONTEXT).all()
    ends = [i for i in range(len(want), n) if rl[i] == USER and (i + 1 == n or rl[i + 1] != USER)]
    for i in ends:
      assert row[i - len(task.user_footer) + 1:i + 1] == list(task.user_footer)
  assert not np.asarray(conv.overflow_B).any()
  assert int(np.asarray(ro.sim.turns_B).min()) >= 1


def test_the_goal_never_reaches_the_policy(world):
  """Two goals, one first request: with a user whose words cannot depend on its prompt (its
  attention and MLP outputs zeroed) and greedy sampling on both sides, the policy's
  conversations are identical bit for bit, while the goal is in the user's own chat."""
  task = _task(world, temperature=0.0)
  model, params = hf.load_pretrained(world["llama3"])
  deaf = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if any(getattr(k, "key", "") in ("o_proj", "down_proj")
                                            for k in p) else x, params)
  rec = world["records"][0]
  other = {**rec, "single_turn_prompt": "Please compute 9 * 9 * 9.",
           "single_turn_completion": "The answer is 9 * 9 * 9."}
  ro = _play(task, model, params, deaf, [rec, other], jax.random.key(1),
             policy=_policy(task, model, greedy=True))
  conv, view = jax.device_get(ro.conv), jax.device_get(ro.sim.view)
  np.testing.assert_array_equal(conv.tokens_BxL[0], conv.tokens_BxL[1])
  goals = [list(p) for p in text_lib._variants(  # pylint: disable=protected-access
      task.tokenizer, "9 * 9 * 9")]
  flat = lambda r: np.asarray(view.tokens_BxL[r, :int(view.cursor_B[r])]).tolist()
  has = lambda seq: any(seq[i:i + len(g)] == g for g in goals for i in range(len(seq)))
  assert has(flat(1)) and not has(flat(0))
  assert not has(np.asarray(conv.tokens_BxL[1]).tolist())


def test_mr_futures_equal_single_futures_played_one_by_one(world):
  """MR's B x S futures (tiled caches, one batched call) against each future replayed from
  scratch as a batch-1 rollout, greedy on both sides: the same conversations, the same R*."""
  task = _task(world, temperature=0.0)
  model, params = hf.load_pretrained(world["llama3"])
  policy = _policy(task, model, greedy=True)
  recs = world["records"][:2]
  cfg = rewards.RewardConfig(window=1, samples=2, w_int=0.0)
  columns = task.conversation_len(TURNS, REPLY)
  bound = task.bind(params)

  @functools.partial(jax.jit, static_argnums=2)
  def futures(intent, key, cfg):
    conv, sim = rollout_lib.start(bound, intent, columns)
    pstate = policy.init(params, conv, task.opening_width)
    conv = rollout_lib.open_reply(bound, conv)
    reply, _, n, pstate = policy(params, conv, sim, pstate, key)
    return rewards.play_futures(policy, bound, params, conv, sim, pstate, reply, n, key, cfg,
                                keep=text_lib.played)

  batched, _ = jax.device_get(futures(task.encode(recs), jax.random.key(2), cfg))
  # One future at a time (reward.samples_chunk = 1: a loop, one future's caches live at once),
  # greedy: the same conversations, in the same rows.
  chunked, _ = jax.device_get(futures(task.encode(recs), jax.random.key(2),
                                      dataclasses.replace(cfg, samples_chunk=1)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, chunked, batched)
  scorer = text_scores.TextScorer(task, cfg)
  want_total = scorer.score(batched, recs)[0]
  for b, rec in enumerate(recs):
    one = jax.device_get(_play(task, model, params, params, [rec], jax.random.key(5),
                               policy=policy).conv)
    for s in range(cfg.samples):
      r = b * cfg.samples + s
      n = int(batched.cursor_B[r])
      assert int(one.cursor_B[0]) >= n
      np.testing.assert_array_equal(batched.tokens_BxL[r, :n], one.tokens_BxL[0, :n])
  assert want_total.shape == (len(recs) * cfg.samples,)


def test_ppo_with_mr_trains_and_exports_for_transformers(world, tmp_path):
  """Two MR iterations: the policy moves, the user's folder is untouched, the records' position
  is saved with the checkpoint, and WORKDIR/hf gives transformers our logits."""
  from collab_rl.trainers import ppo  # pylint: disable=g-import-not-at-top
  user_before = jax.device_get(hf.load_pretrained(world["llama3"])[1])
  out = ppo.train(_config(world), str(tmp_path / "run"))
  assert out["how"] == f"init_from_hf {world['llama3']}"
  start = jax.device_get(hf.load_pretrained(world["llama3"])[1])
  after = jax.device_get(out["state"].params)
  moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(after["layers_0"]), jax.tree_util.tree_leaves(start["layers_0"]))]
  assert max(moved) > 0  # the policy changed, the user did not
  jax.tree_util.tree_map(np.testing.assert_array_equal, user_before, start)
  for k in ("eval/score", "eval/ask_when_ambiguous", "policy_loss", "rstar/total"):
    assert np.isfinite(out["final"][k]), k
  assert (tmp_path / "run" / "checkpoints" / "2" / "data").is_dir()
  _same_logits_in_transformers(tmp_path / "run" / "hf", out["state"].params)


def _same_logits_in_transformers(folder, params):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  assert hf_models.logit_gap(folder) < 1e-4
  model, loaded = hf.load_pretrained(folder)
  ids = jnp.asarray([[1, 5, 9, 12, 40]])
  own = {k: v for k, v in params.items() if k != "value_head"}
  np.testing.assert_allclose(np.asarray(model.apply({"params": loaded}, ids).logits_BxLxV),
                             np.asarray(model.apply({"params": own}, ids).logits_BxLxV),
                             atol=1e-5)


def _sft_config(world, side: str, steps: int = 8):
  c = collabllm.get_config(f"sft,runlocal,side={side}")
  c.init_from_hf, c.data_dir = world["llama3"], world["data"]
  c.sim.prompt, c.max_len = "short", 320
  c.num_steps, c.eval_every, c.log_every = steps, steps, 4
  c.checkpoint.every_steps = 4
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-3, 2
  return c


@pytest.mark.parametrize("side", ["assistant", "user"])
def test_sft_on_records_lowers_the_loss(world, tmp_path, side):
  from collab_rl.trainers import sft_records  # pylint: disable=g-import-not-at-top
  out = sft_records.train(_sft_config(world, side), str(tmp_path / side))
  rows = [json.loads(line) for line in open(tmp_path / side / "metrics.jsonl")]
  assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.5
  assert rows[-1]["truncated"] == 0.0
  assert (tmp_path / side / "hf" / "model.safetensors").exists()
  assert out["how"] == f"init_from_hf {world['llama3']}"
  if side == "assistant":  # a run stopped half-way resumes on the records it would have read
    sft_records.train(_sft_config(world, side), str(tmp_path / "cut"), stop_after=4)
    resumed = sft_records.train(_sft_config(world, side), str(tmp_path / "cut"))
    assert resumed["how"] == "resumed step 4"
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(out["state"].params),
                           jax.device_get(resumed["state"].params))


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors before anything compiles.
# ------------------------------------------------------------------------------------------------


def test_bad_folders_and_budgets_fail_before_compiling(world, tmp_path, compile_counter):
  with compile_counter as counter:
    c = _config(world)
    c.sim.user_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="sim.user_from=.*nowhere.*no config.json"):
      run_rl.check_common(c)
    c = _config(world)
    c.judge.folder = str(tmp_path / "nojudge")
    task = text_lib.from_config(c)
    with pytest.raises(FileNotFoundError, match="judge folder.*nojudge"):
      text_scores.from_config(c, task)
    with pytest.raises(ValueError, match="not a single token"):
      text_scores.load_judge(world["llama3"], ("excellent", "terrible"))
    c = _config(world)
    c.reward.w_int = 0.1
    with pytest.raises(ValueError, match="w_int=0.1 scores interactivity with an LM judge"):
      text_scores.from_config(c, text_lib.from_config(c))
    long = {**world["records"][0], "line": 7, "source": "x.jsonl",
            "turns": [{"role": "user", "content": "Please compute " + "1 + " * 60 + "1."}]}
    with pytest.raises(ValueError, match=r"x.jsonl:7: the policy's opening is \d+ tokens"):
      _task(world).encode([long])
    c = _config(world)
    c.sim.user_from = world["qwen2"]  # another vocabulary
    with pytest.raises(ValueError, match="another vocabulary than the policy's"):
      text_lib.from_config(c)
    c = _config(world)
    c.data_dir = str(tmp_path / "nodata")
    with pytest.raises(FileNotFoundError, match="prepare --task collabllm"):
      run_rl.check_common(c)
  assert counter.count == 0


def test_user_end_and_confusion_are_found_on_tokens(world):
  task = _task(world)
  tok = task.tokenizer
  texts = ["Thanks, that is right. [[TERMINATE CHAT]]", "[[TERMINATE CHAT]]",
           "ok\n[[TERMINATE CHAT]] bye", "Sure! As an AI, here is the answer.",
           "The second number is 7."]
  ids = [tok.encode(t) for t in texts]
  width = max(len(i) for i in ids)
  ids_BxN = jnp.asarray([i + [0] * (width - len(i)) for i in ids])
  len_B = jnp.asarray([len(i) for i in ids])
  found = jax.jit(lambda t, n: [jnp.any(jnp.stack([
      text_lib._contains(t, n, p) for p in patterns]), 0)  # pylint: disable=protected-access
                                for patterns in (task.end_patterns, task.confusion_patterns)])
  ended, confused = (np.asarray(x) for x in found(ids_BxN, len_B))
  np.testing.assert_array_equal(ended, [True, True, True, False, False])
  np.testing.assert_array_equal(confused, [False, False, False, True, False])


def test_verifiers_score_text():
  assert verifiers.answer_match("Sure. The answer is 3 + 7 * 2.", "3 + 7 * 2") == 1.0
  assert verifiers.answer_match("The answer is 3 + 7 * 3.", "3 + 7 * 2") == 0.0
  assert verifiers.answer_match("so \\boxed{42}", "The answer is 42.") == 1.0
  assert verifiers.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
  assert 0 < verifiers.bleu("the cat sat on a mat", "the cat sat on the mat") < 1
  assert verifiers.verifier({"tests": "assert f() == 1"}) == "tests"
  assert verifiers.verifier({"answer": "1"}) == "answer"
  assert verifiers.verifier({}) == "bleu" and verifiers.verifier({}, "judge") == "judge"
  with pytest.raises(ValueError, match="verifier='nope'"):
    verifiers.verifier({"verifier": "nope"})


def test_online_dpo_step_moves_the_policy_only(world, tmp_path, monkeypatch):
  from collab_rl import run_text  # pylint: disable=g-import-not-at-top
  from collab_rl.trainers import dpo  # pylint: disable=g-import-not-at-top
  c = _config(world, arm="dpo_online")
  c.num_steps = 2  # the first step's learning rate is 0 (warmup)
  c.candidates = 2
  # Random weights write replies that all run to the budget and score 0: every candidate would
  # tie. Distinct MRs for the futures test the pairs and the update, not the random policy.
  score = run_text.World.score
  monkeypatch.setattr(run_text.World, "score", lambda self, pending, live, records, kind="mr": (
      score(self, pending, live, records, kind)[0] + np.arange(len(live)) % 7, {}))
  out = dpo.train(c, str(tmp_path / "dpo"))
  start = jax.device_get(hf.load_pretrained(world["llama3"])[1])
  after = jax.device_get(out["state"].params)
  assert set(after) == set(start)  # the policy's own tree: no user, no judge in it
  diff = max(float(np.abs(np.asarray(a) - b).max())
             for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(start)))
  assert diff > 0 and out["final"]["pairs/kept_share"] == 1.0


def test_judge_rates_in_unit_range_and_warns_on_little_mass(world, caplog):
  task = _task(world)
  judge = text_scores.load_judge(world["llama3"], text_scores.DEFAULT_RATINGS, min_mass=0.5)
  scorer = text_scores.TextScorer(task, rewards.RewardConfig(w_int=0.5), judge)
  model, params = hf.load_pretrained(world["llama3"])
  recs = world["records"][:4]
  ro = _play(task, model, params, params, recs, jax.random.key(3))
  conv, _ = jax.device_get(text_lib.played(ro.conv, ro.sim))
  with caplog.at_level("WARNING"):
    total, parts, stats = scorer.score(conv, recs)
  assert ((parts["r_int"] >= 0) & (parts["r_int"] <= 1)).all() and np.isfinite(total).all()
  # A random judge spreads its probability over the whole vocabulary: little on its ratings.
  assert 0 < stats["judge/interactivity_mass"] < 0.5
  assert "does not follow the rating format" in caplog.text


def test_the_user_can_write_the_opening(world):
  """`sim.first_turn = "user"`: the LM user writes the first message from its goal; the policy
  reads it between its template's opening frames, and the user's own chat holds it as its turn."""
  task = _task(world, temperature=0.0, first_turn="user")
  _, params = hf.load_pretrained(world["llama3"])
  recs = world["records"][:2]
  plain = task.encode(recs)
  intent = jax.device_get(task.open_episodes(params, plain, jax.random.key(0)))
  prefix, footer = list(task.first_prefix), list(task.first_footer)
  for b in range(2):
    n = int(intent.opening_len_B[b])
    row = np.asarray(intent.opening_BxN[b, :n]).tolist()
    roles = np.asarray(intent.opening_roles_BxN[b, :n])
    assert row[:len(prefix)] == prefix and row[n - len(footer):] == footer
    assert (roles[:len(prefix)] == CONTEXT).all() and (roles[len(prefix):] == USER).all()
    said = row[len(prefix):n - len(footer)]
    grown = np.asarray(intent.user_prompt_BxP[b, :int(intent.user_prompt_len_B[b])]).tolist()
    start = int(plain.user_prompt_len_B[b])
    assert grown[start:start + len(said)] == said  # its own words, in its own chat


def test_a_user_and_judge_of_the_policy_folder_read_its_base(world, tmp_path):
  """One copy of the base: a LoRA policy started from the folder its user and judge come from
  holds no weights for them; both read the base arrays inside the train state (the same buffers,
  equal to the folder's). Another params dtype, or a trained base param the user reads, gives
  them a copy of their own."""
  from collab_rl import run_text  # pylint: disable=g-import-not-at-top
  c = _config(world)
  c.judge.folder = world["llama3"]
  c.lora.rank = 4
  task, _, mesh, rcfg = run_rl.check_common(c)
  setup = run_rl.build(c, str(tmp_path / "run"), task, mesh, rcfg)
  world_ = setup.world
  assert set(world_.shared) == {"user", "judge"}
  assert world_.user_params is None and world_.scorer.judge.params is None
  bound = world_.bind(setup.reference(setup.state.params))
  base = setup.state.params["base"]
  assert "value_head" in base and "value_head" not in bound.user_params
  for k, tree in bound.user_params.items():
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(base[k])):
      assert a is b
  assert bound.scorer.judge.params["layers_0"] is base["layers_0"]
  loaded = hf.load_pretrained(world["llama3"])[1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(bound.user_params),
                         jax.device_get(loaded))
  # What its checkpoints leave out, rebuilt from the folder they name (absolute) over the seed's
  # initialisation (the value head): exactly, in the state's shardings (frozen_base.py).
  source = setup.run.checkpointer.frozen["source"]
  assert source == {"kind": "fresh", "init_from_hf": os.path.abspath(world["llama3"])}
  rebuilt = frozen_base.fresh_base(c, base, source["init_from_hf"])
  for a, b in zip(jax.tree_util.tree_leaves(rebuilt), jax.tree_util.tree_leaves(base)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(a, b)
  for change in ({"model.param_dtype": "bfloat16"},
                 {"lora.trainable": [r"^value_head/", r"^lm_head/"]}):
    other = _config(world)
    other.lora.rank = 4
    other.judge.folder = world["llama3"]
    for field, value in change.items():
      target, name = (other, field) if "." not in field else (
          other[field.split(".")[0]], field.split(".")[1])
      target[name] = value
    run_rl.check_common(other)
    assert not run_text.shared_models(other, task), change
  # A bf16 folder under fp32 master params (the 8B config's case) is shared: the user computes in
  # bf16, and the fp32 reference holds its weights exactly, so it plays as if it had loaded them.
  model16, params16 = hf.load_pretrained(world["llama3"], "bfloat16")
  folder16 = tmp_path / "bf16"
  hf.save_pretrained(model16, params16, folder16)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(world["llama3"], name), folder16 / name)
  c16 = _config(world)
  c16.init_from_hf = c16.sim.user_from = c16.judge.folder = str(folder16)
  task16, *_ = run_rl.check_common(c16)
  policy16 = transformer.TransformerConfig.from_dict(c16.model.to_dict())
  assert policy16.param_dtype == "float32" and task16.user_model.cfg.dtype == "bfloat16"
  assert set(run_text.shared_models(c16, task16)) == {"user", "judge"}
  tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 300)
  up = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params16)
  np.testing.assert_array_equal(
      task16.user_model.apply({"params": up}, tokens).logits_BxLxV,
      task16.user_model.apply({"params": params16}, tokens).logits_BxLxV)


def test_scanned_layers_play_the_same_conversations_and_share_the_base(world, tmp_path):
  """`model.scan_layers` on the language tier: the LM user and judge take the policy's layout,
  so those of the policy's folder still read its base (stacked, no copy), and policy and user
  loaded scanned play the conversations the unrolled ones play."""
  c = _config(world)
  c.model.scan_layers = True
  c.judge.folder = world["llama3"]
  c.lora.rank = 4
  task, _, mesh, rcfg = run_rl.check_common(c)
  assert task.user_model.cfg.scan_layers
  setup = run_rl.build(c, str(tmp_path / "run"), task, mesh, rcfg)
  assert set(setup.world.shared) == {"user", "judge"}
  bound = setup.world.bind(setup.reference(setup.state.params))
  base = setup.state.params["base"]
  assert "layers" in base and "layers_0" not in base
  assert bound.scorer.judge.params["layers"] is base["layers"]
  records = world["records"][:8]
  key = jax.random.key(4)
  model, params = hf.load_pretrained(world["llama3"])
  scanned, stacked = hf.load_pretrained(world["llama3"], scan_layers=True)
  a = _play(_task(world), model, params, params, records, key)
  b = _play(text_lib.from_config(c, max_turns=TURNS + 1), scanned, stacked, stacked, records,
            key)
  np.testing.assert_array_equal(b.conv.tokens_BxL, a.conv.tokens_BxL)
  np.testing.assert_allclose(b.logprobs_BxL, a.logprobs_BxL, atol=1e-5)
