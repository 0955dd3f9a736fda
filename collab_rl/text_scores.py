"""R* of language-tier conversations, on the host between jitted phases, as CollabLLM defines it.

    R*(t | g) = w_ext * R_ext(t, g) - min(token_cost * tokens_read(t), 1) + w_int * R_int(t)

R_ext is the record's verifier on the assistant's last message (`tasks/verifiers.py`: answer
matching, BLEU, sandboxed tests) or, for records without one, an LM judge that sees the goal and
the reference (`accuracy`); tokens_read are the policy's tokens (what the user reads); R_int is
an LM judge of the assistant's part of the conversation that sees the conversation alone, never
the goal (CollabLLM's interactivity judge), rescaled to [0, 1]. The helpfulness next-turn
baseline is a judge of the last reply that sees the goal.

Judges (`Judge`) read next-token probabilities of single-token ratings (`reward_model.LMJudge`);
"1".."9" are single tokens in Llama-3's and Qwen2's vocabularies alike (Qwen2 splits "10"), and
letters or words work as well. The probability mass a judge puts on its ratings is reported with
every rating (`judge/<aspect>_mass`), and below `min_mass` it is also logged as a warning: a
judge that does not follow the format rates noise, and nothing says so otherwise.

Everything runs once per batch of finished conversations (a PPO iteration's rollouts and all of
MR's futures together), never once per turn: the conversations are decoded to text once, the
verifiers run over them (sandboxed tests in a few threads), the judges in padded batches
(prompt widths bucketed so that a run compiles a judge a few times, not once per batch).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import os
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from collab_rl import reward_model as rm
from collab_rl import rewards
from collab_rl import sharding as sharding_lib
from collab_rl import tokenizer as tokenizer_lib
from collab_rl.models import hf
from collab_rl.models.transformer import Transformer
from collab_rl.tasks import verifiers
from collab_rl.tokenizer import ASSISTANT, USER

DEFAULT_RATINGS = tuple(str(i) for i in range(1, 10))
PROMPT_BUCKET = 128  # judge prompt widths are rounded up to a multiple of this
ROW_BUCKET = 16  # and their batches


def chat(tok: tokenizer_lib.Tokenizer, conv, row: int) -> list[dict[str, str]]:
  """One row of a host-side `Conversation` as chat messages: each message's user or assistant
  tokens (template headers and special tokens dropped), in order."""
  n = int(conv.cursor_B[row])
  toks = np.asarray(conv.tokens_BxL[row, :n])
  roles, turns = np.asarray(conv.roles_BxL[row, :n]), np.asarray(conv.turns_BxL[row, :n])
  names = {USER: "user", ASSISTANT: "assistant"}
  out = []
  for t in np.unique(turns[np.isin(roles, list(names))]):
    sel = (turns == t) & np.isin(roles, list(names))
    text = tok.decode(toks[sel].tolist(), skip_special_tokens=True).strip()
    out.append({"role": names[int(roles[sel][0])], "content": text})
  return out


def last_reply(messages: Sequence[dict[str, str]]) -> str:
  replies = [m["content"] for m in messages if m["role"] == "assistant"]
  return replies[-1] if replies else ""


@dataclasses.dataclass
class Judge:
  """A prompted LM judge with its params, ready to rate chats (see the module docstring)."""
  lm: rm.LMJudge
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  ratings: tuple[str, ...]
  min_mass: float = 0.5
  rows_multiple: int = 1  # batches are padded to a multiple of this (the mesh's data x fsdp)

  def rate(self, chats: Sequence[Sequence[dict]], aspect: str, *,
           goals: Sequence[str] | None = None, references: Sequence[str] | None = None,
           whole: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(rating_N in [0, 1], mass_N) of each chat for `aspect`."""
    n = len(chats)
    prompts = [rm.judge_prompt(self.tokenizer, c, aspect, self.ratings, whole=whole,
                               goal=None if goals is None else goals[i],
                               reference=None if references is None else references[i])
               for i, c in enumerate(chats)]
    width = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
    limit = self.lm.model.cfg.max_position_embeddings
    if width > limit:
      width = max(len(p) for p in prompts)
      if width > limit:
        raise ValueError(f"a judge prompt of {width} tokens exceeds the judge's {limit} positions")
    step = ROW_BUCKET * self.rows_multiple // np.gcd(ROW_BUCKET, self.rows_multiple)
    rows = -(-n // step) * step
    empty = np.zeros((1,), np.int32)
    tokens, lengths = rm.pad_prompts([*prompts, *[empty] * (rows - n)], width,
                                     self.tokenizer.pad_id)
    out = sharding_lib.to_host(self.lm(self.params, tokens, lengths))
    rating, mass = np.asarray(out.rating_B)[:n], np.asarray(out.mass_B)[:n]
    if n and mass.mean() < self.min_mass:
      logging.warning("judge %s: mean probability on the rating tokens %s is %.3f < min_mass="
                      "%.2f: the judge does not follow the rating format, its ratings are noise",
                      aspect, list(self.ratings), mass.mean(), self.min_mass)
    return rating, mass


def load_judge(folder: str, ratings: Sequence[str] = DEFAULT_RATINGS, *, min_mass: float = 0.5,
               mesh: jax.sharding.Mesh | None = None, dtype: str | None = None,
               weights: bool = True, scan_layers: bool = False) -> Judge:
  """The judge of a Hugging Face folder; a missing folder or a rating word that is not one token
  of its vocabulary fails here, before anything compiles. `weights=False` reads none: the judge
  shares the policy's frozen reference, handed to it by `TextScorer.bind_judge`. `scan_layers`:
  its layers laid out as a policy with `model.scan_layers` holds them."""
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise FileNotFoundError(f"judge folder {folder!r}: no config.json there (expected a Hugging "
                            "Face checkpoint folder)")
  tok = tokenizer_lib.Tokenizer.from_pretrained(folder)
  try:
    ids = rm.rating_ids(tok, ratings)
  except ValueError as e:
    raise ValueError(f"judge {folder}: {e}") from None
  if weights:
    model, params = hf.load_pretrained(folder, dtype, mesh, scan_layers=scan_layers)
  else:
    model = Transformer(dataclasses.replace(hf.folder_config(folder, dtype),
                                            scan_layers=scan_layers))
    params = None
  rows = 1 if mesh is None else sharding_lib.data_parallel_size(mesh)
  return Judge(rm.LMJudge(model, ids, mesh=mesh), params, tok, tuple(ratings), min_mass, rows)


class TextScorer:
  """R* and the episode metrics of a `TextTask`'s conversations (see the module docstring).

  judge: the interactivity / helpfulness / accuracy judge (None: none configured; R_int is then
  0, and asking for a judged score fails when the scorer is built). metric: the verifier for
  records that name none ("auto": inferred from the metadata).
  """

  def __init__(self, task, rcfg: rewards.RewardConfig, judge: Judge | None = None, *,
               metric: str = "auto", timeout_s: float = 5.0, threads: int = 4):
    if metric != "auto" and metric not in verifiers.VERIFIERS:
      raise ValueError(f"metric={metric!r}; choose from {('auto', *verifiers.VERIFIERS)}")
    if rcfg.w_int and judge is None:
      raise ValueError(f"reward.w_int={rcfg.w_int} scores interactivity with an LM judge: set "
                       "config.judge.folder (or w_int=0)")
    if metric == "judge" and judge is None:
      raise ValueError("metric='judge' scores the task with an LM judge: set config.judge.folder")
    self.task, self.rcfg, self.judge = task, rcfg, judge
    self.metric, self.timeout_s, self.threads = metric, timeout_s, threads

  def bind_judge(self, params) -> "TextScorer":
    """This scorer with its judge's weights `params` (a judge that shares the policy's base)."""
    bound = copy.copy(self)
    bound.judge = dataclasses.replace(self.judge, params=params)
    return bound

  def chats(self, conv) -> list[list[dict[str, str]]]:
    return [chat(self.task.tokenizer, conv, r) for r in range(conv.tokens_BxL.shape[0])]

  def task_scores(self, chats, records, rows) -> tuple[np.ndarray, dict[str, float]]:
    """R_ext per conversation: verifiers where the record has one, else the accuracy judge."""
    names = [verifiers.verifier(records[r].get("single_turn_metadata") or {}, self.metric)
             for r in rows]
    out, stats = np.zeros((len(chats),), np.float32), {}
    judged = [i for i, v in enumerate(names) if v == "judge"]
    if judged and self.judge is None:
      raise ValueError(f"record at line {records[rows[judged[0]]].get('line')} has no verifier "
                       "(single_turn_metadata.verifier='judge'): set config.judge.folder")
    verified = [i for i, v in enumerate(names) if v != "judge"]
    work = lambda i: verifiers.score(names[i], last_reply(chats[i]), records[rows[i]],
                                     self.timeout_s)
    if any(names[i] == "tests" for i in verified):
      with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
        out[verified] = list(pool.map(work, verified))
    else:
      out[verified] = [work(i) for i in verified]
    if judged:
      rating, mass = self.judge.rate(
          [chats[i] for i in judged], "accuracy", whole=True,
          goals=[records[rows[i]]["single_turn_prompt"] for i in judged],
          references=[records[rows[i]]["single_turn_completion"] for i in judged])
      out[judged] = rating
      stats["judge/accuracy_mass"] = float(mass.mean())
    return out, stats

  def interactivity(self, chats) -> tuple[np.ndarray, dict[str, float]]:
    """R_int in [0, 1] from the judge, which sees the conversation alone; 0 without a judge."""
    if self.judge is None or not chats:
      return np.zeros((len(chats),), np.float32), {}
    rating, mass = self.judge.rate(chats, "interactivity", whole=True)
    return rating.astype(np.float32), {"judge/interactivity_mass": float(mass.mean())}

  def helpfulness(self, conv, records) -> tuple[np.ndarray, dict[str, float]]:
    """The next-turn helpfulness baseline: a judge of the last reply that sees the goal."""
    if self.judge is None:
      raise ValueError("reward.kind='helpfulness' rates replies with an LM judge: set "
                       "config.judge.folder")
    chats, rows = self.chats(conv), np.asarray(conv.intent.row_B)
    rating, mass = self.judge.rate(chats, "helpfulness",
                                   goals=[records[r]["single_turn_prompt"] for r in rows])
    return rating, {"judge/helpfulness_mass": float(mass.mean())}

  def score(self, conv, records, *, with_int: bool = True,
            chats=None) -> tuple[np.ndarray, dict, dict]:
    """(R*_N, its parts {r_ext, r_int, token_cost, tokens_read} [N], judge stats) of host-side
    conversations; row i is record `conv.intent.row_B[i]` of `records`. `chats`: the
    conversations already decoded (`chats(conv)`)."""
    chats = self.chats(conv) if chats is None else chats
    rows = np.asarray(conv.intent.row_B)
    r_ext, stats = self.task_scores(chats, records, rows)
    r_int = np.zeros_like(r_ext)
    if with_int and self.rcfg.w_int:
      r_int, more = self.interactivity(chats)
      stats.update(more)
    tokens = np.sum(np.asarray(conv.roles_BxL) == ASSISTANT, 1)
    cost = np.minimum(self.rcfg.token_cost * tokens, 1.0)
    total = self.rcfg.w_ext * r_ext - cost + self.rcfg.w_int * r_int
    parts = {"r_ext": r_ext, "r_int": r_int, "token_cost": cost, "tokens_read": tokens}
    return total.astype(np.float32), parts, stats

  def episode_metrics(self, conv, sim, records) -> tuple[dict[str, np.ndarray], dict]:
    """Per-conversation metrics of finished episodes (the keys of `scoring.episode_metrics`
    where they mean the same, R* as `reward`, and what the LM user did) and the judges' stats.
    The first reply asks when it holds a question mark; ambiguity is the record's own label
    (`ambiguity_known` marks the rows that have one); interactivity is nan without a judge."""
    chats = self.chats(conv)
    total, parts, stats = self.score(conv, records, chats=chats)
    if self.judge is not None and not self.rcfg.w_int:
      parts["r_int"], more = self.interactivity(chats)
      stats.update(more)
    elif self.judge is None:
      parts["r_int"] = np.full((len(chats),), np.nan, np.float32)
    roles = np.asarray(conv.roles_BxL)
    first = [next((m["content"] for m in c if m["role"] == "assistant"), "") for c in chats]
    asked = np.asarray(["?" in f for f in first])
    amb = np.asarray(conv.intent.ambiguous_B)
    return {
        "score": parts["r_ext"], "interactivity": parts["r_int"], "reward": total,
        "tokens_read": parts["tokens_read"], "tokens_typed": np.sum(roles == USER, 1),
        "turns": np.asarray([sum(m["role"] == "assistant" for m in c) for c in chats]),
        "ambiguous": amb == 1, "ambiguity_known": amb >= 0,
        "asked_first": asked, "answered_first": ~asked & np.asarray([bool(f) for f in first]),
        "solved": np.asarray(sim.ended_B, bool), "overflow": np.asarray(conv.overflow_B, bool),
        "user_ended": np.asarray(sim.ended_B, bool),
        "user_confused": np.asarray(sim.confused_B) > 0, "user_cut": np.asarray(sim.cut_B) > 0,
    }, stats


def score_live(scorer: TextScorer, pending, live_N, records, kind: str = "mr"
               ) -> tuple[np.ndarray, dict[str, float]]:
  """Rewards of played conversations (`text.played` of N rows, on the host or the device)
  under reward `kind`: R* (mr, next_turn_ext_int, final), the task score alone
  (next_turn_ext) or the helpfulness judge; rows not `live_N` are not scored and get 0."""
  conv, _ = sharding_lib.to_host(pending)
  live = np.asarray(live_N, bool)
  conv = jax.tree_util.tree_map(lambda x: x[live], conv)
  stats = {}
  if kind == "helpfulness":
    r, stats = scorer.helpfulness(conv, records)
  elif kind == "next_turn_ext":
    r = scorer.score(conv, records, with_int=False)[1]["r_ext"]
  else:
    r, _, stats = scorer.score(conv, records)
  out = np.zeros(live.shape, np.float32)
  out[live] = r
  return out, stats


def from_config(config, task, mesh=None, judge_weights: bool = True) -> TextScorer:
  """The scorer of an experiment config: `reward`'s weights, `metric`, and the judge of
  `judge.folder` where one is set (loaded here unless `judge_weights` is False: see
  `load_judge`; a bad folder or rating word fails here)."""
  j = config.judge
  judge = None
  if j.folder:
    judge = load_judge(j.folder, tuple(j.ratings.split(",")), min_mass=j.min_mass, mesh=mesh,
                       weights=judge_weights, scan_layers=bool(
                           (config.get("model") or {}).get("scan_layers", False)))
  return TextScorer(task, rewards.RewardConfig.from_config(config.reward), judge,
                    metric=config.metric)
