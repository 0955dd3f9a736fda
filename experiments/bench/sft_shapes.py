"""What the base's SFT data holds, and what the base learned of each conversation shape.

  python -m experiments.bench.sft_shapes --task ambig_math \
      --base runs/headline/ambig_math/seed0/sft_base --out bench_out/sft_shapes.json

Three tables, per conversation shape:
- `data`: the share of each shape in the SFT data of the base's config (its `behaviour`
  mixture played against the scripted user, as `trainers/sft.py` trains on it);
- `loss`: the base's teacher-forced loss on the ANSWER replies of those conversations (what an
  answer costs it after a question, after `wrong`, after an unasked revelation);
- `slot_loss`: for conversations that asked about ONE missing piece, per slot that was missing,
  the largest token loss of the answer (the token that should copy the user's reply): near
  log(#values) for a slot means the base ignores the user's answer there and guesses;
- `played`: the base itself (greedy) and the oracle, on held-out episodes with the training
  user and with the sharded one: the score per shape, from `scoring.after_asking`.

Shapes are not exclusive: `clear` (nothing missing), `asked_<n>` (the first reply asks, n pieces
missing), `guessed_<n>` (the first reply answers, n missing), `feedback` (an answer after
`wrong`), `revealed` (a user turn revealed a piece unasked: sharded mode or feedback reveals),
`asked_<n>_revealed` (asked, and a user turn revealed a piece unasked: the sharded user's reply
to a question carries two pieces), `instructed` (the request opens with `clarify`).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from collab_rl import losses
from collab_rl import restore as restore_lib
from collab_rl import rollout as rollout_lib
from collab_rl import sampling
from collab_rl import sft as sft_lib
from collab_rl.models import transformer
from collab_rl.tasks import registry, scoring, slots
from collab_rl.tokenizer import ASSISTANT, PAD, USER
from collab_rl.trainers import sft
from experiments import collab_arms

flags.DEFINE_string("task", "ambig_math", "Task.")
flags.DEFINE_enum("size", "small", list(collab_arms.SIZES), "The base's size (its config).")
flags.DEFINE_string("base", "", "A trained base's run directory (its checkpoints are read); "
                    "empty: the data table only.")
flags.DEFINE_integer("batches", 16, "SFT batches to classify.")
flags.DEFINE_integer("episodes", 512, "Held-out episodes played per user.")
flags.DEFINE_string("out", "bench_out/sft_shapes.json", "JSON output.")
FLAGS = flags.FLAGS


def shapes(task, ro) -> dict[str, np.ndarray]:
  """[B] bool per shape (see the module docstring)."""
  conv, sim = ro.conv, ro.sim
  intent = conv.intent
  n_missing = np.asarray(jnp.sum(intent.missing_BxK, 1))
  amb = np.asarray(intent.ambiguous_B)
  asked = np.asarray(sim.first_action_B) == slots.ASKED
  answered = np.asarray(sim.first_action_B) == slots.ANSWERED
  toks, roles = np.asarray(conv.tokens_BxL), np.asarray(conv.roles_BxL)
  user = roles == USER
  wrong = np.any(user & (toks == task.ids["wrong"]), 1)
  revealed = np.any(user & (toks == task.ids["also"]), 1)
  answers = np.asarray(sim.answers_B)
  out = {"clear": ~amb, "feedback": wrong & (answers >= 2), "revealed": revealed}
  for n in (1, 2):
    out[f"asked_{n}"] = amb & asked & (n_missing == n)
    out[f"guessed_{n}"] = amb & answered & (n_missing == n)
    # The sharded user's reply to a question also reveals the next piece ("... also ...").
    out[f"asked_{n}_revealed"] = out[f"asked_{n}"] & revealed
  if intent.instructed_B is not None:
    out["instructed"] = np.asarray(intent.instructed_B, bool)
  return out


def answer_mask(task, tokens_BxL, roles_BxL) -> jax.Array:
  """[B, L] assistant tokens of replies that begin with `answer`."""
  asst = roles_BxL == ASSISTANT
  start = asst & ~jnp.pad(asst[:, :-1], ((0, 0), (1, 0)))
  is_answer_start = start & (tokens_BxL == task.ids["answer"])
  # A reply's id: the count of reply starts so far; it is an answer if its start was one.
  reply_id = jnp.cumsum(start, 1)
  answer_id = jnp.where(is_answer_start, reply_id, 0)
  # Propagate within the reply: the answer start's id equals the reply id of its tokens.
  last_answer_start = jax.lax.cummax(answer_id, axis=1)
  return asst & (last_answer_start == reply_id) & (reply_id > 0)


def main(argv):
  del argv
  config = collab_arms.get_config(f"arm=sft_base,task={FLAGS.task},size={FLAGS.size}")
  data_task = sft.data_task(config)
  policy = sft_lib.AskOrAnswerMix(data_task, config.ask_share, config.instructed_ask_share,
                                  config.instructed_confirm_share, config.context_ask_share)
  play = jax.jit(lambda k: sft.behaviour_rollout(policy, data_task, config, k))
  counts, total, batches = {}, 0, []
  for i in range(FLAGS.batches):
    ro, roles_BxL = play(jax.random.fold_in(jax.random.key(config.seed), i))
    batches.append((ro, roles_BxL))
    sh = shapes(data_task, ro)
    # Answers after a question the loss does not train (the question is context).
    sh["context_asked"] = np.any((np.asarray(roles_BxL) != np.asarray(ro.conv.roles_BxL)), 1)
    for k, v in sh.items():
      counts[k] = counts.get(k, 0) + int(v.sum())
    total += config.batch_size
  report = {"task": FLAGS.task, "size": FLAGS.size, "conversations": total,
            "data": {k: v / total for k, v in sorted(counts.items())}}
  print("SFT data shares:", json.dumps(report["data"], indent=1))

  if FLAGS.base:
    ckpt = os.path.join(os.path.abspath(FLAGS.base), "checkpoints")
    saved = restore_lib.read_config(ckpt)
    model = transformer.Transformer(transformer.TransformerConfig.from_dict(saved["model"]))
    abstract = jax.eval_shape(lambda: transformer.init_params(model, jax.random.key(0)))
    params = restore_lib.restore_params(ckpt, abstract)

    @jax.jit
    def answer_nll(params, tokens_BxL, roles_BxL):
      logits = model.apply({"params": params}, tokens_BxL, valid_BxL=roles_BxL != PAD,
                           heads=("lm",)).logits_BxLxV
      mask = answer_mask(data_task, tokens_BxL, roles_BxL)  # answers only: never a question
      nll_BxL = -losses.token_logprobs(logits, tokens_BxL) * mask
      return nll_BxL.sum(1) / jnp.maximum(mask.sum(1), 1), mask.sum(1), nll_BxL.max(1)

    loss_sum, loss_n, slot_sum, slot_n = {}, {}, {}, {}
    for ro, roles_BxL in batches:
      nll_B, n_B, max_B = (np.asarray(x)
                           for x in answer_nll(params, ro.conv.tokens_BxL, roles_BxL))
      sh = shapes(data_task, ro)
      for k, v in sh.items():
        sel = v & (n_B > 0)
        loss_sum[k] = loss_sum.get(k, 0.0) + float(nll_B[sel].sum())
        loss_n[k] = loss_n.get(k, 0) + int(sel.sum())
      missing_BxK = np.asarray(ro.conv.intent.missing_BxK)
      for b in np.flatnonzero(sh["asked_1"] & (n_B > 0)):
        slot = data_task.slots[int(np.argmax(missing_BxK[b]))].name
        slot_sum[slot] = slot_sum.get(slot, 0.0) + float(max_B[b])
        slot_n[slot] = slot_n.get(slot, 0) + 1
    report["loss"] = {k: loss_sum[k] / loss_n[k] if loss_n[k] else float("nan")
                      for k in sorted(loss_sum)}
    print("answer loss per shape:", json.dumps(report["loss"], indent=1))
    # A guess among the slot's values costs log(#values): the mark of an answer ignored.
    report["slot_loss"] = {s.name: {"max_token_nll": slot_sum[s.name] / slot_n[s.name],
                                    "guess_nll": float(np.log(len(s.values))),
                                    "n": slot_n[s.name]}
                           for s in data_task.slots if s.name in slot_n}
    print("asked about one piece, largest answer-token loss per missing slot:",
          json.dumps(report["slot_loss"], indent=1))

    report["played"] = {}
    for user in ("reactive", "sharded"):
      task = registry.config_task(config)
      task = type(task)(dataclass_replace(task.sim, sharded=user == "sharded"))
      sc = sampling.SamplingConfig(max_new_tokens=task.answer_len + 3, greedy=True,
                                   stop_tokens=(task.eot_id,))
      lm = rollout_lib.lm_policy(model, sc, chunk_width=rollout_lib.chunk_width(task),
                                 max_turns=config.num_turns)
      proactive = type(task)(dataclass_replace(task.sim, instruction_rate=1.0,
                                               sharded=user == "sharded"))
      for name, pol, t, p in (("base", lm, task, params), ("proactive_base", lm, proactive, params),
                              ("oracle", rollout_lib.oracle_policy(task), task, None)):
        ro = jax.jit(lambda p, k: rollout_lib.rollout(
            pol, t, p, k, FLAGS.episodes, num_turns=config.num_turns,
            max_len=rollout_lib.conversation_len(t, config.num_turns, t.answer_len + 3)))(
                p, jax.random.key(12345))
        m = {k: np.asarray(v) for k, v in scoring.episode_metrics(t, ro.conv, ro.sim).items()}
        row = {"score": float(m["score"].mean())}
        row.update({k: v["mean"] for k, v in scoring.after_asking(m).items()})
        sh = shapes(t, ro)
        row.update({f"score_{k}": float(m["score"][v].mean()) if v.any() else float("nan")
                    for k, v in sh.items()})
        report["played"][f"{name}@{user}"] = row
    print("played:", json.dumps(report["played"], indent=1))
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(report, f, indent=1)
  print("wrote", FLAGS.out)


def dataclass_replace(cfg, **kw):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(cfg, **kw)


if __name__ == "__main__":
  app.run(main)
