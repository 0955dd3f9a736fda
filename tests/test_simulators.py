"""The LM user simulator: jitted rollouts, exact bookkeeping, a hidden goal, SFT, role-play."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import metrics as metrics_lib
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl import simulators
from collab_rl.models import transformer as tfm
from collab_rl.tasks import scoring
from collab_rl.tasks.ambig_math import AmbigMath
from collab_rl.tokenizer import ASSISTANT, USER
from collab_rl.trainers import sim_sft
from experiments import hf_models
from experiments import sim_sft as sim_sft_config

TASK = AmbigMath()
MAX_LEN = 80  # 3 turns of the longest replies fit: no row is cut
TURNS = 3


@pytest.fixture(scope="module")
def model():
  return tfm.Transformer(tfm.TransformerConfig(
      vocab_size=TASK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2))


def _simulator(model):
  cfg = sampling.SamplingConfig(max_new_tokens=TASK.sim.max_user_len + 1)
  return simulators.LMSimulator(TASK, model, cfg, max_len=MAX_LEN, chunk_width=12,
                                max_turns=TURNS)


def _replies(conv, t: int, width: int):
  """Assistant turn t of every row (turn index 2 + 2t: after <bos> and the request)."""
  toks, roles, turns = (np.asarray(x) for x in (conv.tokens_BxL, conv.roles_BxL, conv.turns_BxL))
  out, lengths = np.zeros((conv.batch, width), np.int32), np.zeros((conv.batch,), np.int32)
  for r in range(conv.batch):
    row = toks[r][(roles[r] == ASSISTANT) & (turns[r] == 2 + 2 * t)]
    out[r, :len(row)], lengths[r] = row, len(row)
  return jnp.asarray(out), jnp.asarray(lengths)


def test_oracle_rollout_keeps_the_scripted_bookkeeping(model, compile_counter):
  params = tfm.init_params(model, jax.random.key(0))
  run = simulators.make_lm_user_rollout(rollout_lib.oracle_policy(TASK), _simulator(model),
                                        batch=16, num_turns=TURNS, max_len=MAX_LEN)
  ro = run(None, params, jax.random.key(1))
  other = jax.tree_util.tree_map(lambda x: x * 1.5, params)
  with compile_counter as counter:  # new simulator params are an argument, not a constant
    jax.block_until_ready(run(None, other, jax.random.key(2)))
  assert counter.count == 0
  assert not np.asarray(ro.conv.overflow_B).any()
  # Replaying the policy's replies on the scripted user gives the state the rollout carried.
  user_turn = jax.jit(TASK.user_turn)
  want = TASK.init_sim(ro.conv.intent)
  for t in range(TURNS):
    reply, length = _replies(ro.conv, t, TASK.answer_len + 1)
    new = user_turn(ro.conv.intent, want, reply, length, jax.random.key(0))[3]
    want = jax.tree_util.tree_map(
        lambda n, o: jnp.where((length > 0).reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, want)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ro.sim.script, want)
  assert np.asarray(ro.sim.turns_B).sum() == np.asarray(ro.reply_lengths_BxT > 0).sum()
  # Policies and metrics read the scripted fields through the LM simulator's state.
  np.testing.assert_array_equal(ro.sim.known_BxK, want.known_BxK)
  m = scoring.episode_metrics(TASK, ro.conv, ro.sim)
  np.testing.assert_array_equal(m["score"], want.score_B)


def test_lm_policy_rollout_hides_the_goal(model, compile_counter):
  policy = rollout_lib.lm_policy(model, sampling.SamplingConfig(
      max_new_tokens=6, stop_tokens=(TASK.eot_id,)), chunk_width=24, max_turns=TURNS)
  run = simulators.make_lm_user_rollout(policy, _simulator(model), batch=8, num_turns=TURNS,
                                        max_len=MAX_LEN)
  pol_params = tfm.init_params(model, jax.random.key(3))
  sim_params = tfm.init_params(model, jax.random.key(4))
  ro = run(pol_params, sim_params, jax.random.key(5))
  with compile_counter as counter:
    jax.block_until_ready(run(pol_params, sim_params, jax.random.key(6)))
  assert counter.count == 0
  conv, view = ro.conv, ro.sim.view
  assert int(np.asarray(ro.reply_lengths_BxT).sum()) > 0
  goal = np.asarray(simulators.goal_tokens(TASK, conv.intent))
  g = goal.shape[1]
  np.testing.assert_array_equal(np.asarray(view.tokens_BxL)[:, 1:1 + g], goal)
  # The simulator's view is exactly the policy's conversation with the goal inserted: the goal
  # reaches the simulator's tokens and nothing the policy reads (random weights may still
  # sample any word, so this is checked by construction, not by searching for goal words).
  rendered = simulators.view_of(TASK, conv)
  for field in ("tokens_BxL", "roles_BxL", "turns_BxL", "cursor_B"):
    np.testing.assert_array_equal(getattr(rendered, field), getattr(view, field), err_msg=field)
  system = TASK.tokenizer.token_to_id("<system>")
  count = lambda x: (np.asarray(x) == system).sum(1)
  np.testing.assert_array_equal(count(view.tokens_BxL), count(conv.tokens_BxL) + 1)
  # Every user turn the LM wrote ends with <eot> in what the policy reads.
  user = np.asarray(conv.roles_BxL) == USER
  last_user = user & ~np.pad(user[:, 1:], ((0, 0), (0, 1)))
  assert (np.asarray(conv.tokens_BxL)[last_user] == TASK.eot_id).all()


def _tiny_config(**overrides):
  c = sim_sft_config.get_config("runlocal")
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.batch_size = 16
  c.num_turns = TURNS
  c.max_len = MAX_LEN
  c.num_steps = 40
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 5
  c.log_every = 10
  c.eval_every = 40
  c.eval_batch_size = 16
  c.checkpoint.every_steps = 20
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_config_errors_come_before_compilation():
  with pytest.raises(ValueError, match="vocab_size"):
    sim_sft.check_config(_tiny_config(**{"model.vocab_size": 16}))
  with pytest.raises(ValueError, match="max_len"):
    sim_sft.check_config(_tiny_config(max_len=12))
  with pytest.raises(ValueError, match="behaviour"):
    sim_sft.check_config(_tiny_config(**{"behaviour.oracle": -1.0}))


def test_sft_raises_agreement_and_resumes(tmp_path):
  config = _tiny_config()
  workdir = str(tmp_path / "run")
  first = sim_sft.train(config, workdir)
  assert first["how"] == "fresh"
  # A restart finds the last checkpoint (episodes depend on (seed, step) only, so a run resumed
  # mid-way continues on the same data); with no step left, it compiles nothing.
  again = sim_sft.train(config, workdir)
  assert again["how"] == f"resumed step {config.num_steps}"
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(first["state"].params),
                         jax.device_get(again["state"].params))
  rows = {r["step"]: r for r in metrics_lib.read_jsonl(f"{workdir}/metrics.jsonl")}
  before, after = rows[0], rows[config.num_steps]
  assert before["eval_token_acc"] < 0.2
  assert after["eval_token_acc"] > before["eval_token_acc"] + 0.4
  assert after["rollout_done_match"] > before["rollout_done_match"]
  assert after["loss"] < rows[10]["loss"]


# ------------------------------------------------------------------------------------------------
# RolePlaySimulator on a tiny random Llama checkpoint with a Llama-3-style chat template.
# ------------------------------------------------------------------------------------------------

LLAMA3_TEMPLATE = hf_models.LLAMA3_TEMPLATE
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
GOAL = "Work out what 3 apples cost at 2 dollars each, for my shopping list."
TARGET = "They cost 6 dollars."


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([simulators.ROLE_PLAY_PROMPT, GOAL, TARGET], trainer)
  folder = tmp_path_factory.mktemp("roleplay")
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0],
                                              eos_token=SPECIALS[1])
  fast.chat_template = LLAMA3_TEMPLATE
  fast.save_pretrained(folder)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=4096)
  transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
  return folder


def test_role_play_keeps_the_goal_from_the_policy(hf_folder):
  sim = simulators.RolePlaySimulator(hf_folder, sampling.SamplingConfig(max_new_tokens=8))
  chat = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "How much do my apples cost?"},
          {"role": "assistant", "content": "How many apples, and at what price?"}]
  text, done = sim.reply(GOAL, chat, jax.random.key(0), target=TARGET)
  assert isinstance(text, str) and isinstance(done, bool)
  messages = sim.messages(GOAL, chat, TARGET)
  prompt = sim.tokenizer.render(messages, add_generation_prompt=True)
  assert GOAL in prompt and TARGET in prompt and simulators.TERMINATE in prompt
  # Roles swap: the policy's turns are the simulator's "user" turns, and its own system prompt
  # is not shown to the simulated user.
  assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
  assert "helpful assistant" not in prompt
  seen_by_policy = [*chat, {"role": "user", "content": text}]
  assert not any(GOAL in m["content"] or TARGET in m["content"] for m in seen_by_policy)
  assert simulators.finish_reply("Great, thanks! [[TERMINATE CHAT]]") == ("Great, thanks!", True)
  assert simulators.finish_reply("Three apples.") == ("Three apples.", False)
