"""Benchmark: the supervised U-Net train step (images/s, compile time, peak RSS) in JAX vs the PyTorch reference.

    python benchmarks/train_step.py [--torch-python /tmp/torchvenv/bin/python] [--quick]
        [--batches 8,32] [--out benchmarks/results/train_step.json]

The JAX step is the engine's own: configs/supervised.py (the reference U-Net, 17,445,389 parameters, SGD
lr 1e-4), `models.create_model`, `optim.make_optimizer`, `train.build_steps` (donated state) on a 1-device
mesh, random 120x120x12 inputs. Every configuration (batch x compute dtype x XLA_FLAGS) runs in a fresh
subprocess: XLA_FLAGS must be set before jax is imported, and XLA:CPU has no memory statistics, so the peak
RSS of the child (os.wait4) is the memory figure. The torch configurations (torch_reference.py's `step` in
float32, benchmarks/torch_step.py under bf16 autocast) run interleaved with the JAX ones, so a change of the
machine's load hits both sides; the JSON records the load average around every measurement. JAX workers
set up their process like main.py (labeleff_jax's XLA flags, glibc.malloc.hugetlb=1); torch runs as
installed.

oneDNN numerics: every JAX configuration reports the loss and gradient norm of its first step (same seed,
same inputs); the JSON compares them with and without `--xla_cpu_use_onednn=true`.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_REFERENCE = REPO / "benchmarks" / "torch_reference.py"
ONEDNN = "--xla_cpu_use_onednn=true"
THREADS = 2


# ---------------------------------------------------------------------------------------------------------
# Child side: one JAX configuration, run by `train_step.py --worker JSON`.
# ---------------------------------------------------------------------------------------------------------
def random_batch(config, batch_size: int, seed: int = 0) -> dict:
  """A global batch shaped like the pipeline's: inputs per modality (NHWC), labels, valid mask."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from labeleff_jax.data import constants  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  inputs = {m: rng.uniform(0, 1, (batch_size, size, size, constants.MODALITIES[m])).astype(np.float32)
            for m in config.data.modalities}
  labels = {t.label: rng.integers(0, t.num_classes, (batch_size,)).astype(np.int32) for t in config.tasks}
  return {"inputs": inputs, "labels": labels, "valid": np.ones((batch_size,), bool),
          "index": np.arange(batch_size, dtype=np.int32)}


def run_jax_step(config, *, warmup: int, steps: int) -> dict:
  """Builds the engine's donated train step for `config`, compiles it, runs warm-up and timed steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from labeleff_jax import objectives, sharding, train  # pylint: disable=g-import-not-at-top

  P = jax.sharding.PartitionSpec
  batch_size = config.train.batch_size
  mesh = sharding.make_mesh(1)
  start = time.perf_counter()
  setup = train.init_training(config, mesh, objectives.make_objective(config), steps_per_epoch=100,
                              total_steps=1000)
  num_params, state, rng_state, train_step = setup.num_params, setup.state, setup.rng_state, setup.train_step
  del setup
  batch = jax.device_put(random_batch(config, batch_size), jax.sharding.NamedSharding(mesh, P("data")))
  jax.block_until_ready((state, batch))
  build_s = time.perf_counter() - start

  with jax.set_mesh(mesh):
    step_arg = jnp.asarray(0, jnp.int32)
    start = time.perf_counter()
    compiled = train_step.lower(state, rng_state, batch, step_arg).compile()
    compile_s = time.perf_counter() - start
    # Where the engine writes XLA's scratch block first (labeleff_jax/scratch_prefault.py), its sizes.
    scratch_prefault = next(iter(getattr(train_step, "blocks", {}).values()), None)
    start = time.perf_counter()
    state, metrics = compiled(state, rng_state, batch, step_arg)
    metrics = jax.device_get(metrics)
    first_step_s = time.perf_counter() - start
    for i in range(warmup):
      state, _ = compiled(state, rng_state, batch, jnp.asarray(1 + i, jnp.int32))
    jax.block_until_ready(state)
    # Each step timed on its own (waiting for it costs ~1 ms of a 2 s step), with the memory the host took
    # back meanwhile: on a VM with free page reporting, single steps differ by ~15 % because of it.
    step_times, reported_kib = [], [host_reported_kib()]
    for i in range(steps):
      start = time.perf_counter()
      state, last = compiled(state, rng_state, batch, jnp.asarray(1 + warmup + i, jnp.int32))
      jax.block_until_ready((state, last))
      step_times.append(time.perf_counter() - start)
      reported_kib.append(host_reported_kib())
    step_reported_mib = ([] if reported_kib[0] is None else
                         [(after - before) // 1024 for before, after in zip(reported_kib, reported_kib[1:])])
    step_s = sum(step_times) / steps
  return {"images_per_s": batch_size / step_s, "step_s": step_s,
          "step_s_min_median_max": [min(step_times), statistics.median(step_times), max(step_times)],
          "step_times_s": [round(t, 3) for t in step_times],
          "step_host_reported_mib": step_reported_mib, **split_by_host_reporting(step_times, step_reported_mib),
          "compile_s": compile_s, "scratch_prefault": scratch_prefault,
          "first_step_s": first_step_s, "build_s": build_s, "num_params": int(num_params),
          "first_loss": float(metrics["loss"]), "first_grad_norm": float(metrics["grad_norm"]),
          "last_loss": float(jax.device_get(last["loss"])), "warmup_steps": warmup, "timed_steps": steps,
          "xla_flags_effective": os.environ.get("XLA_FLAGS", ""),  # labeleff_jax adds its defaults
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def supervised_config(batch_size: int, dtype: str):
  from configs import supervised  # pylint: disable=g-import-not-at-top
  config = supervised.get_config()
  config.unlock()
  config.train.batch_size = batch_size
  config.train.compute_dtype = dtype
  config.mesh.data = 1
  return config


def worker(spec: dict) -> dict:
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  if spec["bench"] == "supervised":
    config = supervised_config(spec["batch"], spec["dtype"])
  else:
    from configs import contrastive  # pylint: disable=g-import-not-at-top
    config = contrastive.get_config()
    config.unlock()
    config.train.batch_size = spec["batch"]
    config.train.compute_dtype = spec["dtype"]
    config.mesh.data = 1
  return run_jax_step(config, warmup=spec["warmup"], steps=spec["steps"])


# ---------------------------------------------------------------------------------------------------------
# Parent side: subprocesses, peak RSS, load, environment.
# ---------------------------------------------------------------------------------------------------------
def run_child(argv: list[str], env_updates: dict | None = None, timeout_s: float | None = None) -> dict:
  """Runs argv, parses the last stdout line as JSON, adds wall time, peak RSS (os.wait4) and the load.

  With `timeout_s`, a child still running then is killed and reported as {"timed_out_s": timeout_s}.
  """
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update({"OMP_NUM_THREADS": str(THREADS), **(env_updates or {})})
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    timed_out = False
    while True:  # os.wait4, not Popen.wait: it also returns the child's peak RSS
      pid, status, usage = os.wait4(process.pid, 0 if deadline is None else os.WNOHANG)
      if pid:
        break
      if time.monotonic() > deadline:
        process.kill()
        _, status, usage = os.wait4(process.pid, 0)
        timed_out = True
        break
      time.sleep(0.5)
    process.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read().decode(), err.read().decode()
  wall = time.perf_counter() - start
  if timed_out:
    return {"timed_out_s": timeout_s, "wall_s": round(wall, 1),
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
  if process.returncode != 0:
    return {"error": f"exit {process.returncode}: {stderr[-2000:]}"}
  result = json.loads(stdout.strip().splitlines()[-1])
  result.update(peak_rss_mib=round(usage.ru_maxrss / 1024, 1), wall_s=round(wall, 1),
                load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)])
  return result


def run_jax(bench: str, batch: int, dtype: str, onednn: bool, warmup: int, steps: int) -> dict:
  spec = {"bench": bench, "batch": batch, "dtype": dtype, "warmup": warmup, "steps": steps}
  env = {"XLA_FLAGS": ONEDNN} if onednn else {}
  result = run_child([sys.executable, __file__, "--worker", json.dumps(spec)], env)
  result.update(framework="jax", batch=batch, dtype=dtype, xla_flags=env.get("XLA_FLAGS", ""))
  log(result)
  return result


def run_torch(torch_python: str, model: str, batch: int, autocast: bool, warmup: int, steps: int,
              timeout_s: float | None = None) -> dict:
  argv = [torch_python, str(TORCH_REFERENCE), "step", model, str(batch), str(steps), "--warmup", str(warmup),
          "--threads", str(THREADS)] + (["--autocast"] if autocast else [])
  result = run_child(argv, timeout_s=timeout_s)
  if "timed_out_s" in result:
    # It did not finish its warm-up and timed steps in time, so it ran slower than this on average.
    result["images_per_s_at_most"] = (warmup + steps) * batch / timeout_s
  result.update(framework="torch", batch=batch, dtype="bfloat16 autocast" if autocast else "float32",
                command=" ".join(argv[1:]))
  log(result)
  return result


def log(result: dict) -> None:
  keys = ("framework", "batch", "dtype", "xla_flags", "images_per_s", "images_per_s_at_most", "step_s",
          "compile_s", "peak_rss_mib", "load_avg_1m", "error")
  print(json.dumps({k: result[k] for k in keys if k in result}), file=sys.stderr, flush=True)


# Kernel settings that decide what a freshly faulted page costs. On a VM with free page reporting (a virtio
# balloon; `min_free_ms` 0 reports a freed 2 MiB block to the host at once), memory that XLA:CPU frees after
# one step and faults in again in the next comes back from the host, which made most batch-8 steps here
# ~0.3 s slower (benchmarks/README.md). Absent files are left out.
KERNEL_MEMORY_FILES = {
    "transparent_hugepage": "/sys/kernel/mm/transparent_hugepage/enabled",
    "transparent_hugepage_defrag": "/sys/kernel/mm/transparent_hugepage/defrag",
    "page_reporting_order": "/sys/module/page_reporting/parameters/page_reporting_order",
    "page_reporting_min_free_ms": "/sys/module/page_reporting/parameters/min_free_ms",
}


# KiB the (Firecracker) free page reporting driver has handed to the host so far; the difference of two
# readings says how much freed memory went back in between.
PAGE_REPORTING_KIB_FILE = "/sys/module/page_reporting/parameters/reported_kib"


def read_files(files: dict, convert=str.strip) -> dict:
  """{name: convert(contents)} of the files that exist and convert; the others are left out."""
  values = {}
  for name, path in files.items():
    try:
      values[name] = convert(pathlib.Path(path).read_text())
    except (OSError, ValueError):
      pass
  return values


def host_reported_kib() -> int | None:
  """The page reporting driver's counter now, None where the kernel has none."""
  return read_files({"kib": PAGE_REPORTING_KIB_FILE}, int).get("kib")


# A step during which the host took back at least this much is counted as hit by it. Reporting passes that
# catch XLA:CPU's freed temporaries take 64-192 MiB; other processes' frees add a few MiB now and then.
HOST_REPORTING_HIT_MIB = 32


def split_by_host_reporting(step_times: list, step_reported_mib: list) -> dict:
  """Mean step time of the steps during which the host took back freed memory, and of the others."""
  if not step_reported_mib:
    return {}
  hit = [t for t, mib in zip(step_times, step_reported_mib) if mib >= HOST_REPORTING_HIT_MIB]
  clean = [t for t, mib in zip(step_times, step_reported_mib) if mib < HOST_REPORTING_HIT_MIB]
  return {"steps_with_host_reporting": len(hit),
          "step_s_with_host_reporting": sum(hit) / len(hit) if hit else None,
          "step_s_without_host_reporting": sum(clean) / len(clean) if clean else None}


def environment(torch_python: str | None) -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import numpy  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  cpu = "unknown"
  flags = ""
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name") and cpu == "unknown":
        cpu = line.split(":", 1)[1].strip()
      if line.startswith("flags") and not flags:
        flags = line.split(":", 1)[1]
  env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
         "cpu_count": os.cpu_count(), "cpu_simd": sorted(f for f in flags.split() if f.startswith(("avx", "amx"))),
         "load_avg_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
         "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
         "optax": optax.__version__, "numpy": numpy.__version__,
         "xla_flags_parent": os.environ.get("XLA_FLAGS", ""), "threads": THREADS,
         "kernel_memory": read_files(KERNEL_MEMORY_FILES)}
  if torch_python:
    probe = subprocess.run([torch_python, "-c", "import torch; print(torch.__version__, "
                            "torch.backends.cpu.get_cpu_capability())"], capture_output=True, text=True,
                           check=False)
    env["torch"], _, env["torch_cpu_capability"] = probe.stdout.strip().partition(" ")
  return env


def ratio(a: dict | None, b: dict | None) -> float | None:
  if not a or not b or "images_per_s" not in a or "images_per_s" not in b:
    return None
  return round(a["images_per_s"] / b["images_per_s"], 3)


def relative_difference(a: float, b: float) -> float:
  return abs(a - b) / max(abs(a), abs(b), 1e-30)


def numerics(runs: list[dict]) -> list[dict]:
  """First-step loss and gradient norm with vs without oneDNN, same seed and inputs."""
  rows = []
  for plain in runs:
    if plain.get("framework") != "jax" or plain["xla_flags"] or "first_loss" not in plain:
      continue
    for other in runs:
      if (other.get("framework") == "jax" and other["xla_flags"] == ONEDNN and other["batch"] == plain["batch"]
          and other["dtype"] == plain["dtype"] and "first_loss" in other):
        rows.append({"batch": plain["batch"], "dtype": plain["dtype"],
                     "loss": [plain["first_loss"], other["first_loss"]],
                     "grad_norm": [plain["first_grad_norm"], other["first_grad_norm"]],
                     "loss_rel_diff": relative_difference(plain["first_loss"], other["first_loss"]),
                     "grad_norm_rel_diff": relative_difference(plain["first_grad_norm"],
                                                               other["first_grad_norm"])})
  return rows


def find(runs, **match):
  for run in runs:
    if all(run.get(k) == v for k, v in match.items()) and "images_per_s" in run:
      return run
  return None


def best(runs, **match):
  hits = [r for r in runs if all(r.get(k) == v for k, v in match.items()) and "images_per_s" in r]
  return max(hits, key=lambda r: r["images_per_s"]) if hits else None


def summarize(runs: list[dict], batches: list[int]) -> dict:
  """JAX/torch images/s ratios per batch size, and the issue's goals."""
  out = {}
  for b in batches:
    torch32 = find(runs, framework="torch", batch=b, dtype="float32")
    torch16 = find(runs, framework="torch", batch=b, dtype="bfloat16 autocast")
    j32 = find(runs, framework="jax", batch=b, dtype="float32", xla_flags="")
    j32d = find(runs, framework="jax", batch=b, dtype="float32", xla_flags=ONEDNN)
    j16 = find(runs, framework="jax", batch=b, dtype="bfloat16", xla_flags="")
    j16d = find(runs, framework="jax", batch=b, dtype="bfloat16", xla_flags=ONEDNN)
    best32 = best(runs, framework="jax", batch=b, dtype="float32")
    best16 = best(runs, framework="jax", batch=b, dtype="bfloat16")
    best_jax = best(runs, framework="jax", batch=b)
    best_torch = best(runs, framework="torch", batch=b)
    row = {
        "fp32_default_vs_torch_fp32": ratio(j32, torch32),
        "fp32_onednn_vs_torch_fp32": ratio(j32d, torch32),
        "bf16_default_vs_torch_autocast": ratio(j16, torch16),
        "bf16_onednn_vs_torch_autocast": ratio(j16d, torch16),
        "best_jax_vs_torch_fp32": ratio(best_jax, torch32),
        "best_jax_vs_best_torch": ratio(best_jax, best_torch),
        "best_jax": best_jax and {k: best_jax[k] for k in ("dtype", "xla_flags", "images_per_s")},
        "best_torch": best_torch and {k: best_torch[k] for k in ("dtype", "images_per_s")},
    }
    fp32_ratio, bf16_ratio = ratio(best32, torch32), ratio(best16, torch16)
    row["goal_fp32_1.5x_torch"] = None if fp32_ratio is None else {"ratio": fp32_ratio, "met": fp32_ratio >= 1.5}
    row["goal_bf16_1x_autocast"] = None if bf16_ratio is None else {"ratio": bf16_ratio, "met": bf16_ratio >= 1.0}
    torch16_timed_out = next((r for r in runs if r.get("framework") == "torch" and r.get("batch") == b
                              and r.get("dtype") == "bfloat16 autocast" and "images_per_s_at_most" in r), None)
    if bf16_ratio is None and best16 and torch16_timed_out:
      at_least = round(best16["images_per_s"] / torch16_timed_out["images_per_s_at_most"], 3)
      row["goal_bf16_1x_autocast"] = {"ratio_at_least": at_least, "met": at_least >= 1.0,
                                      "note": "torch autocast timed out; its images/s is an upper bound"}
    out[f"batch_{b}"] = row
  return out


def write_report(report: dict, out: str) -> None:
  """Writes the JSON report to `out` and prints it."""
  text = json.dumps(report, indent=2)
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(out).write_text(text + "\n")
  print(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--torch-python", help="python of a venv with torch (e.g. /tmp/torchvenv/bin/python)")
  parser.add_argument("--quick", action="store_true", help="batch 8 only")
  parser.add_argument("--batches", default="8,32")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--onednn", default="off,on", help="XLA_FLAGS variants: off, on or off,on")
  parser.add_argument("--torch-timeout", type=float, default=600,
                      help="seconds a torch run may take; slower ones are killed and bounded from above")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
  args = parser.parse_args()
  if args.worker:
    sys.path.insert(0, str(REPO))
    print(json.dumps(worker(json.loads(args.worker))))
    return

  batches = [8] if args.quick else [int(b) for b in args.batches.split(",")]
  dtypes = args.dtypes.split(",")
  variants = [v == "on" for v in args.onednn.split(",")]
  # (warm-up, timed) steps by (batch, dtype). Torch's float32 step takes ~3 s at batch 8 and ~14 s at
  # batch 32 on this CPU, its bf16 autocast step ~60 s at batch 8. At batch 8 in float32 most JAX steps
  # here take either ~1.75 s or ~2.0 s (the host reclaiming freed memory, benchmarks/README.md): twenty
  # timed steps (and torch's reference step with twenty too) average that instead of sampling five.
  schedule = {(8, "float32"): (2, 20), (8, "bfloat16"): (1, 5)}
  env = environment(args.torch_python)
  print(json.dumps({"environment": env}), file=sys.stderr, flush=True)
  runs = []
  for b in batches:
    for dtype in dtypes:
      warmup, steps = schedule.get((b, dtype), (1, 2))
      # Interleaved: torch sits between the two JAX variants of the same dtype.
      runs.append(run_jax("supervised", b, dtype, variants[0], warmup, steps))
      if args.torch_python:
        runs.append(run_torch(args.torch_python, "unet", b, dtype == "bfloat16", warmup, steps,
                              args.torch_timeout))
      for onednn in variants[1:]:
        runs.append(run_jax("supervised", b, dtype, onednn, warmup, steps))
  env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
  report = {"benchmark": "supervised U-Net train step (configs/supervised.py, 120x120x12, SGD lr 1e-4)",
            "command": " ".join(["python", "benchmarks/train_step.py"] + sys.argv[1:]),
            "environment": env, "runs": runs, "ratios": summarize(runs, batches),
            "onednn_numerics": numerics(runs)}
  write_report(report, args.out)


if __name__ == "__main__":
  main()
