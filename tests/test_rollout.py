"""Rollouts: the LM policy against the scripted user, on device, with consistent log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_rl import conversation as conv_lib
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl import sharding as sharding_lib
from collab_rl.models import transformer as tfm
from collab_rl.tasks.ambig_math import AmbigMath
from collab_rl.tokenizer import ASSISTANT

TASK = AmbigMath()
MAX_LEN = 64


@pytest.fixture(scope="module")
def policy_and_params():
  cfg = tfm.TransformerConfig(vocab_size=TASK.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  model = tfm.Transformer(cfg)
  params = tfm.init_params(model, jax.random.key(0))
  return model, params


def _lm_rollout(model, batch, **kw):
  policy = rollout_lib.lm_policy(model, sampling.SamplingConfig(
      max_new_tokens=8, temperature=1.0, stop_tokens=(TASK.eot_id,)))
  return rollout_lib.make_rollout(policy, TASK, batch=batch, num_turns=3, max_len=MAX_LEN, **kw)


def test_lm_rollout_logprobs_match_a_teacher_forced_pass(policy_and_params, compile_counter):
  model, params = policy_and_params
  run = _lm_rollout(model, 8)
  ro = run(params, jax.random.key(1))
  with compile_counter as counter:
    jax.block_until_ready(run(params, jax.random.key(2)))
  assert counter.count == 0
  conv = ro.conv
  logits = model.apply({"params": params}, conv.tokens_BxL,
                       valid_BxL=conv_lib.valid_mask(conv)).logits_BxLxV
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  target = jnp.take_along_axis(logp, conv.tokens_BxL[:, 1:, None], -1)[..., 0]
  is_asst = conv.roles_BxL[:, 1:] == ASSISTANT
  assert int(is_asst.sum()) > 0
  np.testing.assert_allclose(np.where(is_asst, target, 0), ro.logprobs_BxL[:, 1:], atol=1e-4)
  # The reply lengths add up to the assistant tokens of each row.
  np.testing.assert_array_equal(ro.reply_lengths_BxT.sum(1), is_asst.sum(1))


def test_finished_rows_stop_changing():
  oracle = rollout_lib.oracle_policy(TASK)
  short = rollout_lib.make_rollout(oracle, TASK, batch=64, num_turns=3, max_len=MAX_LEN)
  long = rollout_lib.make_rollout(oracle, TASK, batch=64, num_turns=6, max_len=MAX_LEN)
  a, b = short(None, jax.random.key(3)), long(None, jax.random.key(3))
  done = np.asarray(a.conv.done_B)
  assert done.any()
  np.testing.assert_array_equal(np.asarray(a.conv.tokens_BxL)[done],
                                np.asarray(b.conv.tokens_BxL)[done])
  np.testing.assert_array_equal(np.asarray(a.sim.score_B)[done], np.asarray(b.sim.score_B)[done])
  np.testing.assert_array_equal(np.asarray(b.reply_lengths_BxT)[done][:, 3:], 0)


def test_one_device_and_eight_devices_agree(policy_and_params):
  model, params = policy_and_params
  one = _lm_rollout(model, 16)(params, jax.random.key(4))
  mesh = sharding_lib.make_mesh((4, 2, 1))
  p_sh = jax.device_put(params, sharding_lib.param_shardings(params, mesh))
  many = _lm_rollout(model, 16, mesh=mesh)(p_sh, jax.random.key(4))
  assert many.conv.tokens_BxL.sharding.shard_shape((16, MAX_LEN)) == (2, MAX_LEN)
  np.testing.assert_array_equal(one.conv.tokens_BxL, many.conv.tokens_BxL)
  np.testing.assert_allclose(one.logprobs_BxL, many.logprobs_BxL, atol=1e-5)


def test_transcript_reads_as_text():
  ro = rollout_lib.make_rollout(rollout_lib.oracle_policy(TASK), TASK, batch=4, num_turns=4,
                                max_len=MAX_LEN)(None, jax.random.key(5))
  text = conv_lib.decode(ro.conv, TASK.tokenizer)
  assert all(t.startswith("<bos>\n<user> calc") for t in text)
  assert any("<assistant> ask" in t for t in text) and all("answer" in t for t in text)
