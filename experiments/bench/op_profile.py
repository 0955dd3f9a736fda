"""Where the `vs_transformers` programs spend their time, per op kind, from a profiler trace.

  python -m experiments.bench.op_profile --out bench_out/op_profile.json

Builds the tiny Llama and the calls `vs_transformers` times (`tiny_llama.collab_rl_programs`:
the batch-16 generation and the train step split over `--host_devices` XLA CPU devices), traces
`--calls` calls of each with `jax.profiler`, and sums the device threads' op events per call and
device into kinds, named from the compiled HLO's own metadata (a YNNPACK fusion is a matmul when
its op is a `dot_general`, else a reduction):

- `matmul`: dots (the dense layers, attention's two products, the LM head), with their GFLOP/s;
- `collective`: the cross-device all-reduce of the gradients, waits for the other device included;
- `layout`: copies, transposes, concatenations, slices, pads (moving data, no arithmetic);
- `elementwise`: every other fusion (norms, rotary, softmax, the optimizer, masks, sampling);
- `not_in_ops_ms`: the wall time per call the busiest device thread spent in no op at all
  (dispatch, the decode loop's control, waiting for the host).

The same time is also summed by part of the model (`ms_per_call_and_device_by_part`, `part_of`:
attention, rope, lm_head, dense, collective, other elementwise and layout), from the named
scopes in each op's jax name.

The matmul FLOPs come from the dots' shapes in the HLO, so `matmul_gflops_per_s` is what the
dots reach on one device's thread; `peak_matmul_gflops_per_s` is a [2048, 256] x [256, 688]
matmul (the MLP's shape) run on every device at once, about the best a device's dots reach here;
`decode_matmuls_gflops_per_s` is the generation's dots alone, chained token after token on
every device at once (`decode_matmuls`), about the best a decode step's dots reach here, and
`decode_matmuls_one_device_gflops_per_s` the same on one device while the others idle.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app, flags

from experiments.bench import common
from experiments.bench import tiny_llama

_OUT = flags.DEFINE_string("out", "bench_out/op_profile.json", "Where the JSON goes.")
_CALLS = flags.DEFINE_integer("calls", 3, "Traced calls per program (after 2 untraced).")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 2, "XLA CPU devices (as vs_transformers).")
_PROGRAMS = flags.DEFINE_list("programs", ["train_step", "greedy_b16"],
                              "Which of vs_transformers' calls to profile.")

_INSTR = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\][^=]*? (\w[\w-]*)\((.*?)\)(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_LAYOUT = ("copy", "transpose", "concatenate", "slice", "pad", "bitcast", "dynamic-update-slice",
           "broadcast")


def hlo_ops(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {"op": HLO opcode or fusion kind, "what": the jax op it came from,
  "flops": for a dot, 2 x its output elements x its contracted size}} of a compiled module."""
  shapes, ops, fused_dot = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    line = line.strip()
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
    if line.endswith("{") and head and "=" not in line.split("(")[0]:
      computation = head.group(1)
      continue
    m = _INSTR.search(line)
    if not m:
      continue
    name, _, dims, opcode, args, rest = m.groups()
    shape = [int(d) for d in dims.split(",") if d]
    shapes[name] = shape
    what = _OP_NAME.search(rest)
    # The jax op it came from, with the module path that places it (layers_3/mlp/...).
    info = {"op": opcode, "flops": 0, "scope": what.group(1) if what else "",
            "what": "/".join(what.group(1).split("/")[-3:]) if what else ""}
    if opcode == "dot":
      lhs = re.findall(r"%([\w.\-]+)", args)[0]
      contract = _CONTRACT.search(rest)
      k = 1
      for d in (contract.group(1).split(",") if contract and contract.group(1) else []):
        k *= shapes.get(lhs, [1] * 8)[int(d)]
      out = 1
      for d in shape:
        out *= d
      info["flops"] = 2 * out * k
      if computation:
        fused_dot[computation] = fused_dot.get(computation, 0) + info["flops"]
    if opcode == "fusion":
      called = re.search(r"calls=%([\w.\-]+)", rest)
      info["calls"] = called.group(1) if called else ""
    ops[name] = info
  for info in ops.values():
    if info["op"] == "fusion" and info.get("calls") in fused_dot:
      info["flops"] = fused_dot[info["calls"]]
  return ops


def kind_of(event: str, ops: dict[str, dict]) -> str:
  info = ops.get(event)
  if event.startswith(("all-reduce", "Rendezvous", "Wait: pending", "reduce-scatter",
                       "all-gather")):
    return "collective"
  if re.sub(r"\.\d+$", "", event) in ("while", "conditional", "call"):
    return "loop"  # spans their bodies' ops, which count on their own
  if info is None and not re.fullmatch(r"[\w\-]+(\.\d+)?", event):
    return "other"  # the runtime's own spans (ThunkExecutor::Execute, Python frames)
  if info and info["flops"]:
    return "matmul"
  # XLA names a fusion after its ops (`copy_bitcast_fusion`); a tuple-shaped instruction the
  # parser skips is classified by its name alone.
  base = re.sub(r"\.\d+$", "", event)
  parts = base.replace("_fusion", "").split("_")
  if (info and info["op"] in _LAYOUT) or base in _LAYOUT or all(p in _LAYOUT for p in parts):
    return "layout"
  return "elementwise"


def part_of(event: str, ops: dict[str, dict], kind: str) -> str:
  """Which part of the model an op belongs to, from the scopes in its jax op name (the
  backward's ops keep their forward's): `attention` (`attention.attend`: both products, the
  mask and the softmax), `rope` (`attention.apply_rope`), `lm_head`, `dense` (the other dots:
  the layers' projections), `collective`, else the kind (`elementwise`, `layout`: norms,
  SwiGLU, the loss, the optimizer, sampling, copies). A fusion is named after its root op: the
  greedy sampler's LM head, fused into the argmax's reduction, counts as `dense`."""
  scope = ops.get(event, {}).get("scope", "")
  for part in ("attend", "rope", "lm_head"):
    if f"/{part}/" in f"/{scope}/":
      return "attention" if part == "attend" else part
  return "dense" if kind == "matmul" else kind


def profile(call, calls: int) -> tuple[float, list[dict]]:
  """(wall seconds per call, untraced; the trace's complete events of `calls` more calls)."""
  import jax

  for _ in range(2):
    jax.block_until_ready(call())
  t0 = time.perf_counter()
  for _ in range(calls):
    jax.block_until_ready(call())
  wall = (time.perf_counter() - t0) / calls
  trace_dir = tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir)
  for _ in range(calls):
    jax.block_until_ready(call())
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
  return wall, events


def summarise(events, ops, module: str, calls: int, devices: int, wall_s: float) -> dict:
  """Per call and device: ms per kind, the dots' GFLOP/s, the top ops, and `not_in_ops` (the
  wall time the busiest device thread spent in no op: dispatch, loop control, waiting)."""
  per = calls * devices
  by_kind, by_part, by_op, by_thread, flops = (collections.Counter(), collections.Counter(),
                                               collections.Counter(), collections.Counter(), 0)
  for e in events:
    kind = kind_of(e["name"], ops)
    if e["name"].startswith(("Rendezvous", "Wait: pending")):
      continue  # nested in the all-reduce's own event, which counts it
    if kind in ("other", "loop") or e.get("args", {}).get("hlo_module") != module:
      continue
    by_kind[kind] += e["dur"]
    by_part[part_of(e["name"], ops, kind)] += e["dur"]
    by_op[e["name"]] += e["dur"]
    by_thread[(e["pid"], e["tid"])] += e["dur"]
    if kind == "matmul":
      flops += ops[e["name"]]["flops"]
  ms = {k: v / per / 1e3 for k, v in by_kind.items()}
  busiest_ms = max(by_thread.values(), default=0) / calls / 1e3
  return {"ms_per_call_and_device": ms,
          "ms_per_call_and_device_by_part": {k: v / per / 1e3 for k, v in by_part.items()},
          "not_in_ops_ms": wall_s * 1e3 - busiest_ms,
          "matmul_gflops_per_s": flops / calls / devices / max(ms.get("matmul", 0), 1e-9) / 1e6,
          "top_ops": [{"op": k, "what": ops.get(k, {}).get("what", ""), "kind": kind_of(k, ops),
                       "ms": v / per / 1e3} for k, v in by_op.most_common(12)]}


def peak_matmul() -> float:
  """GFLOP/s per device of a [2048, 256] x [256, 688] fp32 matmul (the train step's MLP, one
  device's rows) run on every host device at once, as the data-parallel train step runs."""
  import jax
  import jax.numpy as jnp

  from collab_rl import sharding as sharding_lib

  n = len(jax.devices())
  mesh = sharding_lib.make_mesh((-1, 1, 1))
  a = jax.device_put(jax.random.normal(jax.random.key(0), (2048 * n, 256)),
                     sharding_lib.batch_sharding(mesh))
  b = jax.device_put(jax.random.normal(jax.random.key(1), (256, 688)),
                     sharding_lib.replicated(mesh))
  f = jax.jit(lambda a, b: jnp.dot(a, b))
  sec = common.median_seconds(lambda: f(a, b), 20, jax.block_until_ready)
  return 2 * 2048 * 256 * 688 / sec / 1e9


def decode_matmuls(rows: int, devices: int, tokens: int = 128) -> float:
  """GFLOP/s per device of the tiny Llama's decode-step dots alone (each layer's fused q/k/v,
  o, fused gate/up and down projections, then the LM head), `rows` rows a device, chained for
  `tokens` steps in one `fori_loop` on the first `devices` host devices at once, the weights
  one shared copy (as the batch-16 generation reads them). Every step reads all the weights
  again for few rows: the best a decode step's dots reach here, with no attention, sampling or
  loop around them."""
  import jax
  import jax.numpy as jnp

  from collab_rl import sharding as sharding_lib

  c = tiny_llama.HF_CONFIG
  d, f, heads, kv = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                     c["num_key_value_heads"])
  qkv = d + 2 * d // heads * kv
  layer = [(d, qkv), (d, d), (d, 2 * f), (f, d)]
  shapes = layer * c["num_hidden_layers"] + [(d, c["vocab_size"])]
  ws = [jax.random.normal(jax.random.key(i), s) * 0.02 for i, s in enumerate(shapes)]
  mesh = sharding_lib.make_mesh((-1, 1, 1), devices=jax.devices()[:devices])

  def run(x_RxD, ws):
    def step(_, x_RxD):
      for i in range(0, len(ws) - 1, 4):
        wqkv, wo, wgu, wd = ws[i:i + 4]
        x_RxD = x_RxD + (x_RxD @ wqkv)[:, :d] @ wo
        gu_RxF2 = x_RxD @ wgu
        x_RxD = x_RxD + (jax.nn.silu(gu_RxF2[:, :f]) * gu_RxF2[:, f:]) @ wd
      return x_RxD + 1e-3 * jnp.max(x_RxD @ ws[-1], axis=-1, keepdims=True)
    return jax.lax.fori_loop(0, tokens, step, x_RxD)

  x = jax.device_put(jnp.full((rows * devices, d), 0.01), sharding_lib.batch_sharding(mesh))
  ws = sharding_lib.replicate_host_shared(ws, sharding_lib.replicated(mesh))
  jitted = jax.jit(run)
  sec = common.median_seconds(lambda: jitted(x, ws), 7, jax.block_until_ready)
  return 2 * rows * sum(a * b for a, b in shapes) * tokens / sec / 1e9


def main(argv):
  del argv
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={_HOST_DEVICES.value}")
  import jax
  import torch
  import transformers

  result = {"model": tiny_llama.HF_CONFIG, "host_devices": _HOST_DEVICES.value,
            "xla_flags": os.environ["XLA_FLAGS"].strip(), "programs": {}}
  with tempfile.TemporaryDirectory() as folder:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**tiny_llama.HF_CONFIG)).save_pretrained(folder)
    calls = tiny_llama.collab_rl_programs(folder)
    for name in _PROGRAMS.value:
      wall, events = profile(calls[name], _CALLS.value)
      text = calls[name].hlo()
      module = re.match(r"HloModule ([\w.\-]+)", text).group(1)
      devices = 1 if name.endswith("_b1") else len(jax.devices())
      row = {"wall_ms_per_call": wall * 1e3}
      row.update(summarise(events, hlo_ops(text), module, _CALLS.value, devices, wall))
      result["programs"][name] = row
      print(name, json.dumps(row, indent=1))
  result["peak_matmul_gflops_per_s"] = peak_matmul()
  print("a [2048, 256] x [256, 688] matmul on every device at once:",
        f"{result['peak_matmul_gflops_per_s']:.1f} GFLOP/s per device")
  rows, n = 16 // len(jax.devices()), len(jax.devices())  # the batch-16 generation's rows
  result["decode_matmuls_gflops_per_s"] = decode_matmuls(rows, n)
  result["decode_matmuls_one_device_gflops_per_s"] = decode_matmuls(rows, 1)
  print(f"the decode step's dots alone, {rows} rows a device, chained over 128 tokens:",
        f"{result['decode_matmuls_gflops_per_s']:.1f} GFLOP/s per device on {n} at once,",
        f"{result['decode_matmuls_one_device_gflops_per_s']:.1f} on one device alone")
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
