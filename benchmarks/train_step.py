"""Benchmark: the supervised U-Net train step (images/s, compile time, peak RSS), JAX vs the PyTorch reference,
as installed and under the CPU recipe (scripts/cpu_env.sh).

    python benchmarks/train_step.py [--torch-python /tmp/torchvenv/bin/python] [--quick]
        [--recipes default,cpu_env] [--batches 8,32] [--dtypes float32,bfloat16] [--conv-impls auto]
        [--out benchmarks/results/train_step.json]

The JAX step is the engine's own: configs/supervised.py (the reference U-Net, 17,445,389 parameters, SGD
lr 1e-4) built by `train.init_training` (donated `jax.jit`) on a 1-device mesh, random 120x120x12 inputs.
The torch step is benchmarks/torch_reference.py's (same model, SGD, cross-entropy), 2 threads.

A recipe is a set of environment variables applied to both sides before their process starts (an
allocator can only be chosen then): `default` adds nothing (the install as it comes), `cpu_env` is what
`source scripts/cpu_env.sh` exports, and the others are there to compare the recipe with alternatives
(see RECIPES). Every configuration runs in its own subprocess; peak RSS is that child's `ru_maxrss` (os.wait4).
JAX and torch runs of one batch size and dtype alternate recipe by recipe, so a change of the machine's
load hits both sides; the JSON records the load average around every run, the CPU, and the kernel's memory
settings (transparent huge pages, free page reporting), which decide what a re-faulted page costs.
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
import types

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_REFERENCE = REPO / "benchmarks" / "torch_reference.py"
CPU_ENV_SCRIPT = REPO / "scripts" / "cpu_env.sh"
THREADS = 2
# XLA:CPU's concurrency-optimised scheduler trades memory for parallelism; the pre-0.2 library turned it
# off on import, so the alternatives below can measure it without the library doing so.
NO_CONCURRENCY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def cpu_env_recipe() -> dict:
  """The variables `source scripts/cpu_env.sh` sets or changes, read from a shell that sourced it."""
  dump = subprocess.run(["bash", "-c", f"source {CPU_ENV_SCRIPT} >/dev/null 2>&1; env -0"], check=True,
                        capture_output=True).stdout.decode()
  after = dict(entry.split("=", 1) for entry in dump.split("\0") if "=" in entry)
  return {k: v for k, v in after.items() if k in ("LD_PRELOAD", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")
          and os.environ.get(k) != v}


def jemalloc_path() -> str:
  out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
  return next((line.split()[-1] for line in out.splitlines() if "libjemalloc.so.2 " in line), "")


RECIPES = {
    "default": lambda: {},
    "cpu_env": cpu_env_recipe,
    # The process setup main.py and `import labeleff_jax` applied before 0.2 (glibc huge pages for malloc,
    # the scheduler flag), kept here as the baseline the recipe replaced.
    "glibc_hugetlb_sched": lambda: {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                                    "XLA_FLAGS": NO_CONCURRENCY_SCHEDULER},
    "cpu_env_sched": lambda: {**cpu_env_recipe(), "XLA_FLAGS": NO_CONCURRENCY_SCHEDULER},
    "jemalloc": lambda: {"LD_PRELOAD": jemalloc_path()} if jemalloc_path() else {},
}


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


def build_step(config) -> types.SimpleNamespace:
  """The engine's donated train step for `config` on a 1-device mesh, with its state, a random global
  batch and the seconds the build took: mesh, num_params, state, rng_state, train_step, batch, build_s."""
  import jax  # pylint: disable=g-import-not-at-top
  from labeleff_jax import objectives, sharding, train  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(1)
  start = time.perf_counter()
  setup = train.init_training(config, mesh, objectives.make_objective(config), steps_per_epoch=100,
                              total_steps=1000)
  batch = jax.device_put(random_batch(config, config.train.batch_size),
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  jax.block_until_ready((setup.state, batch))
  return types.SimpleNamespace(mesh=mesh, num_params=setup.num_params, state=setup.state,
                               rng_state=setup.rng_state, train_step=setup.train_step, batch=batch,
                               build_s=time.perf_counter() - start)


def run_jax_step(config, *, warmup: int, steps: int) -> dict:
  """Builds the engine's donated train step for `config`, compiles it, runs warm-up and timed steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from labeleff_jax import models  # pylint: disable=g-import-not-at-top

  built = build_step(config)
  mesh, num_params, state, rng_state = built.mesh, built.num_params, built.state, built.rng_state
  train_step, batch, build_s, batch_size = built.train_step, built.batch, built.build_s, config.train.batch_size
  del built

  with jax.set_mesh(mesh):
    step_arg = jnp.asarray(0, jnp.int32)
    start = time.perf_counter()
    compiled = train_step.lower(state, rng_state, batch, step_arg).compile()
    compile_s = time.perf_counter() - start
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    start = time.perf_counter()
    state, metrics = compiled(state, rng_state, batch, step_arg)
    metrics = jax.device_get(metrics)
    first_step_s = time.perf_counter() - start
    for i in range(warmup):
      state, _ = compiled(state, rng_state, batch, jnp.asarray(1 + i, jnp.int32))
    jax.block_until_ready(state)
    # Each step timed on its own, with the memory the VM's host took back meanwhile (where the kernel
    # reports it): a step whose freed buffers went to the host pays to fault them in again.
    step_times, reported_kib = [], [host_reported_kib()]
    for i in range(steps):
      start = time.perf_counter()
      state, last = compiled(state, rng_state, batch, jnp.asarray(1 + warmup + i, jnp.int32))
      jax.block_until_ready((state, last))
      step_times.append(time.perf_counter() - start)
      reported_kib.append(host_reported_kib())
  reported_mib = ([] if reported_kib[0] is None else
                  [(after - before) // 1024 for before, after in zip(reported_kib, reported_kib[1:])])
  step_s = sum(step_times) / steps
  return {"images_per_s": batch_size / step_s, "step_s": step_s,
          "step_s_min_median_max": [min(step_times), statistics.median(step_times), max(step_times)],
          "step_times_s": [round(t, 3) for t in step_times], "step_host_reported_mib": reported_mib,
          "steps_with_host_reporting": sum(mib >= HOST_REPORTING_HIT_MIB for mib in reported_mib),
          "compile_s": compile_s, "xla_temp_mib": round(temp_bytes / 2**20, 1),
          "first_step_s": first_step_s, "build_s": build_s, "num_params": int(num_params),
          "conv_impl": models.resolve_conv_impl(config.model.conv_impl),
          "first_loss": float(metrics["loss"]), "first_grad_norm": float(metrics["grad_norm"]),
          "last_loss": float(jax.device_get(last["loss"])), "warmup_steps": warmup, "timed_steps": steps}


def benchmark_config(bench: str, batch: int, dtype: str, conv_impl: str):
  """configs/supervised.py or configs/contrastive.py at this batch size, dtype and conv_impl, 1 device."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  if bench == "supervised":
    from configs import supervised  # pylint: disable=g-import-not-at-top
    config = supervised.get_config()
  else:
    from configs import contrastive  # pylint: disable=g-import-not-at-top
    config = contrastive.get_config()
  config.unlock()
  config.train.batch_size = batch
  config.train.compute_dtype = dtype
  config.model.conv_impl = conv_impl
  config.mesh.data = 1
  return config


def worker(spec: dict) -> dict:
  config = benchmark_config(spec["bench"], spec["batch"], spec["dtype"], spec["conv_impl"])
  return run_jax_step(config, warmup=spec["warmup"], steps=spec["steps"])


# ---------------------------------------------------------------------------------------------------------
# Parent side: subprocesses, peak RSS, load, environment.
# ---------------------------------------------------------------------------------------------------------
def run_child(argv: list[str], env_updates: dict, timeout_s: float | None = None) -> dict:
  """Runs argv with `env_updates`, parses the last stdout line as JSON, adds wall time, peak RSS
  (os.wait4) and the load. A child still running after `timeout_s` is killed: {"timed_out_s": ...}."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "LD_PRELOAD", "GLIBC_TUNABLES", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")}
  env.update({"OMP_NUM_THREADS": str(THREADS), **env_updates})
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
  load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
  if timed_out:
    return {"timed_out_s": timeout_s, "wall_s": round(wall, 1), "load_avg_1m": load}
  if process.returncode != 0:
    return {"error": f"exit {process.returncode}: {stderr[-2000:]}", "load_avg_1m": load}
  result = json.loads(stdout.strip().splitlines()[-1])
  result.update(peak_rss_mib=round(usage.ru_maxrss / 1024, 1), wall_s=round(wall, 1), load_avg_1m=load)
  return result


def run_jax(bench: str, batch: int, dtype: str, recipe: str, conv_impl: str, warmup: int, steps: int) -> dict:
  spec = {"bench": bench, "batch": batch, "dtype": dtype, "conv_impl": conv_impl, "warmup": warmup,
          "steps": steps}
  env = RECIPES[recipe]()
  result = run_child([sys.executable, __file__, "--worker", json.dumps(spec)], env)
  result.update(framework="jax", batch=batch, dtype=dtype, recipe=recipe, recipe_env=env,
                conv_impl_config=conv_impl)
  log(result)
  return result


def run_torch(torch_python: str, model: str, batch: int, autocast: bool, recipe: str, warmup: int,
              steps: int, timeout_s: float | None = None) -> dict:
  argv = [torch_python, str(TORCH_REFERENCE), "step", model, str(batch), str(steps), "--warmup", str(warmup),
          "--threads", str(THREADS)] + (["--autocast"] if autocast else [])
  env = RECIPES[recipe]()
  result = run_child(argv, env, timeout_s=timeout_s)
  if "timed_out_s" in result:
    # It did not finish its warm-up and timed steps in time, so it ran slower than this on average.
    result["images_per_s_at_most"] = (warmup + steps) * batch / timeout_s
  result.update(framework="torch", batch=batch, dtype="bfloat16 autocast" if autocast else "float32",
                recipe=recipe, recipe_env=env, command=" ".join(argv[1:]))
  log(result)
  return result


def log(result: dict) -> None:
  keys = ("framework", "recipe", "batch", "dtype", "conv_impl", "images_per_s", "images_per_s_at_most",
          "step_s", "steps_with_host_reporting", "compile_s", "peak_rss_mib", "load_avg_1m", "error")
  print(json.dumps({k: result[k] for k in keys if k in result}), file=sys.stderr, flush=True)


# Kernel settings that decide what a freshly faulted page costs. On a VM with free page reporting (a virtio
# balloon whose host takes freed 2 MiB blocks back), memory freed after one step comes back from the host
# in the next. Absent files are left out.
KERNEL_MEMORY_FILES = {
    "transparent_hugepage": "/sys/kernel/mm/transparent_hugepage/enabled",
    "transparent_hugepage_defrag": "/sys/kernel/mm/transparent_hugepage/defrag",
    "page_reporting_order": "/sys/module/page_reporting/parameters/page_reporting_order",
    "page_reporting_min_free_ms": "/sys/module/page_reporting/parameters/min_free_ms",
}
# KiB the free page reporting driver has handed to the host so far.
PAGE_REPORTING_KIB_FILE = "/sys/module/page_reporting/parameters/reported_kib"
# A step during which the host took back at least this much counts as hit by it.
HOST_REPORTING_HIT_MIB = 32


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


def environment(torch_python: str | None) -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import numpy  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  cpu, flags = "unknown", ""
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name") and cpu == "unknown":
        cpu = line.split(":", 1)[1].strip()
      if line.startswith("flags") and not flags:
        flags = line.split(":", 1)[1]
  env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
         "cpu_count": os.cpu_count(), "cpu_simd": sorted(f for f in flags.split() if f.startswith(("avx", "amx"))),
         "kernel": platform.release(), "load_avg_start": [round(x, 2) for x in os.getloadavg()],
         "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "optax": optax.__version__, "numpy": numpy.__version__,
         "threads": THREADS, "kernel_memory": read_files(KERNEL_MEMORY_FILES)}
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


def find(runs, **match):
  return next((run for run in runs if all(run.get(k) == v for k, v in match.items()) and "images_per_s" in run),
              None)


# Goals of issue 13 for the float32 step under the CPU recipe, torch under the same recipe.
GOALS = {8: 1.3, 32: 1.5}


def summarize(runs: list[dict], batches: list[int], recipes: list[str], dtypes: list[str],
              conv_impls: list[str]) -> dict:
  """JAX/torch images/s per batch size, dtype, recipe (torch under the same recipe) and conv_impl, and the
  goals (float32, CPU recipe)."""
  out = {}
  for batch in batches:
    for dtype in dtypes:
      torch_dtype = "float32" if dtype == "float32" else "bfloat16 autocast"
      row = {}
      for recipe in recipes:
        torch_run = find(runs, framework="torch", batch=batch, dtype=torch_dtype, recipe=recipe)
        for conv_impl in conv_impls:
          jax_run = find(runs, framework="jax", batch=batch, dtype=dtype, recipe=recipe,
                         conv_impl_config=conv_impl)
          entry = {"jax_images_per_s": jax_run and round(jax_run["images_per_s"], 3),
                   "torch_images_per_s": torch_run and round(torch_run["images_per_s"], 3),
                   "jax_vs_torch": ratio(jax_run, torch_run)}
          if dtype == "float32" and recipe == "cpu_env" and batch in GOALS and entry["jax_vs_torch"]:
            entry["goal"] = {"ratio": GOALS[batch], "met": entry["jax_vs_torch"] >= GOALS[batch]}
          row[recipe if conv_impl == conv_impls[0] else f"{recipe}, conv_impl={conv_impl}"] = entry
      out[f"batch_{batch}_{dtype}"] = row
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
  parser.add_argument("--quick", action="store_true", help="batch 8, float32 only")
  parser.add_argument("--recipes", default="default,cpu_env", help=f"comma-separated, of {sorted(RECIPES)}")
  parser.add_argument("--batches", default="8,32")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--conv-impls", default="auto", help="config.model.conv_impl values for JAX")
  parser.add_argument("--torch-timeout", type=float, default=600,
                      help="seconds a torch run may take; slower ones are killed and bounded from above")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return

  batches = [8] if args.quick else [int(b) for b in args.batches.split(",")]
  dtypes = ["float32"] if args.quick else args.dtypes.split(",")
  recipes = args.recipes.split(",")
  unknown = sorted(set(recipes) - set(RECIPES))
  if unknown:
    parser.error(f"unknown recipes {unknown}; choose from {sorted(RECIPES)}")
  conv_impls = args.conv_impls.split(",")
  # (warm-up, timed) steps by (batch, dtype): enough timed steps at batch 8 float32 to average over the
  # step-to-step spread; fewer where a step takes many seconds. The warm-up covers the steps in which a
  # caching allocator grows its heap (under tcmalloc the first two batch-32 JAX steps took 12-15 s, the
  # ones after 5.7 s); the torch side gets the same.
  schedule = {(8, "float32"): (2, 20), (8, "bfloat16"): (2, 5), (32, "float32"): (3, 4),
              (32, "bfloat16"): (3, 4)}
  env = environment(args.torch_python)
  print(json.dumps({"environment": env}), file=sys.stderr, flush=True)
  runs = []
  for batch in batches:
    for dtype in dtypes:
      warmup, steps = schedule.get((batch, dtype), (2, 4))
      for recipe in recipes:  # JAX and torch alternate, recipe by recipe
        for conv_impl in conv_impls:
          runs.append(run_jax("supervised", batch, dtype, recipe, conv_impl, warmup, steps))
        if args.torch_python:
          runs.append(run_torch(args.torch_python, "unet", batch, dtype == "bfloat16", recipe, warmup, steps,
                                args.torch_timeout))
  env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
  report = {"benchmark": "supervised U-Net train step (configs/supervised.py, 120x120x12, SGD lr 1e-4)",
            "command": " ".join(["python", "benchmarks/train_step.py"] + sys.argv[1:]),
            "environment": env, "runs": runs, "ratios": summarize(runs, batches, recipes, dtypes, conv_impls)}
  write_report(report, args.out)


if __name__ == "__main__":
  main()
