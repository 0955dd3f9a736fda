"""The run scaffold every trainer starts through: checks, optimizer, state, resume, writer, keys.

    mesh = check_run(config)  # with the trainer's own checks, before anything compiles or writes
    init = init_state(config, mesh, make_optimizer(config.optimizer, config.num_steps))
    run = Run(config, workdir, init.abstract, init.create_fn)
    state, history = run.state, run.baseline(evaluate)
    for step in run.steps(int(state.step), config.num_steps, stop_after, "sft"):
      state, metrics = step_fn(state, data_fn(jax.random.fold_in(run.keys.train, step)))
      history.update(run.end_step(step, state, metrics, evaluate, {"episodes_per_s": batch}))
    run.close()

Resume order, written once (`Run`): the workdir's latest checkpoint (with the data iterator
position it saved: `Run.data_state`, `Run.resume`), else `config.init_from` (an earlier run's
params, restored into this run's sharding: how ablations start from one common base), else
`config.init_from_hf` (a Hugging Face folder's weights, its config.json deciding the model's
architecture, heads it lacks fresh), else fresh.

Key streams: every key of a run is a branch of `jax.random.key(config.seed)`: 0 the initial
params and 1 the train state's RNG (`train_state.fresh_init_fn`), 2 the training data
(`Keys.train`), 3 held-out data and evaluation (`Keys.eval`). A trainer folds the step (or a
batch index) into its branch, so a resumed run sees the data it would have seen.

A trainer keeps what is its own: its data, loss, step, evaluation and loop; `Run.end_step` does
the bookkeeping after each update (non-finite stop, logging cadence, throughput, checkpoint).
`run_rl.py` is the part of the scaffold that only the conversation RL trainers share.
"""

from __future__ import annotations

import json
import pathlib
import re
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import jax
import ml_collections
import optax
from absl import logging

from collab_rl import checkpoint as ckpt_lib
from collab_rl import config_names
from collab_rl import frozen_base
from collab_rl import metrics as metrics_lib
from collab_rl import restore as restore_lib
from collab_rl import sharding as sharding_lib
from collab_rl import storage
from collab_rl import train_state as state_lib
from collab_rl.models import hf as hf_lib
from collab_rl.models import lora as lora_lib
from collab_rl.models import transformer

# ------------------------------------------------------------------------------------------------
# Checks, before anything compiles or writes.
# ------------------------------------------------------------------------------------------------

MODEL_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "max_position_embeddings")


# What a Hugging Face folder's config.json decides about the model; the heads, dtypes and remat
# stay the run config's (a policy for PPO needs its value head, which no HF checkpoint has).
HF_ARCHITECTURE = (*MODEL_SIZES, "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
                   "tie_word_embeddings", "attention_bias")


def model_from_hf(config) -> None:
  """With `config.init_from_hf` (a Hugging Face Llama/Qwen2 folder), `config.model`'s
  architecture is read from the folder's config.json, so that the run (and the config saved with
  its checkpoints, from which `evaluate` rebuilds the model) is the checkpoint's model."""
  folder = config.get("init_from_hf")
  if not folder:
    return
  if config.get("init_from"):
    raise ValueError(f"config.init_from={config.init_from!r} and config.init_from_hf="
                     f"{folder!r} are both set: a run starts from one of them")
  path = pathlib.Path(folder) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"config.init_from_hf={folder!r}: no config.json there (expected a "
                            "Hugging Face checkpoint folder: config.json and model.safetensors)")
  cfg = hf_lib.config_from_hf(json.loads(path.read_text()), where=str(path))
  with config.model.unlocked():  # a config may leave some architecture fields to the defaults
    for name in HF_ARCHITECTURE:
      value = getattr(cfg, name)
      config.model[name] = dict(value) if name == "rope_scaling" and value else value


def check_model(config) -> transformer.TransformerConfig:
  """`config.model` (from `config.init_from_hf`'s config.json where set: `model_from_hf`), its
  sizes checked first: TransformerConfig divides by some of them, and a zero width or layer
  count would otherwise surface only after compiling (or train nothing)."""
  model_from_hf(config)
  model = config.model
  for name in (*MODEL_SIZES, "head_dim"):  # head_dim may be None: hidden_size // heads
    if model.get(name) is not None and model[name] <= 0:
      raise ValueError(f"config.model.{name} must be positive, got {model[name]}")
  cfg = transformer.TransformerConfig.from_dict(model.to_dict())
  if cfg.dim_per_head % 2:
    raise ValueError(f"config.model: the head dimension {cfg.dim_per_head} (head_dim, else "
                     "hidden_size // num_attention_heads) must be even for RoPE")
  return cfg


def check_positive(config, names: Sequence[str]) -> None:
  for name in names:
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")


def check_eval_batches(config) -> None:
  """A trainer that evaluates with its training step's batch: `eval_batch_size` held-out
  examples are that many batches of `batch_size`."""
  if config.eval_batch_size % config.batch_size:
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size} must be a multiple of "
                     f"config.batch_size={config.batch_size}: it is played in batches of it")


def check_batches(config, mesh: jax.sharding.Mesh, names: Sequence[str]) -> None:
  """Each batch splits over the mesh's data x fsdp devices and over the processes."""
  for name in names:
    sharding_lib.check_batch(config[name], mesh, what=name)
    if config[name] % jax.process_count():
      raise ValueError(f"{name}={config[name]} is not divisible by the "
                       f"{jax.process_count()} processes")


def check_microbatches(config, rows: int, what: str = "batch_size") -> None:
  """`config.microbatches` (gradient accumulation inside the jitted step; absent: 1) divides the
  `rows` of one update."""
  n = config.get("microbatches", 1)
  if n < 1 or rows % n:
    raise ValueError(f"config.microbatches={n} must be >= 1 and divide the {rows} rows of one "
                     f"update ({what})")


def check_run(config, *, batches: Sequence[str] = ("batch_size",)) -> jax.sharding.Mesh:
  """The checks of what this module builds from the config: its names (no older name of
  `config_names.RENAMED`), the optimizer, the checkpointing, the partition rules, `init_from`,
  and the mesh with every batch in `batches` over it. Returns the mesh."""
  config_names.check(config)
  for name in ("learning_rate", "warmup_steps"):
    if config.optimizer[name] < 0:
      raise ValueError(f"config.optimizer.{name} must be >= 0, got {config.optimizer[name]}")
  for name in ("every_steps", "max_to_keep"):
    if config.checkpoint[name] < 1:
      raise ValueError(f"config.checkpoint.{name} must be >= 1, got {config.checkpoint[name]}")
  try:
    sharding_lib.rules_from_config(config.get("partition_rules"))
  except re.error as e:
    raise ValueError(f"config.partition_rules: bad regex {e.pattern!r}: {e}") from None
  restore_lib.check_init_from(config.init_from or None)
  lora_config(config)  # rank, dropout and target regexes
  mesh = sharding_lib.make_mesh(config.mesh_shape)
  check_batches(config, mesh, batches)
  return mesh


# ------------------------------------------------------------------------------------------------
# Optimizer and state.
# ------------------------------------------------------------------------------------------------


def make_optimizer(o: ml_collections.ConfigDict,
                   decay_steps: int | None = None) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW after a linear warmup to `o.learning_rate`: cosine decay to
  `o.final_lr_fraction` of it over `decay_steps` when given (the trainers that count steps),
  else constant (the RL trainers, whose updates per iteration vary with the config)."""
  if decay_steps is None:
    schedule = optax.warmup_constant_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, o.warmup_steps, max(decay_steps, o.warmup_steps + 1),
        end_value=o.learning_rate * o.final_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


class Init(NamedTuple):
  model: transformer.Transformer
  tx: optax.GradientTransformation
  create_fn: Callable[[], state_lib.TrainState]  # builds the fresh state in its shardings
  abstract: state_lib.TrainState  # ShapeDtypeStructs with shardings: what restores target
  shardings: state_lib.TrainState


def init_state(config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation) -> Init:
  """`config.model` and the train state's factory, sharded by `config.partition_rules`. With
  `config.init_from_hf` the factory's params are the folder's weights, with freshly initialised
  heads where the model has heads the checkpoint lacks (PPO's value head); the RL trainers' frozen
  reference (the starting policy) is then the loaded checkpoint too."""
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(config.model.to_dict()))
  rules = sharding_lib.rules_from_config(config.get("partition_rules"))
  lcfg = lora_config(config)
  if lcfg.enabled:
    tx = lora_lib.trainable_only(tx, lcfg)
  create_fn, abstract, shardings = state_lib.init_sharded(
      state_lib.fresh_init_fn(model, tx, config.seed, lcfg), mesh, rules)
  if config.get("init_from_hf"):
    dtype = transformer.TransformerConfig.from_dict(config.model.to_dict()).param_dtype
    create_fn = _from_hf(create_fn, config.init_from_hf, dtype, mesh, rules)
  if lcfg.enabled:
    model = lora_lib.LoraModel(model, lcfg)
  return Init(model, tx, create_fn, abstract, shardings)


# Trainers whose losses take the step's dropout key (`train_state.update(dropout=True)`).
DROPOUT_TRAINERS = ("sft", "sft_records", "mediator", "lm", "ppo", "dpo")


def lora_config(config) -> lora_lib.LoraConfig:
  """`config.lora` (absent: no adapters), checked."""
  lcfg = lora_lib.LoraConfig.from_dict(config.get("lora") and config.lora.to_dict())
  trainer = config.get("trainer")
  if lcfg.enabled and lcfg.dropout and trainer and trainer not in DROPOUT_TRAINERS:
    raise ValueError(f"lora.dropout={lcfg.dropout}: the {trainer} trainer's loss takes no "
                     f"dropout key (those that do: {list(DROPOUT_TRAINERS)}); use 0")
  return lcfg


def _from_hf(create_fn, folder: str, dtype: str, mesh, rules):
  """`create_fn` with its params replaced by the HF folder's wherever the folder has them."""

  def create() -> state_lib.TrainState:
    # Read anew on every call: a trainer that also keeps the starting params as its reference
    # must not share buffers with the state that its update donates.
    fresh = create_fn()
    split = lora_lib.is_split(fresh.params)  # with adapters the folder is the base
    params = frozen_base.overlay_hf(fresh.params["base"] if split else fresh.params, folder,
                                    dtype, mesh, rules)
    if split:
      params = lora_lib.split(params, fresh.params["lora"])
    return fresh.replace(params=params)

  return create


# ------------------------------------------------------------------------------------------------
# The run: resume order, checkpoints, metrics writer, key streams.
# ------------------------------------------------------------------------------------------------


class Keys(NamedTuple):
  train: jax.Array  # fold_in(key(seed), 2): the training data
  eval: jax.Array  # fold_in(key(seed), 3): held-out data and evaluation


def key_streams(seed: int) -> Keys:
  root = jax.random.key(seed)
  return Keys(jax.random.fold_in(root, 2), jax.random.fold_in(root, 3))


class Run:
  """One trainer's run in `workdir`: the state in the resume order, the checkpointer (interval
  `config.checkpoint.every_steps`), the metrics writer (process 0 writes) and the key streams."""

  def __init__(self, config, workdir: str, abstract: state_lib.TrainState,
               create_fn: Callable[[], state_lib.TrainState], *, tokenizer=None):
    self.config, self.workdir, self.tokenizer = config, str(workdir), tokenizer
    self.checkpointer = ckpt_lib.Checkpointer.for_run(workdir, config.checkpoint)
    self.state, self.data_state, self.how = restore_lib.restore_or_init(
        self.checkpointer, abstract, create_fn, init_from=config.init_from or None,
        lora=lora_config(config), init_from_hf=config.get("init_from_hf") or None)
    if self.how == "fresh" and config.get("init_from_hf"):
      self.how = f"init_from_hf {config.init_from_hf}"
    logging.info("%s: %s (%d params)", config.trainer, self.how,
                 transformer.count_params(self.state.params))
    self.keys = key_streams(config.seed)
    self.writer = metrics_lib.MetricWriter(workdir)
    self.writer.write_hparams(config.to_dict())
    # Set by `steps`: the schedule's last step, this process's last, and since when (and how
    # much, by `end_step`'s counts) the throughput is counted.
    self.total = self.last = None
    self._mark = (time.perf_counter(), {})
    # (step, its non-finite flag) not read yet: `end_step` reads it one step late.
    self._unchecked: tuple[int, Any] | None = None

  def resume(self, iterator: Iterator) -> Iterator:
    """`iterator` at the position the resumed checkpoint saved (as it is on a fresh run)."""
    if self.data_state is not None:
      iterator.set_state(self.data_state)
    return iterator

  def steps(self, done: int, total: int, stop_after: int | None, desc: str) -> Iterable[int]:
    """The steps after `done` up to `total`, with a progress bar. `stop_after` ends this
    process earlier (with a checkpoint) without changing the run's schedule: it is how tests
    and time-boxed jobs stand in for a preemption."""
    self.total = total
    self.last = total if stop_after is None else min(stop_after, total)
    self._mark = (time.perf_counter(), {})
    return metrics_lib.progress(range(done + 1, self.last + 1), total=total, initial=done,
                                desc=desc)

  def baseline(self, evaluate: Callable[[], dict[str, Any]]) -> dict[str, float]:
    """A fresh (or `init_from`) run's step-0 evaluation, logged; {} when resumed."""
    return {} if int(self.state.step) else self.log(0, evaluate())

  def end_step(self, step: int, state: state_lib.TrainState, metrics: dict,
               evaluate: Callable[[], dict[str, Any]], counts: dict[str, float], *,
               data_state: dict | None = None) -> dict[str, float]:
    """What a step-counting loop does after each update, in this order:

    * stops the run if the jitted step refused the update (loss or gradient NaN/inf), once
      pending saves are complete: `NonFiniteError`;
    * every `config.log_every` steps logs the step's `metrics` and throughput: `counts` maps a
      name to what this step processed (`{"episodes_per_s": batch_size}`), summed since the
      last log and divided by the seconds it took;
    * every `config.eval_every` steps logs `evaluate()`, untimed (throughput counts training
      only); the schedule's last step logs both;
    * then saves the checkpoint (`save`).

    The non-finite flag is read one step late, when the next step is already queued, so the
    host does not wait for each step to finish before it queues the next; on a step that logs,
    evaluates or may save, and on the last, it is read at once (those wait for the device
    anyway), so no checkpoint is written after a refused update unread.

    Returns what was logged, as floats ({} when nothing was due).
    """
    if self._unchecked is not None:  # the step before this one: finished, or nearly
      state_lib.stop_if_nonfinite(self.config.trainer, *self._unchecked, self.checkpointer)
      self._unchecked = None
    c = self.config
    if (step % c.log_every == 0 or step % c.eval_every == 0 or step in (self.total, self.last)
        or step % c.checkpoint.every_steps == 0):
      state_lib.stop_if_nonfinite(c.trainer, step, metrics["nonfinite"], self.checkpointer)
    else:
      self._unchecked = (step, metrics["nonfinite"])
    t0, summed = self._mark
    summed = {k: summed.get(k, 0) + v for k, v in counts.items()}
    scalars = {}
    if step % self.config.log_every == 0 or step == self.total:
      scalars.update(jax.device_get(metrics))  # waits for the device: then the clock is right
      seconds = max(time.perf_counter() - t0, 1e-9)
      scalars.update({k: v / seconds for k, v in summed.items()})
      t0, summed = time.perf_counter(), {}
    if step % self.config.eval_every == 0 or step == self.total:
      t_eval = time.perf_counter()
      scalars.update(evaluate())
      t0 += time.perf_counter() - t_eval
    self._mark = (t0, summed)
    logged = self.log(step, scalars) if scalars else {}
    self.save(step, state, data_state)  # after the log: a step that is saved has its metrics
    return logged

  def log(self, step: int, scalars: dict[str, Any]) -> dict[str, float]:
    """Writes `scalars` at `step` (process 0 writes); returns them as floats."""
    self.writer.write_scalars(step, scalars)
    return {k: float(v) for k, v in scalars.items()}

  def save(self, step: int, state: state_lib.TrainState, data_state: dict | None = None) -> None:
    """A checkpoint at the save interval, and always at the last step of this process; at the
    schedule's last step also the Hugging Face folder when `config.export_hf` (`export_hf`)."""
    self.checkpointer.save(step, state, data_state=data_state, config=self.config,
                           force=step == self.last)
    if step == self.total and self.config.get("export_hf"):
      self.export_hf(state)

  def export_hf(self, state: state_lib.TrainState) -> str:
    """`<workdir>/hf`: the trained model as a Hugging Face folder (config.json and
    model.safetensors, with the run's tokenizer where the trainer gave one) that transformers
    loads. Heads without an HF counterpart (value, reward) are left out; a run started from an
    HF folder keeps that folder's other config keys (token ids). Every process calls it (the
    gathers are collective); process 0 writes."""
    folder = storage.join(self.workdir, "hf")
    model = transformer.Transformer(transformer.TransformerConfig.from_dict(
        self.config.model.to_dict()))
    source = self.config.get("init_from_hf")
    hf_config = json.loads((pathlib.Path(source) / "config.json").read_text()) if source else None
    # safetensors and tokenizers write local files: a gs:// workdir gets them through a
    # local staging folder, uploaded whole.
    with tempfile.TemporaryDirectory() as staging:
      local = staging if storage.is_remote(folder) else folder
      # With adapters: merged into the base's kernels, one plain model.
      params = lora_lib.weights(state.params, lora_config(self.config))
      hf_lib.save_pretrained(model, params, local, hf_config=hf_config)
      if jax.process_index() == 0:
        if self.tokenizer is not None:
          self.tokenizer.save(local)
        if local != folder:
          storage.upload_folder(local, folder)
    logging.info("%s: exported the model as a Hugging Face folder: %s", self.config.trainer,
                 folder)
    return folder

  def close(self) -> None:
    self.checkpointer.close()  # waits for the last asynchronous save
    self.writer.close()
