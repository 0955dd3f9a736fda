"""MR evaluations per second on the language tier, against a CollabLLM-style host loop.

  python -m experiments.bench.text_mr --out bench_out/text_mr.json

One random Llama-3-style Hugging Face folder (byte-level BPE trained here on the records' texts,
Llama-3 chat template; width 256, 4 layers, 8/2 heads, fp32) plays both the policy and the user
(the same weights on both sides); B CollabLLM records of arithmetic requests (half of them
underspecified), the user prompted with CollabLLM's role-play prompt and the reference answer.
An MR evaluation is one candidate reply (the policy's first reply to the record) and its S
futures of w more turns: the user's answer, then w (policy, user) exchanges. Budgets: a reply
`--reply_tokens`, a user turn `--user_tokens`; both sides sample at temperature 1 (no top-k or
top-p) and stop at the template's end of turn (or end of text). With random weights a turn
rarely stops early and no user ends the chat: every turn runs near its budget.

- collab_rl: `TextTask.encode` of the records, then one jitted call (the opening's prefill, the
  candidate reply, `rewards.play_futures` for all B x S futures on the user's and the policy's
  KV caches, tiled rather than recomputed), and the played conversations brought to the host.
- host loop (CollabLLM's way): for each reply and each future, turn by turn, the chat rendered
  with the template as text, tokenized, `generate` (transformers, torch fp32), decoded and
  appended; every turn re-renders and re-prefills the whole chat. Also batched over the S
  futures of one reply (left padding), and batched over all B x S futures of the batch at once
  (the strongest peer a host loop can be). Before every round torch runs a short calibration at
  each of `--threads` (1 and 2) thread counts and keeps the faster: on an idle 2-core machine
  that is 2, but where other work shares the cores 2 threads were 3-20x slower than 1 here,
  which would flatter collab_rl. The JSON records the choice and the machine's load average.

Both are timed with and without scoring: the record's answer-match verifier on each future's
last reply and the token cost (`text_scores.TextScorer.score` on our conversations, the same
`verifiers.score` on the host loop's texts). Rates are B / wall time, medians of `--repeats`
rounds in which every side runs once, in turn (compilation and warm-up excluded); ratios are
per round, reported as median and range. The per-reply host loops run on the batch's first
`--host_replies` records (their cost per reply does not depend on B). `play_cpu` is the
process's CPU time during a side's play: over its wall time, the cores it kept busy (XLA ran
these programs on about one core; `--host_devices 2` splits collab_rl's rows over two XLA CPU
devices).

Measured 2026-12-06 on the 2-core AMD EPYC box with other work running (load average 4-5; torch
picked 1 thread every round, each side kept about one core busy), w = 2, S = 3, median (range)
of 3 rounds: B = 8: 5.1 MR/s, 10.0x (9.7-10.6) the sequential host loop, 6.5x (6.1-6.6) the
futures-batched one, 4.0x (3.8-4.1) the all-batched one; B = 32: 4.7 MR/s, 10.5x (8.5-11.5),
6.2x (5.4-6.3), 4.2x (4.0-4.6). Scoring (answer match) costs under 2% on either side.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import statistics
import tempfile
import time

from absl import app, flags

from experiments.bench import common

def define_flags() -> None:
  """The command line (defined when run as a script, so that importing this module in a test
  beside other benchmarks defines no flag twice)."""
  flags.DEFINE_string("out", "bench_out/text_mr.json", "Where the JSON goes.")
  flags.DEFINE_list("batches", ["8", "32"], "Candidate replies per call (B).")
  flags.DEFINE_integer("reply_tokens", 32, "Budget of one assistant reply.")
  flags.DEFINE_integer("user_tokens", 24, "Budget of one user turn (sim.max_user_len).")
  flags.DEFINE_integer("window", 2, "MR's forward turns (w).")
  flags.DEFINE_integer("samples", 3, "MR's futures per reply (S).")
  flags.DEFINE_integer("samples_chunk", 0, "Futures of a reply played at once "
                       "(reward.samples_chunk; 0: all S).")
  flags.DEFINE_integer("repeats", 3, "Timed rounds (median reported).")
  flags.DEFINE_integer("host_replies", 4, "Replies timed in the per-reply loops.")
  flags.DEFINE_list("threads", ["1", "2"], "Torch thread counts tried before every "
                    "round; the host loop runs the round with the fastest (XLA uses the "
                    "machine's cores).")
  flags.DEFINE_integer("width", 256, "Model width (intermediate 2.69x, heads width/32).")
  flags.DEFINE_integer("layers", 4, "Model layers.")
  flags.DEFINE_integer("host_devices", 1, "XLA CPU devices collab_rl's rows are "
                       "split over (data parallel); 1: one device.", lower_bound=1)


OPS = ("+", "-", "*")
HOST_SIDES = ("host_sequential", "host_batched_futures", "host_batched_all")


def make_records(n: int, seed: int = 0) -> list[dict]:
  """CollabLLM-format records: half ask for `a op ?` without saying the second number."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice(OPS)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    ambiguous = i % 2 == 0
    request = (f"Can you work out {a} {op} a number for me?" if ambiguous
               else f"What is {a} {op} {b}?")
    out.append({"single_turn_prompt": f"What is {a} {op} {b}?",
                "single_turn_completion": f"The answer is {value}.",
                "single_turn_metadata": {"verifier": "answer", "answer": str(value),
                                         "ambiguous": ambiguous},
                "turns": [{"role": "user", "content": request}],
                "line": i + 1, "source": "text_mr"})
  return out


def make_folder(folder: str, records: list[dict], width: int, layers: int) -> str:
  from collab_rl import simulators
  from experiments import hf_models

  texts = [f"{r['single_turn_prompt']} {r['turns'][0]['content']} {r['single_turn_completion']}"
           for r in records]
  texts += [simulators.ROLE_PLAY_PROMPT, simulators.OPENING, simulators.TARGET_LINE]
  tok = hf_models.train_tokenizer(texts, "llama3", 1024)
  cfg = hf_models.model_config(tok, "llama3", hidden_size=width,
                               intermediate_size=int(width * 2.6875), num_hidden_layers=layers,
                               num_attention_heads=max(width // 32, 1),
                               num_key_value_heads=max(width // 128, 1))
  return hf_models.save_folder(folder, tok, cfg, seed=0)


# ------------------------------------------------------------------------------------------------
# collab_rl: one jitted call for the B replies and their B x S futures.
# ------------------------------------------------------------------------------------------------


def make_ours(folder: str, records: list[dict], reply_tokens: int, user_tokens: int,
              window: int, samples: int, host_devices: int = 1, samples_chunk: int = 0):
  """(task, `run(records, key) -> (conv, user counts)` of the B x S futures on the host,
  scorer)."""
  import jax
  import ml_collections

  from collab_rl import rewards, run_rl, text_scores
  from collab_rl import sharding as sharding_lib
  from collab_rl import rollout as rollout_lib
  from collab_rl import tokenizer as tokenizer_lib
  from collab_rl.models import hf
  from collab_rl.tasks import text as text_lib

  # The opening's and the user prompt's widths are the records' longest (each row prefills them).
  tok = tokenizer_lib.Tokenizer.from_pretrained(folder)
  user = text_lib.UserSide(tok, text_lib.UserConfig(user_from=folder))
  request = max(len(tok.encode_chat([{"role": "user", "content": text_lib.first_request(r)}])[0])
                for r in records)
  prompt = max(len(user.prompt(r)) for r in records)
  config = ml_collections.ConfigDict(dict(
      tokenizer=folder, reply_tokens=reply_tokens, num_turns=1, temperature=1.0,
      sim=dict(user_from=folder, max_user_len=user_tokens, temperature=1.0, prompt="collabllm",
               show_target=True, max_request_tokens=request, max_prompt_tokens=prompt)))
  rcfg = rewards.RewardConfig(window=window, samples=samples, w_int=0.0,
                              samples_chunk=samples_chunk)
  task = text_lib.from_config(config, max_turns=rcfg.horizon(config.num_turns))
  model, params = hf.load_pretrained(folder)
  user_params = text_lib.load_user_params(task)
  mesh = None
  if host_devices > 1:
    mesh = sharding_lib.make_mesh((-1, 1, 1), devices=jax.devices()[:host_devices])
  if mesh is not None:  # rows split over the host devices, which read one copy of the weights
    params, user_params = sharding_lib.replicate_host_shared(
        jax.device_get((params, user_params)), sharding_lib.replicated(mesh))
  policy = run_rl.rollout_policy(config, model, task, rcfg)
  columns = run_rl.max_len(config, task, rcfg)

  @jax.jit
  def futures(params, user_params, intent, key):
    k_reply, k_mr = jax.random.split(key)
    sim_task = task.bind(user_params)
    conv, sim = rollout_lib.start(sim_task, intent, columns)
    if mesh is not None:
      conv, sim = jax.lax.with_sharding_constraint((conv, sim), sharding_lib.batch_sharding(mesh))
    pstate = policy.init(params, conv, rollout_lib.opening_width(sim_task))
    conv = rollout_lib.open_reply(sim_task, conv)
    reply, _, reply_len, pstate = policy(params, conv, sim, pstate, k_reply)
    return rewards.play_futures(policy, sim_task, params, conv, sim, pstate, reply, reply_len,
                                k_mr, rcfg, keep=text_lib.played)

  scorer = text_scores.TextScorer(task, rcfg, metric="answer")

  def run(records, key):
    intent = task.encode(records)
    if mesh is not None:
      intent = sharding_lib.shard_batch(intent, mesh)
    return jax.device_get(futures(params, user_params, intent, key))

  return task, run, scorer


# ------------------------------------------------------------------------------------------------
# The host loop: transformers `generate`, turn by turn, on text.
# ------------------------------------------------------------------------------------------------


class HostLoop:
  """CollabLLM's MR on the host: chats as text, re-rendered and re-prefilled every turn."""

  def __init__(self, folder: str, task, reply_tokens: int, user_tokens: int, window: int,
               samples: int):
    import torch
    import transformers

    self.torch = torch
    self.model = transformers.LlamaForCausalLM.from_pretrained(
        folder, dtype=torch.float32).eval()
    self.tok = transformers.AutoTokenizer.from_pretrained(folder)
    self.tok.pad_token = self.tok.eos_token  # batched rows are left-padded, masked out
    self.tok.padding_side = "left"
    self.task, self.window, self.samples = task, window, samples
    self.reply_tokens, self.user_tokens = reply_tokens, user_tokens
    self.stop = list(task.stop_tokens)

  def pick_threads(self, candidates: list[int]) -> tuple[int, dict[int, float]]:
    """Sets torch's thread count to the fastest of `candidates` on a prefill (8 x 256) and a
    short batch-1 generation. On an idle 2-core machine that is 2 (the benchmarks' usual);
    where other work shares the cores, 2 threads that wait for each other at every op can be
    3-20x slower than 1 (measured here), which would flatter the comparison."""
    torch = self.torch
    gen = torch.Generator().manual_seed(0)
    prefill = torch.randint(1, self.model.config.vocab_size, (8, 256), generator=gen)
    prompt = prefill[:1, :64]
    seconds = {}
    for threads in candidates:
      torch.set_num_threads(threads)
      times = []
      for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
          self.model(prefill)
          self.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                              top_k=0, top_p=1.0, max_new_tokens=8, min_new_tokens=8,
                              pad_token_id=self.tok.pad_token_id)
        times.append(time.perf_counter() - t0)
      seconds[threads] = statistics.median(times)
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    return best, seconds

  def generate(self, chats: list[list[dict]], max_new: int) -> list[tuple[str, int]]:
    """(decoded text, tokens generated) of one sampled turn for each chat, in one batch."""
    texts = [self.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
             for c in chats]
    enc = self.tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with self.torch.no_grad():
      out = self.model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=max_new, eos_token_id=self.stop,
                                pad_token_id=self.tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    result = []
    for ids in new:
      n = next((i + 1 for i, t in enumerate(ids) if t in self.stop), len(ids))
      result.append((self.tok.decode(ids[:n], skip_special_tokens=True).strip(), n))
    return result

  def user_chat(self, record, chat):
    """The user's own chat: its prompt (goal, stage direction, first request), then the chat
    after the first request with the roles swapped."""
    swap = {"user": "assistant", "assistant": "user"}
    return [*self.task.user.messages(record),
            *({"role": swap[m["role"]], "content": m["content"]} for m in chat[1:])]

  def play(self, records: list[dict], group: int) -> list[dict]:
    """Every record's candidate reply and its S futures, `group` chats per `generate` call (1:
    CollabLLM's loop; S: a reply's futures together; B x S: everything at once). Returns one
    {record, chat, tokens_read} per future."""
    from collab_rl import simulators
    from collab_rl.tasks import text as text_lib

    heads = [[{"role": "user", "content": text_lib.first_request(r)}] for r in records]
    replies = []
    for i in range(0, len(records), max(group // self.samples, 1)):
      replies += self.generate(heads[i:i + max(group // self.samples, 1)], self.reply_tokens)
    futures = [{"record": r, "chat": [*h, {"role": "assistant", "content": text}],
                "tokens_read": n, "user_tokens": 0,
                "ended": False}
               for r, h, (text, n) in zip(records, heads, replies) for _ in range(self.samples)]
    for i in range(0, len(futures), group):
      rows = futures[i:i + group]
      for t in range(self.window + 1):
        live = [f for f in rows if not f["ended"]]
        if t and live:  # the policy's next reply
          for f, (text, n) in zip(live, self.generate([f["chat"] for f in live],
                                                      self.reply_tokens)):
            f["chat"].append({"role": "assistant", "content": text})
            f["tokens_read"] += n
        if not live:
          break
        said = self.generate([self.user_chat(f["record"], f["chat"]) for f in live],
                             self.user_tokens)
        for f, (text, n) in zip(live, said):
          f["user_tokens"] += n
          text, f["ended"] = simulators.finish_reply(text)
          f["chat"].append({"role": "user", "content": text})
    return futures

  def score(self, futures: list[dict], token_cost: float) -> list[float]:
    """R* without interactivity: the verifier on the last reply, minus the token cost."""
    from collab_rl import text_scores
    from collab_rl.tasks import verifiers

    return [verifiers.score("answer", text_scores.last_reply(f["chat"]), f["record"])
            - min(token_cost * f["tokens_read"], 1.0) for f in futures]


# ------------------------------------------------------------------------------------------------
# Side by side.
# ------------------------------------------------------------------------------------------------


def ours_work(task, records, conv, counts) -> dict:
  """Mean tokens the policy and the user generated per future (stop tokens included), and the
  user's turns: what the host loop must match for a fair comparison."""
  import numpy as np

  from collab_rl.tokenizer import ASSISTANT, USER

  roles = np.asarray(conv.roles_BxL)
  turns, cut = np.asarray(counts.turns_B), np.asarray(counts.cut_B)
  opening = np.sum(np.asarray(task.encode(records).opening_roles_BxN) == USER, 1)
  samples = roles.shape[0] // len(records)
  # A user turn is its words and the template's end of turn (USER tokens, as the first request
  # is); the turns that stopped generated their stop token too.
  user = (np.sum(roles == USER, 1) - np.repeat(opening, samples) - len(task.user_footer) * turns
          + (turns - cut))
  return {"policy_tokens": float(np.mean(np.sum(roles == ASSISTANT, 1))),
          "user_tokens": float(np.mean(user)), "user_turns": float(np.mean(turns))}


def host_work(futures: list[dict]) -> dict:
  mean = lambda xs: float(sum(xs) / len(xs))
  return {"policy_tokens": mean([f["tokens_read"] for f in futures]),
          "user_tokens": mean([f["user_tokens"] for f in futures]),
          "user_turns": mean([sum(m["role"] == "user" for m in f["chat"]) - 1 for f in futures])}


def cpu_seconds() -> float:
  """CPU time of this process, all its threads (user + system)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                  platform.processor())
  except OSError:
    return platform.processor()


def summary(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "all": values}


def main(argv):
  del argv
  f = flags.FLAGS
  # Before JAX initialises its CPU backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={f.host_devices}")
  import jax
  import torch
  import transformers

  torch.manual_seed(0)
  thread_counts = [int(t) for t in f.threads]
  batches = [int(b) for b in f.batches]
  w, s, nh = f.window, f.samples, f.host_replies
  records = make_records(max(batches))
  results, load_before = {}, os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    folder = make_folder(tmp, records, f.width, f.layers)
    task, ours, scorer = make_ours(folder, records, f.reply_tokens, f.user_tokens, w, s,
                                   f.host_devices, f.samples_chunk)
    host = HostLoop(folder, task, f.reply_tokens, f.user_tokens, w, s)
    cost = scorer.rcfg.token_cost
    for b in batches:
      recs = records[:b]
      host_score = lambda futures: host.score(futures, cost)
      sides = {  # name -> (replies per call, play(seed) -> futures, score(futures))
          "collab_rl": (b, lambda k, r=recs: ours(r, jax.random.key(k)),
                        lambda out, r=recs: scorer.score(out[0], r)),
          "host_sequential": (nh, lambda k, r=recs: host.play(r[:nh], 1), host_score),
          "host_batched_futures": (nh, lambda k, r=recs: host.play(r[:nh], s), host_score),
          "host_batched_all": (b, lambda k, r=recs: host.play(r, len(r) * s), host_score),
      }
      host.pick_threads(thread_counts)
      work = {}  # tokens generated per future, from the warm-up calls (compilation, first calls)
      for name, (_, play, _) in sides.items():
        out = play(0)
        work[name] = ours_work(task, recs, *out) if name == "collab_rl" else host_work(out)
        print(f"B={b} {name}: per future {work[name]}", flush=True)
      times = {name: {"play": [], "score": [], "play_cpu": []} for name in sides}
      threads = []  # torch's thread count in each round, and what each candidate took
      for rep in range(f.repeats):
        threads.append(host.pick_threads(thread_counts))
        for name, (_, play, score) in sides.items():
          c0, t0 = cpu_seconds(), time.perf_counter()
          out = play(rep + 1)
          t1, c1 = time.perf_counter(), cpu_seconds()
          score(out)
          times[name]["play"].append(t1 - t0)
          times[name]["play_cpu"].append(c1 - c0)  # / play: the cores it kept busy
          times[name]["score"].append(time.perf_counter() - t1)
        print(f"B={b} round {rep} (torch threads {threads[-1]}): " + ", ".join(
            f"{k} {v['play'][-1]:.2f}s ({v['play_cpu'][-1] / v['play'][-1]:.2f} cores) "
            f"+ {v['score'][-1]:.2f}s" for k, v in times.items()),
            flush=True)
      rate = {}
      for name, t in times.items():
        rate[name] = [sides[name][0] / x for x in t["play"]]
        rate[name + "+score"] = [sides[name][0] / (x + y) for x, y in zip(t["play"], t["score"])]
      res = {"mr_per_s": {k: summary(v) for k, v in rate.items()},
             "seconds": {k: {part: summary(v) for part, v in t.items()}
                         for k, t in times.items()},
             "replies_timed": {k: sides[k][0] for k in sides}, "work_per_future": work,
             "torch_threads_per_round": [t for t, _ in threads],
             "torch_thread_calibration_s": [c for _, c in threads],
             "ratio_collab_rl_over": {}}
      for tag in ("", "+score"):
        for peer in HOST_SIDES:
          ratios = [a / p for a, p in zip(rate["collab_rl" + tag], rate[peer + tag])]
          res["ratio_collab_rl_over"][peer + tag] = summary(ratios)
      results[f"B{b}"] = res
      for k, v in res["ratio_collab_rl_over"].items():
        ours_rate = res["mr_per_s"]["collab_rl" + k[len(k.split("+")[0]):]]["median"]
        print(f"B={b} collab_rl / {k}: {v['median']:.1f}x ({v['min']:.1f}-{v['max']:.1f}); "
              f"{ours_rate:.2f} vs {res['mr_per_s'][k]['median']:.2f} MR/s", flush=True)
    model_cfg = task.user_model.cfg
  result = {
      "what": "MR evaluations/s: B candidate replies, each with S futures of w turns",
      "window": w, "samples": s, "samples_chunk": f.samples_chunk,
      "reply_tokens": f.reply_tokens, "user_tokens": f.user_tokens,
      "repeats": f.repeats, "host_replies": nh,
      "model": {"hidden_size": model_cfg.hidden_size, "layers": model_cfg.num_hidden_layers,
                "heads": model_cfg.num_attention_heads,
                "kv_heads": model_cfg.num_key_value_heads, "vocab_size": model_cfg.vocab_size,
                "dtype": "float32"},
      "user_prompt": "collabllm (simulators.ROLE_PLAY_PROMPT, with the reference answer)",
      "torch_threads_tried": thread_counts, "xla_host_devices": f.host_devices,
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "cpu": cpu_name(),
      # Other work on the machine slows both sides, torch's threads more: read ratios with it.
      "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
      "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
      "transformers_version": transformers.__version__, "results": results}
  common.write_json(f.out, result)


if __name__ == "__main__":
  define_flags()
  app.run(main)
