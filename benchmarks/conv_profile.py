"""Benchmark: where the CPU U-Net train step spends its time, and what each 3x3 convolution costs by method.

    source scripts/cpu_env.sh        # optional, the CPU recipe; the JSON records LD_PRELOAD either way
    python benchmarks/conv_profile.py [--batches 8,32] [--parts step,layers] [--tiles 2,3,4]
        [--out benchmarks/results/conv_profile.json]

`step`: the engine's train step (configs/supervised.py, `model.conv_impl` from --conv-impl) traced with
jax.profiler over --steps steps after --warmup. XLA:CPU runs a compiled program as thunks (one per fusion,
matmul or convolution) on a pool of threads; each thunk's time is attributed to the named scope of
labeleff_jax/cpu/convolutions.py it comes from (winograd_input_transform, winograd_matmuls, ...) or, outside
them, to its kind of operation, split by pass (forward, backward). Also: how long 0, 1 or 2+ threads ran a
thunk at once, and the rate of the slowest matmul and convolution thunks. Thread time adds up over threads,
so it exceeds the step's wall time when thunks overlap.

`layers`: every distinct 3x3 convolution of the reference U-Net on its own (jit, best of --repeats), at each
batch size: forward, input gradient and kernel gradient with XLA's convolution and with Winograd F(m x m,
3x3) for each --tiles m, and the kernel gradient as tap-wise matmuls. The rows say which method is fastest
alone; the step profile says whether that holds inside the step, where other thunks run beside it.
"""

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import train_step as train_step_benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

# The scopes of labeleff_jax/cpu/convolutions.py, in the order they are looked for in an op's name.
SCOPES = ("winograd_input_transform", "winograd_gradient_transform", "winograd_output_transform",
          "winograd_kernel_transform", "winograd_matmuls", "tapwise_kernel_gradient")
# (side, input channels, output channels) of the reference U-Net's 3x3 convolutions on 120 px inputs.
UNET_CONVOLUTIONS = ((120, 12, 64), (120, 64, 64), (120, 128, 64), (60, 64, 128), (60, 128, 128),
                     (60, 256, 128), (60, 128, 64), (30, 128, 256), (30, 256, 256), (30, 512, 256),
                     (30, 256, 128), (15, 256, 512), (15, 512, 512), (15, 1024, 512), (15, 512, 256),
                     (7, 512, 512))
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]")


def parse_hlo(text: str) -> dict:
  """{instruction: (op_name, flops)} of a compiled module's text, for the instructions XLA:CPU runs as
  thunks (not those inside a fusion); flops count dots and convolutions, those of a fusion included."""
  computations, current = {}, None
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if header and line.rstrip().endswith("{"):
      current = computations.setdefault(header.group(1), {"shapes": {}, "lines": []})
      continue
    instruction = _INSTRUCTION.match(line)
    if current is not None and instruction:
      current["shapes"][instruction.group(1)] = [int(d) for d in instruction.group(3).split(",") if d]
      current["lines"].append(line)

  def product(values):
    total = 1
    for value in values:
      total *= value
    return total

  def own_flops(line, shapes):
    output = shapes[_INSTRUCTION.match(line).group(1)]
    dot = re.search(r" dot\(%([^,\s)]+), %([^,\s)]+)\), lhs_contracting_dims=\{([\d,]*)\}", line)
    if dot:
      lhs = shapes.get(dot.group(1), [])
      return 2 * product(output) * product(lhs[int(d)] for d in dot.group(3).split(",") if d)
    conv = re.search(r" convolution\(%([^,\s)]+), %([^,\s)]+)\), window=\{size=(\d+)x(\d+).*dim_labels=\w+_(\w+)->",
                     line)
    if conv:
      kernel = shapes.get(conv.group(2), [])
      return 2 * product(output) * int(conv.group(3)) * int(conv.group(4)) * kernel[conv.group(5).index("i")]
    return 0

  def computation_flops(name):
    computation = computations.get(name, {"shapes": {}, "lines": []})
    return sum(own_flops(line, computation["shapes"]) for line in computation["lines"])

  fused = {re.search(r"calls=%([\w.\-]+)", line).group(1) for computation in computations.values()
           for line in computation["lines"] if " fusion(" in line and "calls=%" in line}
  info = {}
  for name, computation in computations.items():
    if name in fused:  # its instructions run inside the fusion's thunk, which counts them
      continue
    for line in computation["lines"]:
      instruction = _INSTRUCTION.match(line).group(1)
      op_name = re.search(r'op_name="([^"]*)"', line)
      called = re.search(r"calls=%([\w.\-]+)", line)
      flops = computation_flops(called.group(1)) if called else own_flops(line, computation["shapes"])
      info[instruction] = (op_name.group(1) if op_name else "", flops)
  return info


def category(op_name: str, instruction: str) -> tuple[str, str]:
  """(pass, what) of a thunk: 'backward' under a transpose of the forward pass; what = the innermost
  convolution scope, else the operation's own name."""
  pass_ = "backward" if "transpose(" in op_name else "forward"
  scope = next((s for s in SCOPES if s in op_name), None)
  if scope:
    return pass_, scope
  if "conv_general_dilated" in op_name:
    return pass_, "xla_convolution"
  last = op_name.rsplit("/", 1)[-1] if op_name else re.sub(r"\.\d+$", "", instruction)
  return pass_, re.sub(r"\W", "_", last)


def profile_step(config, *, warmup: int, steps: int) -> dict:
  """Traces `steps` train steps and attributes every thunk's time (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from labeleff_jax import models  # pylint: disable=g-import-not-at-top

  built = train_step_benchmark.build_step(config)
  state, rng_state, batch = built.state, built.rng_state, built.batch
  with jax.set_mesh(built.mesh):
    compiled = built.train_step.lower(state, rng_state, batch, jnp.asarray(0, jnp.int32)).compile()
    hlo = parse_hlo(compiled.as_text())
    for i in range(warmup):
      state, _ = compiled(state, rng_state, batch, jnp.asarray(i, jnp.int32))
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
      walls = []
      jax.profiler.start_trace(trace_dir)
      for i in range(steps):
        start = time.perf_counter()
        state, _ = compiled(state, rng_state, batch, jnp.asarray(warmup + i, jnp.int32))
        jax.block_until_ready(state)
        walls.append(time.perf_counter() - start)
      jax.profiler.stop_trace()
      trace_file = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))[-1]
      events = [e for e in json.load(gzip.open(trace_file))["traceEvents"] if e.get("ph") == "X"]

  thunks = [e for e in events if e["name"] in hlo]
  by_category = collections.Counter()
  for event in thunks:
    by_category["/".join(category(hlo[event["name"]][0], event["name"]))] += event["dur"]
  total_us = sum(by_category.values())
  small = [k for k, v in by_category.items() if v < total_us / 200]  # under 0.5 % each
  by_category[f"other ({len(small)} kinds under 0.5 % each)"] = sum(by_category.pop(k) for k in small)

  # Threads running a thunk at once, over the traced steps (1 us resolution).
  begin = min(e["ts"] for e in thunks)
  end = max(e["ts"] + e["dur"] for e in thunks)
  changes = collections.Counter()
  for event in thunks:
    changes[int(event["ts"] - begin)] += 1
    changes[int(event["ts"] + event["dur"] - begin)] -= 1
  busy = collections.Counter()
  running, last = 0, 0
  for moment in sorted(changes):
    busy[min(running, 2)] += moment - last
    running, last = running + changes[moment], moment
  busy[0] += max(0, int(end - begin) - last)

  rates = collections.defaultdict(list)
  for event in thunks:
    op_name, flops = hlo[event["name"]]
    if flops and event["dur"] > 0:
      kind = "convolution" if "conv_general_dilated" in op_name and not any(s in op_name for s in SCOPES) \
          else "matmul"
      rates[kind].append((event["dur"], flops, event["name"], op_name))
  slowest = {kind: [{"thunk": name, "ms": round(dur / 1e3, 2), "gflop": round(flops / 1e9, 3),
                     "gflop_per_s": round(flops / dur / 1e3, 1), "op_name": op_name}
                    for dur, flops, name, op_name in sorted(rows, reverse=True)[:8]]
             for kind, rows in rates.items()}
  totals = {kind: {"thread_ms_per_step": round(sum(r[0] for r in rows) / steps / 1e3, 1),
                   "gflop_per_step": round(sum(r[1] for r in rows) / steps / 1e9, 2),
                   "gflop_per_thread_s": round(sum(r[1] for r in rows) / sum(r[0] for r in rows) / 1e3, 1)}
            for kind, rows in rates.items()}
  return {
      "batch": config.train.batch_size, "conv_impl": models.resolve_conv_impl(config.model.conv_impl),
      "steps": steps, "warmup": warmup, "step_wall_s": [round(w, 3) for w in walls],
      "thunk_thread_ms_per_step": round(total_us / steps / 1e3, 1),
      "by_category_thread_ms_per_step": {k: round(v / steps / 1e3, 1) for k, v in by_category.most_common()},
      "by_category_share": {k: round(v / total_us, 3) for k, v in by_category.most_common()},
      "threads_busy_ms_per_step": {f"{n}{'+' if n == 2 else ''}": round(busy[n] / steps / 1e3, 1)
                                   for n in (0, 1, 2)},
      "matmul_and_convolution_rates": totals, "slowest_thunks": slowest,
  }


def time_best(fn, *args, repeats: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return round(best * 1e3, 2)


def profile_layers(batch: int, tiles: list[int], repeats: int) -> list[dict]:
  """Milliseconds of each U-Net 3x3 convolution's three computations by method (module docstring)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from labeleff_jax.cpu import convolutions  # pylint: disable=g-import-not-at-top

  same = ((1, 1), (1, 1))
  flipped = lambda w: jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  rows = []
  for side, cin, cout in UNET_CONVOLUTIONS:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, side, side, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) / np.sqrt(9 * cin))
    dy = jnp.asarray(rng.standard_normal((batch, side, side, cout), np.float32))
    row = {"side": side, "in": cin, "out": cout,
           "used_by_cpu_fast": convolutions.winograd_tile(x.shape, w.shape, (1, 1), same, jnp.float32),
           "forward_ms": {"xla": time_best(lambda x, w: convolutions._xla_conv(x, w, (1, 1), same), x, w,
                                           repeats=repeats)},
           "input_gradient_ms": {"xla": time_best(
               lambda d, w: convolutions._xla_conv(d, flipped(w), (1, 1), same), dy, w, repeats=repeats)},
           "kernel_gradient_ms": {"tapwise": time_best(
               lambda x, d: convolutions.kernel_gradient(x, d, w.shape, (1, 1), same), x, dy, repeats=repeats)}}
    for tile in tiles:
      row["forward_ms"][f"winograd_{tile}"] = time_best(
          lambda x, w: convolutions.winograd_conv3x3(x, w, tile), x, w, repeats=repeats)
      row["input_gradient_ms"][f"winograd_{tile}"] = time_best(
          lambda d, w: convolutions.winograd_conv3x3(d, flipped(w), tile), dy, w, repeats=repeats)
      row["kernel_gradient_ms"][f"winograd_{tile}"] = time_best(
          lambda x, d: convolutions.winograd_kernel_gradient(x, d, tile), x, dy, repeats=repeats)
    for part in ("forward_ms", "input_gradient_ms", "kernel_gradient_ms"):
      row[part.replace("_ms", "_fastest")] = min(row[part], key=row[part].get)
    print(json.dumps(row), file=sys.stderr, flush=True)
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", default="8,32")
  parser.add_argument("--parts", default="step,layers", help="comma-separated: step, layers")
  parser.add_argument("--conv-impl", default="auto", help="config.model.conv_impl of the profiled step")
  parser.add_argument("--tiles", default="2,3,4", help="Winograd output tile sizes timed in `layers`")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "conv_profile.json"))
  args = parser.parse_args()
  parts = args.parts.split(",")
  if set(parts) - {"step", "layers"}:
    parser.error(f"--parts takes step and/or layers, got {args.parts!r}")
  environment = train_step_benchmark.environment(None)
  environment["recipe_env"] = {k: os.environ[k] for k in ("LD_PRELOAD", "XLA_FLAGS") if os.environ.get(k)}
  report = {"benchmark": "where the U-Net train step spends its time on a CPU; 3x3 convolutions by method",
            "command": " ".join(["python", "benchmarks/conv_profile.py"] + sys.argv[1:]),
            "environment": environment, "step": [], "layers": {}}
  for batch in [int(b) for b in args.batches.split(",")]:
    if "step" in parts:
      config = train_step_benchmark.benchmark_config("supervised", batch, "float32", args.conv_impl)
      report["step"].append(profile_step(config, warmup=args.warmup, steps=args.steps))
    if "layers" in parts:
      report["layers"][str(batch)] = profile_layers(batch, [int(t) for t in args.tiles.split(",")],
                                                     args.repeats)
  environment["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
  train_step_benchmark.write_report(report, args.out)


if __name__ == "__main__":
  main()
