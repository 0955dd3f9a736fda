"""Hugging Face Llama / Qwen2 checkpoints in and out: `load_pretrained` and `save_pretrained`.

A checkpoint folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Loading streams tensor by tensor: every parameter is created with
`jax.make_array_from_callback` in its mesh sharding, and each device's callback reads only its own
slice of the file (`safe_open(...).get_slice`), so no process ever holds a full copy per device.

Both config generations are read: the older top-level `rope_theta` / `rope_scaling` /
`torch_dtype` and transformers 5's `rope_parameters` / `dtype`. `save_pretrained` writes both, so
that transformers 4 and 5 alike load the folder.

Parameter names mirror Hugging Face (see `models/transformer.py`), so the mapping is a rename:
`layers_3/mlp/up_proj/kernel` <-> `model.layers.3.mlp.up_proj.weight` (transposed: torch Linear
stores [out, in], Flax Dense [in, out]). A model with `scan_layers` stacks the layers:
`layers/mlp/up_proj/kernel` [L, in, out] row 3 <-> `model.layers.3.mlp.up_proj.weight`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
import struct
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for safetensors' numpy reader)
import numpy as np
from safetensors import safe_open

from collab_rl import sharding
from collab_rl.models.transformer import Transformer, TransformerConfig, init_params

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
_ROPE_TYPES = ("default", "linear", "llama3")
# Buffers some older exports saved next to the weights; they are recomputed from the config.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Heads without a Hugging Face counterpart: never written, never expected in a checkpoint.
_OWN_HEADS = ("value_head", "reward_head")
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}

PathLike = str | pathlib.Path

# ------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str | None:
  """float32 / bfloat16, the dtypes the model runs in; float16 widens to float32."""
  if dtype is None:
    return None
  try:
    name = np.dtype(dtype.removeprefix("torch.") if isinstance(dtype, str) else dtype).name
  except TypeError:
    name = str(dtype)
  name = "float32" if name == "float16" else name
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"unsupported dtype {dtype!r}: use float32 or bfloat16")
  return name


def _rope(hf: Mapping[str, Any], where: str) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling) from either config generation."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and params and all(isinstance(v, Mapping)
                                                    for v in params.values()):
    # transformers 5 keys rope per layer type for hybrid models; ours are all full attention.
    params = params.get("full_attention")
  if params:
    params = dict(params)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10_000.0))
  else:
    theta = hf.get("rope_theta", 10_000.0)
    params = dict(hf.get("rope_scaling") or {})
  kind = params.pop("rope_type", params.pop("type", "default"))
  if kind not in _ROPE_TYPES:
    raise ValueError(f"{where}: unsupported rope type {kind!r} (supported: {_ROPE_TYPES})")
  if params.pop("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
  if kind == "default":
    return float(theta), None
  keep = {"linear": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")}[kind]
  if kind == "llama3":
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
  missing = [k for k in keep if params.get(k) is None]
  if missing:
    raise ValueError(f"{where}: rope type {kind!r} needs {missing}")
  return float(theta), tuple(sorted({"rope_type": kind, **{k: params[k] for k in keep}}.items()))


def config_from_hf(hf: Mapping[str, Any], dtype: Any = None,
                   where: str = "config.json") -> TransformerConfig:
  """A Hugging Face config dict -> TransformerConfig; `where` names the file in errors."""
  archs = hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))]
  arch = archs[0]
  if arch not in ARCHITECTURES or hf.get("model_type", ARCHITECTURES[arch]) != ARCHITECTURES[arch]:
    raise ValueError(f"{where}: unsupported architecture {arch!r} (model_type "
                     f"{hf.get('model_type')!r}); supported: {sorted(ARCHITECTURES)}")
  kind = ARCHITECTURES[arch]
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: unsupported hidden_act {hf['hidden_act']!r} (only silu)")
  if kind == "llama":
    # Llama's attention_bias also puts a bias on o_proj, which the transformer does not have.
    for key in ("attention_bias", "mlp_bias"):
      if hf.get(key):
        raise ValueError(f"{where}: unsupported {key}=true for {arch}")
  layers = hf["num_hidden_layers"]
  sliding = hf.get("use_sliding_window") and hf.get("sliding_window") and (
      hf.get("max_window_layers", 0) < layers)
  if sliding or "sliding_attention" in (hf.get("layer_types") or ()):
    raise ValueError(f"{where}: sliding-window attention is not supported")
  theta, scaling = _rope(hf, where)
  dtype = _dtype_name(dtype) or _dtype_name(hf.get("dtype") or hf.get("torch_dtype")) or "float32"
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  if head_dim == hf["hidden_size"] // heads and not hf["hidden_size"] % heads:
    head_dim = None  # the default; keeps configs equal whichever way they were written
  return TransformerConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim, rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
      rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=kind == "qwen2", heads=("lm",), dtype=dtype, param_dtype=dtype)


def config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
  """TransformerConfig -> config.json contents (Qwen2 when q/k/v carry a bias, else Llama)."""
  kind = "qwen2" if cfg.attention_bias else "llama"
  scaling = dict(cfg.rope_scaling or ())
  kind_rope = scaling.pop("rope_type", scaling.pop("type", "default"))
  out = {
      "architectures": [_MODEL_TYPES[kind]], "model_type": kind,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.dim_per_head,
      "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      # transformers < 5 reads these two; 5 reads rope_parameters (and converts these).
      "rope_theta": cfg.rope_theta,
      "rope_scaling": {"rope_type": kind_rope, **scaling} if cfg.rope_scaling else None,
      "rope_parameters": {"rope_type": kind_rope, **scaling, "rope_theta": cfg.rope_theta},
      "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype,
  }
  if kind == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  return out


# ------------------------------------------------------------------------------------------------
# Names: our param paths <-> Hugging Face tensor names.
# ------------------------------------------------------------------------------------------------


def hf_name(path: str) -> tuple[str, bool]:
  """'layers_0/self_attn/q_proj/kernel' -> ('model.layers.0.self_attn.q_proj.weight', True)."""
  *mods, leaf = path.split("/")
  mods = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in mods]
  prefix = [] if mods[0] == "lm_head" else ["model"]
  suffix = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return ".".join(prefix + mods + [suffix]), leaf == "kernel"


def _expected(shapes) -> dict[str, tuple[Any, bool, tuple[int, ...], int | None]]:
  """HF name -> (our tree path, transposed, HF shape, layer) for every param Hugging Face
  stores; `layer` is the row of a stacked leaf ("layers/...", `scan_layers`) that holds the
  tensor, None where the leaf is the tensor. A stacked leaf's layers come in order."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    p = sharding.path_str(path)
    if p.startswith(_OWN_HEADS):
      continue
    stacked = p.startswith("layers/")
    shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
    for layer in range(leaf.shape[0]) if stacked else [None]:
      name, transposed = hf_name(p if layer is None else f"layers_{layer}/{p[len('layers/'):]}")
      out[name] = (path, transposed, shape[::-1] if transposed else shape, layer)
  return out


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------


def _weight_files(folder: pathlib.Path) -> tuple[list[pathlib.Path], dict[str, pathlib.Path]]:
  """The safetensors files and, for a sharded checkpoint, the index's name -> file map."""
  index = folder / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    listed = {name: folder / f for name, f in weight_map.items()}
    files = sorted(set(listed.values()))
    absent = [str(f) for f in files if not f.exists()]
    if absent:
      raise FileNotFoundError(f"{index} lists shard files that do not exist: {absent}")
    return files, listed
  single = folder / "model.safetensors"
  if single.exists():
    return [single], {}
  raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors checkpoints are supported)")


def folder_config(path: PathLike, dtype: Any = None) -> TransformerConfig:
  """The config `load_pretrained` builds for a folder, reading no weights. dtype None keeps the
  checkpoint's: config.json's `dtype` / `torch_dtype`, else the stored embedding's."""
  folder = pathlib.Path(path)
  config_file = folder / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{folder}: no config.json")
  hf = json.loads(config_file.read_text())
  if dtype is None and not (hf.get("dtype") or hf.get("torch_dtype")):
    files, listed = _weight_files(folder)
    embed = "model.embed_tokens.weight"
    with safe_open(str(listed.get(embed, files[0])), framework="numpy") as handle:
      if embed in handle.keys():
        dtype = _FROM_ST.get(handle.get_slice(embed).get_dtype(), "float32")
  return config_from_hf(hf, dtype, where=str(config_file))


def load_pretrained(path: PathLike, dtype: Any = None, mesh: jax.sharding.Mesh | None = None,
                    rules=sharding.LLAMA_RULES,
                    scan_layers: bool = False) -> tuple[Transformer, dict]:
  """A Hugging Face folder -> (model, params), params placed in their `rules` sharding on `mesh`.

  dtype: "float32" or "bfloat16" for params and compute; None keeps the checkpoint's (config
  `dtype` / `torch_dtype`, else the embedding's; float16 widens to float32). mesh: None puts
  everything on the first device. scan_layers: the model scans its layers, and each stacked
  param is read layer by layer straight into its [L, ...] array.
  """
  folder = pathlib.Path(path)
  cfg = dataclasses.replace(folder_config(folder, dtype), scan_layers=scan_layers)
  config_file = folder / "config.json"
  files, listed = _weight_files(folder)
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(str(f), framework="numpy")) for f in files}
    found: dict[str, pathlib.Path] = {}
    for f, handle in handles.items():
      for name in handle.keys():
        if name in found:
          raise ValueError(f"tensor {name} is stored twice: in {found[name]} and {f}")
        found[name] = f
    for name, f in listed.items():
      if found.get(name) != f:
        actual = f"it is in {found[name]}" if name in found else "no file has it"
        raise ValueError(f"{folder / 'model.safetensors.index.json'} maps tensor {name} to {f}, "
                         f"but {actual}")
    model = Transformer(cfg)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    expected = _expected(shapes)
    _check_names(expected, found, cfg, folder)

    if mesh is None:
      mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    shardings = sharding.param_shardings(shapes, mesh, rules)
    target = np.dtype(cfg.param_dtype)
    by_path: dict[str, list] = {}
    for name, (p, transposed, hf_shape, layer) in expected.items():
      by_path.setdefault(sharding.path_str(p), []).append((name, transposed, hf_shape, layer))

    def load(path, leaf, param_sharding):
      entries = by_path[sharding.path_str(path)]
      tensors = []
      for name, transposed, hf_shape, _ in entries:
        tensor = handles[found[name]].get_slice(name)
        if tuple(tensor.get_shape()) != hf_shape:
          raise ValueError(f"{found[name]}: tensor {name} has shape "
                           f"{tuple(tensor.get_shape())}, expected {hf_shape} from {config_file}")
        tensors.append((tensor, transposed))

      def read_one(tensor, transposed, index: tuple[slice, ...]) -> np.ndarray:
        # Each device asks for its own slice; a transposed kernel reads the mirrored one.
        if transposed:
          return np.ascontiguousarray(tensor[index[::-1]].T, dtype=target)
        return np.asarray(tensor[index], dtype=target)

      def read(index: tuple[slice, ...]) -> np.ndarray:
        if entries[0][3] is None:
          return read_one(*tensors[0], index)
        # A stacked leaf: the device's layers, each read as its own tensor's slice.
        return np.stack([read_one(*tensors[i], index[1:])
                         for i in range(len(tensors))[index[0]]])

      return jax.make_array_from_callback(leaf.shape, param_sharding, read)

    params = jax.tree_util.tree_map_with_path(load, shapes, shardings)
  return model, params


def _check_names(expected: Mapping[str, Any], found: Mapping[str, pathlib.Path],
                 cfg: TransformerConfig, folder: pathlib.Path) -> None:
  missing = sorted(set(expected) - set(found))
  if missing:
    raise ValueError(f"{folder}: missing tensors {missing} (needed by config.json)")
  extra = sorted(n for n in set(found) - set(expected) if not _IGNORED.search(n))
  if cfg.tie_word_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")  # some exports store the tied copy too; the embedding wins
  if extra:
    where = ", ".join(f"{n} (in {found[n]})" for n in extra)
    raise ValueError(f"{folder}: unexpected tensors not used by config.json: {where}")


# ------------------------------------------------------------------------------------------------
# Saving.
# ------------------------------------------------------------------------------------------------


def _host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_pretrained(model: Transformer, params: Mapping, path: PathLike,
                    hf_config: Mapping[str, Any] | None = None) -> None:
  """Writes config.json + model.safetensors (in the params' dtype) that transformers loads.

  Streams one tensor at a time to the file (a stacked param of `scan_layers` one layer at a
  time), so the host holds at most one full tensor. Value and
  reward heads have no Hugging Face counterpart and are left out. `hf_config` (e.g. the source
  checkpoint's config.json, for its token ids) supplies the keys that the model does not decide.
  Multi-host: every process must call this (gathers are collective); process 0 writes.
  """
  cfg = model.cfg
  if "lm" not in cfg.heads:
    raise ValueError("save_pretrained needs the LM head: the model was built without 'lm'")
  expected = _expected(params)
  leaves = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  dtypes = {np.dtype(x.dtype).name for x in leaves.values()}
  if not dtypes <= set(_ST_DTYPES):
    raise ValueError(f"params have dtypes {sorted(dtypes)}; only {sorted(_ST_DTYPES)} are written")
  header, offset = {}, 0
  for name, (p, _, hf_shape, _) in expected.items():
    x = leaves[sharding.path_str(p)]
    size = int(np.prod(hf_shape)) * np.dtype(x.dtype).itemsize
    header[name] = {"dtype": _ST_DTYPES[np.dtype(x.dtype).name], "shape": list(hf_shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned

  # The architecture keys always come from the model, so they match the tensors written.
  config = {**(hf_config or {}), **config_to_hf(cfg)}
  config["dtype"] = config["torch_dtype"] = np.dtype(leaves["embed_tokens/embedding"].dtype).name
  folder = pathlib.Path(path)
  writer = jax.process_index() == 0
  if writer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  with (open(folder / "model.safetensors", "wb") if writer else contextlib.nullcontext()) as f:
    if writer:
      f.write(struct.pack("<Q", len(blob)) + blob)
    for p, transposed, _, layer in expected.values():
      x = leaves[sharding.path_str(p)]
      x = _host(x if layer is None else x[layer])
      if writer:
        f.write(np.ascontiguousarray(x.T if transposed else x).tobytes())
