"""Next-token training on a synthetic corpus: the whole path, config to resumed checkpoint.

config -> checks (before anything compiles) -> mesh -> sharded state (fresh, resumed or
`init_from`) -> grain data sharded by process, its position checkpointed -> jitted, donated train
step -> metrics -> Orbax checkpoints -> resume. Every trainer starts through the same scaffold
(`collab_rl/run.py`); this one keeps it honest on a task whose answer is known: the corpus is a
sparse random Markov chain with `branching` successors per token, so the loss floor is
log(branching).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from collab_rl import run as run_lib
from collab_rl import sharding as sharding_lib
from collab_rl import train_state as state_lib
from collab_rl.models import lora as lora_lib
from collab_rl.models import transformer

# ------------------------------------------------------------------------------------------------
# Data: a synthetic corpus, indexable so grain can shuffle, shard and checkpoint its position.
# ------------------------------------------------------------------------------------------------


class MarkovCorpus:
  """Record i: a right-padded token sequence from a fixed sparse Markov chain (0 is padding)."""

  def __init__(self, vocab_size: int, seq_len: int, num_records: int, branching: int, seed: int,
               min_len: int):
    rng = np.random.default_rng(seed)
    self._succ_VxK = rng.integers(1, vocab_size, size=(vocab_size, branching))
    self._seq_len, self._num, self._min_len, self._seed = seq_len, num_records, min_len, seed

  def __len__(self) -> int:
    return self._num

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self._seed, int(i)))
    n = int(rng.integers(self._min_len, self._seq_len + 1))
    tokens_L = np.zeros((self._seq_len,), np.int32)
    tok = int(rng.integers(1, len(self._succ_VxK)))
    choices = rng.integers(0, self._succ_VxK.shape[1], size=n)
    for t in range(n):
      tokens_L[t] = tok
      tok = int(self._succ_VxK[tok, choices[t]])
    return {"tokens": tokens_L, "length": np.int32(n)}


def make_dataset(config, split: str) -> grain.MapDataset:
  c = config.corpus
  seed = c.seed if split == "train" else c.seed + 1  # held-out records differ, same chain
  corpus = MarkovCorpus(config.model.vocab_size, config.seq_len + 1, c.num_records, c.branching,
                        c.seed, c.min_len)
  ds = grain.MapDataset.source(corpus)
  if split != "train":
    ds = ds[c.num_records // 2:]  # validation: the second half, never shuffled
  else:
    ds = ds.shuffle(seed=seed).repeat()
  # Shuffle first, then each process takes its interleaved slice: every global batch holds the
  # same records whatever the process count, so 2 hosts train exactly as 1 does.
  ds = ds[jax.process_index()::jax.process_count()]
  local_batch = config.batch_size // jax.process_count()
  return ds.batch(local_batch, drop_remainder=True)


# ------------------------------------------------------------------------------------------------
# Loss, step and build.
# ------------------------------------------------------------------------------------------------


def lm_loss(model, params, tokens_BxL, length_B, key=None):
  """Mean cross-entropy over real next-token targets (padding excluded); `key`: the step's
  dropout key (LoRA dropout)."""
  inputs_BxL, targets_BxL = tokens_BxL[:, :-1], tokens_BxL[:, 1:]
  valid_BxL = jnp.arange(inputs_BxL.shape[1])[None, :] < length_B[:, None]
  logits = model.apply({"params": params}, inputs_BxL, valid_BxL=valid_BxL,
                       rngs=lora_lib.dropout_rngs(key)).logits_BxLxV
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxL)
  target_mask_BxL = (jnp.arange(inputs_BxL.shape[1])[None, :] < (length_B - 1)[:, None])
  n = jnp.maximum(target_mask_BxL.sum(), 1)
  return jnp.sum(ce_BxL * target_mask_BxL) / n, n


def train_step(model, tx, state: state_lib.TrainState, batch, microbatches: int = 1):
  """One AdamW step; with `microbatches` > 1 accumulated over slices of the batch weighted by
  their target tokens (the same mean as one batch)."""
  targets = lambda b: jnp.maximum(b["length"] - 1, 0).sum()
  new, loss, _, m = state_lib.update(
      state, tx, lambda p, b, key=None: lm_loss(model, p, b["tokens"], b["length"], key), batch,
      microbatches, weight_fn=targets, dropout=lora_lib.uses_dropout(model))
  return new, {"loss": loss, "target_tokens": jnp.maximum(targets(batch), 1), **m}


class Built(NamedTuple):
  model: transformer.Transformer
  tx: optax.GradientTransformation
  create_fn: Callable[[], state_lib.TrainState]  # builds the state in its shardings
  abstract: state_lib.TrainState  # ShapeDtypeStructs with shardings: what restores target
  shardings: state_lib.TrainState
  step_fn: Callable  # (state, batch) -> (state, metrics); the state is donated
  eval_fn: Callable  # (params, batch) -> loss


def build(config, mesh) -> Built:
  """Model, optimizer, sharded state factory and the jitted steps, all from the config."""
  init = run_lib.init_state(config, mesh,
                            run_lib.make_optimizer(config.optimizer, config.num_steps))
  model, tx, shardings = init.model, init.tx, init.shardings
  batch_sh = {"tokens": sharding_lib.batch_sharding(mesh),
              "length": sharding_lib.batch_sharding(mesh)}
  microbatches = config.get("microbatches", 1)
  step_fn = jax.jit(lambda s, b: train_step(model, tx, s, b, microbatches),
                    in_shardings=(shardings, batch_sh),
                    out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)
  eval_fn = jax.jit(lambda p, b: lm_loss(model, p, b["tokens"], b["length"])[0],
                    in_shardings=(shardings.params, batch_sh))
  return Built(model, tx, init.create_fn, init.abstract, shardings, step_fn, eval_fn)


def check_config(config) -> jax.sharding.Mesh:
  """Every check that can fail on the config, before anything compiles. Returns the mesh."""
  mcfg = run_lib.check_model(config)
  mesh = run_lib.check_run(config)
  run_lib.check_microbatches(config, config.batch_size)
  run_lib.check_positive(config, ("num_steps", "seq_len", "log_every", "eval_every"))
  if config.corpus.min_len < 2 or config.corpus.min_len > config.seq_len + 1:
    raise ValueError(f"config.corpus.min_len={config.corpus.min_len} must be in "
                     f"[2, seq_len + 1 = {config.seq_len + 1}]")
  if mcfg.max_position_embeddings < config.seq_len:
    raise ValueError(f"config.model.max_position_embeddings={mcfg.max_position_embeddings} < "
                     f"config.seq_len={config.seq_len}")
  if config.corpus.branching < 1:
    raise ValueError(f"config.corpus.branching={config.corpus.branching} must be >= 1")
  held_out = config.corpus.num_records - config.corpus.num_records // 2
  if held_out // jax.process_count() < config.batch_size // jax.process_count():
    raise ValueError(f"config.corpus.num_records={config.corpus.num_records} leaves {held_out} "
                     f"validation records, fewer than one batch of {config.batch_size}")
  return mesh


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains to `config.num_steps`, resuming from `workdir` if it holds a checkpoint.

  `stop_after` ends this process at that step (with a checkpoint) without changing the run's
  schedule: it is how tests and time-boxed jobs stand in for a preemption.
  """
  mesh = check_config(config)
  b = build(config, mesh)
  run = run_lib.Run(config, workdir, b.abstract, b.create_fn)
  state = run.state
  train_iter = run.resume(iter(make_dataset(config, "train").to_iter_dataset()))
  eval_batch = sharding_lib.shard_batch(make_dataset(config, "validation")[0], mesh)
  history = {}
  for step in run.steps(int(state.step), config.num_steps, stop_after, "lm"):
    host_batch = next(train_iter)
    state, m = b.step_fn(state, sharding_lib.shard_batch(host_batch, mesh))
    m.pop("target_tokens")  # counted on the host, so that logging does not wait on the device
    tokens = int(np.sum(host_batch["length"] - 1)) * jax.process_count()
    history.update(run.end_step(
        step, state, m, lambda: {"eval_loss": float(b.eval_fn(state.params, eval_batch))},
        {"tokens_per_s": tokens}, data_state=train_iter.get_state()))
  run.close()
  return {"state": state, "final": history, "how": run.how}
