"""Benchmark: the engine's train steps on the devices JAX finds (GPU, TPU or CPU), with MFU and feed rate.

    python benchmarks/accelerator.py [--batches 32,64,128] [--configs unet:float32,unet:bfloat16,...]
        [--unet-config multitask] [--warmup 5] [--steps 30] [--workers 0,N] [--peak-flops F]
        [--torch-python /path/to/torch/venv/bin/python] [--time-budget-s 450] [--conv-impl xla]
        [--data-dir DIR --manual-dir DIR] [--tiny] [--out benchmarks/results/accelerator_<device>.json]

What it measures, for each configuration (a model and a compute dtype) at each global batch:
- the train step the engine runs: `train.init_training` builds the donated, jitted step of the config and
  replicates the state on a 1-D `data` mesh over every device (`sharding.make_mesh`); the random batch is
  shaped like the pipeline's (docs/architecture.md, "Batches") and placed with `sharding.batch_layout`, so
  each device holds batch / devices rows;
- compile time (lowering + XLA compilation), the median of `--steps` steps timed one by one after
  `--warmup` untimed ones (each ended by `block_until_ready`), images/s = batch / median step time;
- peak device memory: the largest `peak_bytes_in_use` of the local devices' `memory_stats()` (null where
  the backend keeps none, e.g. CPU), and XLA's own estimate of the executable's buffers;
- FLOPs per step from the compiled step's `cost_analysis()`, and model FLOPs utilisation
  MFU = FLOPs per step / (median step time x devices x peak FLOP/s per device), the peak taken from
  PEAK_FLOPS by `device_kind` (or `--peak-flops`); null with the reason where neither is known.
- the input pipeline: `data.pipeline.make_train_iterator` on synthetic ben-ge data of the U-Net's config
  (written and prepared on first use by `splits.ensure_prepared`), batches/s with each `--workers` count at
  the same global batches, compared with the U-Net step's batches/s: `feeds` is true when the pipeline
  makes batches at least as fast as the step uses them. The two are timed apart, so this is an upper
  bound on the feed rate during training, when both share the host;
- with `--torch-python`: the PyTorch reference model of the U-Net config (benchmarks/torch_reference.py)
  on the same device, float32 and bf16 autocast, same batches, and JAX images/s / torch images/s.

Configurations: `unet` is `--unet-config` (default configs/multitask.py: the reference U-Net, 120x120 S2,
segmentation + classification + regression heads), `late_fusion` is configs/late_fusion.py (one U-Net per
modality), `contrastive` is configs/contrastive.py (two ResNet-18, NT-Xent; its images/s counts S2/S1
pairs). Each model and dtype runs in its own subprocess, batches in increasing order, so the peak memory of
a batch is not that of another model; the pipeline and torch get theirs too. `--time-budget-s` (450 s) bounds
the whole run: what has not started when it is spent is recorded as skipped, and a job still running
GRACE_S (30 s) later is killed, so that a default run takes at most 8 minutes.

`--tiny`: a CPU smoke run for the tests: the configs' `tiny` variants (32x32 inputs, narrow models), batch
8, 1 warm-up and 3 timed steps, the pipeline with 0 workers on the 48-patch synthetic dataset, no torch,
every job in one subprocess (CPU reports no device memory to keep apart; each subprocess costs seconds
of imports), compiled with XLA's backend optimisations off (TINY_XLA_FLAGS: half the compile time). Set
JAX_PLATFORMS=cpu and JAX_NUM_CPU_DEVICES=N to shard over N CPU devices.

Output: one JSON object, printed and written to `--out`: the command, git commit, machine (devices, host
CPU, versions), settings, one entry per configuration and batch, the pipeline, and torch.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Peak dense FLOP/s per device (one GPU, one TPU chip), by `jax.devices()[0].device_kind`, from the
# vendors' datasheets; dense means without the 2:4 structured sparsity NVIDIA's headline numbers assume,
# so NVIDIA's figures are halved. Sources: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: BF16 1,979 and
# TF32 989 TFLOPS sparse; H100 PCIe: 1,513 and 756), NVIDIA H200 datasheet (H200 SXM: the same tensor-core
# figures as H100 SXM), NVIDIA A100 datasheet (BF16 312, TF32 156 dense), NVIDIA L4 datasheet (BF16 242, TF32
# 120 sparse), Google Cloud TPU system-architecture pages (BF16 per chip: v4 275, v5e 197, v5p 459, v6e
# Trillium 918 TFLOPS).
# "float32" is the peak a float32 step can reach by default: on NVIDIA GPUs since Ampere XLA runs float32
# convolutions and matmuls on TF32 tensor cores unless jax_default_matmul_precision asks for more, so it is
# the TF32 peak; on TPUs the default precision runs them as single bf16 passes, so it is the bf16 peak.
_H100_SXM = {"bfloat16": 989e12, "float32": 494e12}
_A100 = {"bfloat16": 312e12, "float32": 156e12}
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "NVIDIA H200": _H100_SXM,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA L4": {"bfloat16": 121e12, "float32": 60e12},
    # TPU kinds as JAX names them (jax/_src/tpu_info.py accepts both spellings of v5e, v5p and v6e).
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
}

# Model name in --configs -> config module (configs/NAME.py); `unet` comes from --unet-config.
MODEL_CONFIGS = {"unet": None, "late_fusion": "late_fusion", "contrastive": "contrastive"}
UNET_CONFIGS = ("multitask", "supervised", "early_fusion", "quickstart")
# The torch_reference.py model and recipe of each U-Net config (quickstart's narrow 64 px model has none).
TORCH_MODELS = {"multitask": "multitask", "supervised": "supervised", "early_fusion": "early_fusion"}
DEFAULT_CONFIGS = "unet:float32,unet:bfloat16,late_fusion:bfloat16,contrastive:bfloat16"
# The compiled and the lowered FLOP counts should agree up to the work XLA adds or removes (replicated
# optimizer updates on every device, fusion): beyond this factor one of them is wrong, and the lowered
# count, made before any backend-specific rewriting, is the one used.
FLOPS_AGREEMENT = 2.0
TINY_XLA_FLAGS = "--xla_backend_optimization_level=0"
# Seconds a job may run past --time-budget-s (one compilation, say) before it is killed: 450 + 30 s is the
# 8 minutes a GPU run is given.
GRACE_S = 30


# ---------------------------------------------------------------------------------------------------------
# MFU arithmetic (no JAX needed).
# ---------------------------------------------------------------------------------------------------------
def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
  """The dense peak FLOP/s of one device of `device_kind` for steps computing in `dtype`, or None."""
  return PEAK_FLOPS.get(device_kind, {}).get(dtype)


def model_flops_utilization(flops_per_step: float | None, step_s: float | None, *, device_kind: str,
                            dtype: str = "bfloat16", num_devices: int = 1,
                            peak_flops: float | None = None) -> dict:
  """MFU = FLOPs per step / (step seconds x devices x peak FLOP/s per device).

  `flops_per_step` counts the whole step over all devices; `peak_flops` (per device) overrides the table.
  Returns {"mfu", "peak_flops_per_device", "peak_from", "reason"}: mfu is None, with the reason, when the
  FLOPs, the step time or the peak are unknown.
  """
  peak, source = peak_flops, "--peak-flops"
  if peak is None:
    peak, source = peak_flops_per_device(device_kind, dtype), f"PEAK_FLOPS[{device_kind!r}][{dtype!r}]"
  out = {"mfu": None, "peak_flops_per_device": peak, "peak_from": source if peak else None, "reason": None}
  if not peak:
    out["reason"] = f"no peak for device_kind {device_kind}"
  elif not flops_per_step:
    out["reason"] = "cost_analysis() gave no FLOP count"
  elif not step_s or step_s <= 0:
    out["reason"] = "no step time"
  else:
    out["mfu"] = flops_per_step / (step_s * num_devices * peak)
  return out


def slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


# ---------------------------------------------------------------------------------------------------------
# Child side: `accelerator.py --worker JSON` runs a list of JAX jobs, printing a JSON line per result.
# ---------------------------------------------------------------------------------------------------------
def make_config(config_name: str, *, dtype: str, tiny: bool, conv_impl: str, data_dir: str | None = None,
                manual_dir: str | None = None):
  """configs/CONFIG_NAME.py (its `tiny` variant with tiny) for `dtype`, on all devices, synthetic data."""
  import importlib  # pylint: disable=g-import-not-at-top
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from configs import common  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{config_name}").get_config("tiny" if tiny else None)
  config.unlock()
  config.train.compute_dtype = dtype
  config.model.conv_impl = conv_impl
  config.mesh.data = -1
  if not config.data.synthetic.num_patches:  # the full configs read the downloaded ben-ge by default
    common.use_synthetic(config, 800)
  # The configs' data paths are relative to the repository, where the children run; flags override them.
  config.data.data_dir = str(REPO / config.data.data_dir) if data_dir is None else data_dir
  config.data.manual_dir = str(REPO / config.data.manual_dir) if manual_dir is None else manual_dir
  return config


def synthetic_batch(config, rows: int, seed: int = 0) -> dict:
  """Random host rows shaped and typed like the pipeline's batches for `config` (docs/architecture.md)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from labeleff_jax import config_checks  # pylint: disable=g-import-not-at-top
  from labeleff_jax.data import constants  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  size = config.data.image_size

  def inputs():
    out = {}
    for modality in config.data.modalities:
      channels = constants.MODALITIES[modality]
      if modality == "lulc":  # a class map; the model makes the one-hot
        out[modality] = rng.integers(0, constants.NUM_LULC_CLASSES, (rows, size, size)).astype(np.uint8)
      elif modality in constants.IMAGE_MODALITIES:
        out[modality] = rng.uniform(0, 1, (rows, size, size, channels)).astype(np.float32)
      else:
        out[modality] = rng.uniform(0, 1, (rows, channels)).astype(np.float32)
    return out

  labels = {}
  for name in config_checks.required_labels(config):
    label = constants.LABELS[name]
    if label.kind == "classification":
      labels[name] = rng.integers(0, label.num_classes, (rows,)).astype(np.int32)
    elif label.kind == "segmentation":
      labels[name] = rng.integers(0, label.num_classes, (rows, size, size)).astype(np.int32)
    elif label.kind == "multilabel":
      labels[name] = (rng.uniform(0, 1, (rows, label.num_classes)) > 0.5).astype(np.float32)
    else:
      labels[name] = rng.uniform(0, 1, (rows,)).astype(np.float32)
  batch = {"inputs": inputs(), "labels": labels, "valid": np.ones((rows,), bool),
           "index": np.arange(rows, dtype=np.int32)}
  if config.data.get("num_views", 1) == 2:
    batch["inputs2"] = inputs()
  return batch


def flops_of(stage) -> float | None:
  """The 'flops' of a Lowered or Compiled stage's cost_analysis(): a dict, a list of one dict per
  program (older jaxlibs), None or an exception where the backend has no cost model."""
  try:
    analysis = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (NotImplementedError, backend errors: no count)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = analysis.get("flops") if isinstance(analysis, dict) else None
  return float(flops) if flops is not None and flops > 0 else None


def device_peak_memory(devices) -> tuple[int | None, int | None, str | None]:
  """(largest peak_bytes_in_use, its bytes_limit, None) over `devices`, or (None, None, why not)."""
  peaks, limits = [], []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (some backends raise instead of returning None)
      stats = None
    if not stats or "peak_bytes_in_use" not in stats:
      return None, None, f"the {device.platform} backend reports no peak_bytes_in_use in memory_stats()"
    peaks.append(stats["peak_bytes_in_use"])
    limits.append(stats.get("bytes_limit"))
  index = max(range(len(peaks)), key=peaks.__getitem__)
  return int(peaks[index]), limits[index], None


def device_info() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
          "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
          "devices": [str(d) for d in jax.devices()[:16]], "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "default_matmul_precision": jax.config.jax_default_matmul_precision}


def run_model(job: dict):
  """One model and dtype at each batch (increasing): compile, time, memory, FLOPs. Yields one entry per
  batch as it is done."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from labeleff_jax import config_checks, models, objectives, sharding, train

  config = make_config(job["config_name"], dtype=job["dtype"], tiny=job["tiny"], conv_impl=job["conv_impl"])
  mesh = sharding.make_mesh(-1)
  num_devices = mesh.shape[sharding.DATA_AXIS]
  start = time.perf_counter()
  setup = train.init_training(config, mesh, objectives.make_objective(config), steps_per_epoch=100,
                              total_steps=1000)
  state, rng_state, train_step = setup.state, setup.rng_state, setup.train_step
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  device_kind = jax.devices()[0].device_kind
  base = {"configuration": job["name"], "model": job["model"], "config": f"configs/{job['config_name']}.py"
          + (":tiny" if job["tiny"] else ""), "dtype": job["dtype"], "num_params": int(setup.num_params),
          "conv_impl": models.resolve_conv_impl(config.model.conv_impl), "devices": num_devices,
          "unit": "pairs" if job["model"] == "contrastive" else "images"}
  del setup
  step = 0
  for batch_size in sorted(job["batches"]):
    entry = dict(base, batch=batch_size, per_device_batch=batch_size / num_devices)
    if time.time() > job["deadline"]:
      entry["skipped"] = "the time budget (--time-budget-s) was spent"
      yield entry
      continue
    try:
      config.train.batch_size = batch_size
      config_checks.check(config, num_data_devices=num_devices)
      layout = sharding.batch_layout(mesh, batch_size, "--batches")
      rows = slice(layout.row_start, layout.row_stop)  # this process's rows of the global batch
      host_rows = jax.tree.map(lambda a, rows=rows: a[rows], synthetic_batch(config, batch_size))
      batch = layout.to_global(host_rows)
      with jax.set_mesh(mesh):
        start = time.perf_counter()
        lowered = train_step.lower(state, rng_state, batch, jnp.asarray(step, jnp.int32))
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, rng_state, batch, jnp.asarray(step, jnp.int32))
        first_loss = float(jax.device_get(metrics["loss"]))
        step += 1
        for _ in range(job["warmup"]):
          state, metrics = compiled(state, rng_state, batch, jnp.asarray(step, jnp.int32))
          step += 1
        jax.block_until_ready((state, metrics))
        times = []
        for _ in range(job["steps"]):
          start = time.perf_counter()
          state, metrics = compiled(state, rng_state, batch, jnp.asarray(step, jnp.int32))
          jax.block_until_ready((state, metrics))
          times.append(time.perf_counter() - start)
          step += 1
        last_loss = float(jax.device_get(metrics["loss"]))
      step_s = statistics.median(times)
      # After SPMD partitioning the compiled module is the program of one device: times the devices it is
      # the whole step's count. The lowered module is the global program before partitioning.
      compiled_flops = flops_of(compiled)
      lowered_flops = flops_of(lowered)
      flops, flops_from = None, None
      if compiled_flops:
        flops, flops_from = compiled_flops * num_devices, "compiled cost_analysis() x devices"
      if lowered_flops and (not flops or not 1 / FLOPS_AGREEMENT <= flops / lowered_flops <= FLOPS_AGREEMENT):
        flops_from = ("lowered cost_analysis()" if not flops else
                      f"lowered cost_analysis(): the compiled count ({flops:.4g}) differs by more than "
                      f"{FLOPS_AGREEMENT}x")
        flops = lowered_flops
      peak, limit, memory_reason = device_peak_memory(jax.local_devices())
      memory = compiled.memory_analysis()
      entry.update(
          compile_s=compile_s, lower_s=lower_s, step_s=step_s, images_per_s=batch_size / step_s,
          batches_per_s=1 / step_s, step_s_min_max=[min(times), max(times)],
          step_times_s=[round(t, 5) for t in times], warmup_steps=job["warmup"], timed_steps=job["steps"],
          flops_per_step=flops, flops_from=flops_from, flops_compiled_per_device=compiled_flops,
          flops_lowered=lowered_flops, achieved_flops_per_s=flops / step_s if flops else None,
          peak_memory_bytes=peak, peak_memory_gib=None if peak is None else round(peak / 2**30, 3),
          memory_limit_bytes=limit, peak_memory_reason=memory_reason,
          xla_buffers_mib=None if memory is None else {
              "arguments": round(memory.argument_size_in_bytes / 2**20, 2),
              "outputs": round(memory.output_size_in_bytes / 2**20, 2),
              "aliased": round(memory.alias_size_in_bytes / 2**20, 2),
              "temporaries": round(memory.temp_size_in_bytes / 2**20, 2)},
          first_loss=first_loss, last_loss=last_loss, init_s=init_s)
      entry.update(model_flops_utilization(flops, step_s, device_kind=device_kind, dtype=job["dtype"],
                                           num_devices=num_devices, peak_flops=job["peak_flops"]))
      del batch, lowered, compiled
    except Exception as error:  # pylint: disable=broad-except  (one batch failing must not lose the others)
      entry["error"] = f"{type(error).__name__}: {str(error)[-1500:]}"
    log(entry)
    yield entry


def run_pipeline(job: dict):
  """The U-Net config's training iterator: batches/s at each batch and worker count; yields the entries."""
  import jax  # pylint: disable=g-import-not-at-top
  from labeleff_jax import sharding  # pylint: disable=g-import-not-at-top
  from labeleff_jax.data import pipeline, splits  # pylint: disable=g-import-not-at-top

  config = make_config(job["config_name"], dtype="float32", tiny=job["tiny"], conv_impl="xla",
                       data_dir=job["data_dir"], manual_dir=job["manual_dir"])
  start = time.perf_counter()
  prepared = splits.ensure_prepared(config)
  prepare_s = time.perf_counter() - start
  source = splits.open_split(config, "train")
  mesh = sharding.make_mesh(-1)
  base = {"config": f"configs/{job['config_name']}.py" + (":tiny" if job["tiny"] else ""),
          "dataset": str(prepared), "train_examples": len(source), "prepare_s": prepare_s,
          "image_size": config.data.image_size, "modalities": list(config.data.modalities),
          "worker_type": config.data.worker_type}
  for batch_size in sorted(job["batches"]):
    for workers in job["workers"]:
      entry = dict(base, batch=batch_size, workers=workers)
      if time.time() > job["deadline"]:
        entry["skipped"] = "the time budget (--time-budget-s) was spent"
        yield entry
        continue
      config.train.batch_size = batch_size
      config.data.num_workers = workers
      iterator = None
      try:
        iterator = pipeline.make_train_iterator(pipeline.DataSpec.from_config(config), source, mesh)
        start = time.perf_counter()
        jax.block_until_ready(next(iterator))  # starts the workers
        startup_s = time.perf_counter() - start
        for _ in range(job["warmup_batches"]):
          jax.block_until_ready(next(iterator))
        start = time.perf_counter()
        for _ in range(job["timed_batches"]):
          jax.block_until_ready(next(iterator))  # on the devices, as the step would get it
        elapsed = time.perf_counter() - start
        entry.update(startup_s=startup_s, timed_batches=job["timed_batches"],
                     warmup_batches=job["warmup_batches"], batches_per_s=job["timed_batches"] / elapsed,
                     images_per_s=job["timed_batches"] * batch_size / elapsed)
      except Exception as error:  # pylint: disable=broad-except
        entry["error"] = f"{type(error).__name__}: {str(error)[-1500:]}"
      finally:
        if iterator is not None:
          iterator.close()
      log(entry)
      yield entry


def worker(spec: dict) -> None:
  """Prints one JSON line per result as soon as it is made, so that a child killed at the time budget
  still hands over what it finished: {"device": ...}, then {"models": entry} or {"pipeline": entry}."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  print(json.dumps({"device": device_info()}), flush=True)
  for job in spec["jobs"]:
    for entry in run_model(job) if job["kind"] == "model" else run_pipeline(job):
      print(json.dumps({"models" if job["kind"] == "model" else "pipeline": entry}), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Torch side: `TORCH_PYTHON accelerator.py --torch-worker JSON` (only the standard library and torch).
# ---------------------------------------------------------------------------------------------------------
def torch_step(ref, name: str, batch_size: int, device, autocast: bool):
  """The torch_reference model of U-Net config `name`, its optimizer and random inputs on `device`; returns
  a function that runs one train step and returns the loss (not waited for)."""
  import torch  # pylint: disable=g-import-not-at-top,import-error
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,import-error
  size = ref.PATCH_SIZE
  torch.manual_seed(0)
  model = ref.MODELS[name]().to(device).train()
  channels = ref.NUM_S2_BANDS + (ref.NUM_S1_BANDS if name == "early_fusion" else 0)
  x = torch.rand(batch_size, channels, size, size, device=device)
  climate = torch.randint(0, ref.NUM_CLIMATE_ZONES, (batch_size,), device=device)
  if name == "multitask":  # the multitask recipe: CE + CE + MSE, weights 1, Adam 1e-5
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    lulc = torch.randint(0, ref.NUM_LULC_CLASSES, (batch_size, size, size), device=device)
    season = torch.rand(batch_size, device=device)

    def loss_of(outputs):
      segmentation, classification, regression = outputs
      return (F.cross_entropy(segmentation, lulc, ignore_index=255) + F.cross_entropy(classification, climate)
              + F.mse_loss(regression.float().reshape(-1), season))
  else:  # the supervised recipe: cross-entropy, SGD 1e-4
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def loss_of(logits):
      return F.cross_entropy(logits, climate)

  def step():
    optimizer.zero_grad(set_to_none=True)
    # torch's usual mixed precision: forward and loss under autocast, backward and update outside it.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      loss = loss_of(model(x))
    loss.backward()
    optimizer.step()
    return loss

  return step


def torch_worker(spec: dict) -> dict:
  """The torch_reference model of a U-Net config on spec['device'], float32 or bf16 autocast, each batch:
  median step time, images/s, peak CUDA memory."""
  import torch  # pylint: disable=g-import-not-at-top,import-error
  sys.path.insert(0, str(REPO / "benchmarks"))
  import torch_reference as ref  # pylint: disable=g-import-not-at-top,import-error

  device = torch.device(spec["device"])
  cuda = device.type == "cuda"
  if cuda and not torch.cuda.is_available():
    return {"skipped": f"torch {torch.__version__} at {sys.executable} has no CUDA device "
                       f"(built for CUDA {torch.version.cuda})"}
  # XLA autotunes its convolutions for the shapes it compiles; cudnn.benchmark is torch's equivalent.
  torch.backends.cudnn.benchmark = True
  results = []
  for batch_size in sorted(spec["batches"]):
    entry = {"batch": batch_size}
    results.append(entry)
    if cuda:
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats(device)
    try:
      step = torch_step(ref, spec["model"], batch_size, device, spec["autocast"])
      start = time.perf_counter()
      first_loss = step().item()
      entry["first_step_s"] = time.perf_counter() - start
      for _ in range(spec["warmup"]):
        step()
      if cuda:
        torch.cuda.synchronize(device)
      times = []
      for _ in range(spec["steps"]):
        start = time.perf_counter()
        loss = step()
        if cuda:
          torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
      step_s = statistics.median(times)
      entry.update(step_s=step_s, images_per_s=batch_size / step_s, step_s_min_max=[min(times), max(times)],
                   first_loss=first_loss, last_loss=loss.item(),
                   peak_memory_bytes=torch.cuda.max_memory_allocated(device) if cuda else None)
    except Exception as error:  # pylint: disable=broad-except  (out of memory at the largest batch, say)
      entry["error"] = f"{type(error).__name__}: {str(error)[-1000:]}"
    step = None  # frees the model before the next batch's
  return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
          "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
          "autocast": spec["autocast"], "model": spec["model"], "cudnn_benchmark": True,
          "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
          "results": results}


# ---------------------------------------------------------------------------------------------------------
# Parent side: subprocesses, the report.
# ---------------------------------------------------------------------------------------------------------
def log(entry: dict) -> None:
  keys = ("configuration", "framework", "batch", "workers", "compile_s", "step_s", "images_per_s",
          "batches_per_s", "mfu", "peak_memory_gib", "skipped", "error")
  print(json.dumps({k: entry[k] for k in keys if k in entry}), file=sys.stderr, flush=True)


def run_child(argv: list[str], timeout_s: float, env: dict | None = None) -> tuple[list[dict], str | None]:
  """Runs argv in the repository with `env` added to the environment, killed after `timeout_s`. Returns
  the JSON objects of its stdout lines and None, or what it printed before it failed and why it did.
  The child's stderr (its progress) passes through."""
  with tempfile.TemporaryFile() as out:
    process = subprocess.Popen(argv, stdout=out, cwd=REPO, env={**os.environ, **(env or {})})
    error = None
    try:
      process.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
      error = f"killed after {timeout_s:.0f} s, at the end of --time-budget-s + {GRACE_S} s"
    out.seek(0)
    lines = out.read().decode().splitlines()
  if error is None and process.returncode != 0:
    error = f"exit {process.returncode}"
  objects = []
  for line in lines:
    try:
      objects.append(json.loads(line))
    except ValueError:
      pass  # a library's stray print
  return [o for o in objects if isinstance(o, dict)], error


def host_machine() -> dict:
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as handle:
      cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
  except (OSError, StopIteration):
    cpu = platform.processor() or cpu
  return {"host_cpu": cpu, "host_cpu_count": os.cpu_count(), "host_cpus_usable": len(os.sched_getaffinity(0)),
          "host_platform": platform.platform(), "python": platform.python_version(),
          "load_avg_start": [round(x, 2) for x in os.getloadavg()]}


def git_state() -> dict:
  def run(*command):
    return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout.rstrip("\n")
  # Uncommitted changes to what the steps run make a result unreproducible from the commit alone.
  dirty = run("status", "--porcelain", "--", "labeleff_jax", "configs", "benchmarks",
              ":(exclude)benchmarks/results")
  return {"commit": run("rev-parse", "HEAD"), "uncommitted_changes": dirty.splitlines()}


def compare_pipeline(pipeline_entries: list[dict], models: list[dict]) -> None:
  """Adds to every pipeline entry, per U-Net configuration at the same batch, the step's batches/s, the
  ratio pipeline / step and `feeds` (ratio >= 1)."""
  for entry in pipeline_entries:
    if "batches_per_s" not in entry:
      continue
    entry["versus_step"] = {}
    for model in models:
      if model["model"] == "unet" and model["batch"] == entry["batch"] and "batches_per_s" in model:
        ratio = entry["batches_per_s"] / model["batches_per_s"]
        entry["versus_step"][model["configuration"]] = {
            "step_batches_per_s": model["batches_per_s"], "ratio": ratio, "feeds": bool(ratio >= 1)}


def compare_torch(torch_runs: dict, models: list[dict]) -> None:
  """Adds jax_vs_torch (JAX images/s / torch images/s) to the U-Net entries with a torch run beside them."""
  for model in models:
    run = torch_runs.get(model["dtype"]) if model["model"] == "unet" else None
    theirs = next((r for r in (run or {}).get("results", []) if r["batch"] == model["batch"]), None)
    if theirs and "images_per_s" in theirs and "images_per_s" in model:
      model["torch_images_per_s"] = theirs["images_per_s"]
      model["jax_vs_torch"] = model["images_per_s"] / theirs["images_per_s"]


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
  parser.add_argument("--tiny", action="store_true", help="CPU smoke mode (tests): tiny configs, batch 8")
  parser.add_argument("--batches", help="global batch sizes (default 32,64,128; --tiny: 8)")
  parser.add_argument("--configs", default=None,
                      help=f"MODEL:DTYPE list, MODEL of {sorted(MODEL_CONFIGS)} (default {DEFAULT_CONFIGS})")
  parser.add_argument("--unet-config", default="multitask", choices=UNET_CONFIGS,
                      help="the configs/ file of the `unet` model and of the pipeline's data")
  parser.add_argument("--conv-impl", default="xla",
                      help="config.model.conv_impl: 'xla' (default: what 'auto' is on GPU and TPU; on CPU it "
                           "keeps the FLOP count the model's, which cpu_fast's Winograd convolutions lower) "
                           "or 'auto' (the engine's choice)")
  parser.add_argument("--warmup", type=int, help="untimed steps after the first (default 5; --tiny: 1)")
  parser.add_argument("--steps", type=int, help="timed steps, median reported (default 30; --tiny: 3)")
  parser.add_argument("--workers", help="pipeline worker counts (default 0,min(cpu_count-1, 8); --tiny: 0)")
  parser.add_argument("--pipeline-batches", type=int, help="timed pipeline batches (default 30; --tiny: 4)")
  parser.add_argument("--peak-flops", "--peak_flops", type=float, dest="peak_flops",
                      help="peak FLOP/s of one device, overriding the PEAK_FLOPS table")
  parser.add_argument("--torch-python", help="python of a venv with torch, for the PyTorch reference")
  parser.add_argument("--data-dir", help="prepared TFDS root of the pipeline's synthetic data "
                                         "(default: the config's, under ./data/synthetic)")
  parser.add_argument("--manual-dir",
                      help="where the synthetic raw ben-ge is written (default: the config's)")
  parser.add_argument("--time-budget-s", type=float, default=450,
                      help="jobs not started within this many seconds are skipped (default 450)")
  parser.add_argument("--out", help="JSON path (default benchmarks/results/accelerator_<device_kind>.json)")
  args = parser.parse_args(argv)
  tiny = args.tiny
  args.batches = [int(b) for b in (args.batches or ("8" if tiny else "32,64,128")).split(",")]
  args.configs = [tuple(item.split(":")) for item in (args.configs or DEFAULT_CONFIGS).split(",")]
  for item in args.configs:
    if len(item) != 2 or item[0] not in MODEL_CONFIGS or item[1] not in ("float32", "bfloat16"):
      parser.error(f"--configs: {':'.join(item)} is not MODEL:DTYPE with MODEL of {sorted(MODEL_CONFIGS)} "
                   "and DTYPE float32 or bfloat16")
  args.warmup = (1 if tiny else 5) if args.warmup is None else args.warmup
  args.steps = (3 if tiny else 30) if args.steps is None else args.steps
  default_workers = "0" if tiny else f"0,{max(1, min((os.cpu_count() or 2) - 1, 8))}"
  args.workers = sorted({int(w) for w in (args.workers or default_workers).split(",")})
  args.pipeline_batches = args.pipeline_batches or (4 if tiny else 30)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.worker:
    worker(json.loads(args.worker))
    return {}
  if args.torch_worker:
    print(json.dumps(torch_worker(json.loads(args.torch_worker))))
    return {}

  started = time.time()
  deadline = started + args.time_budget_s
  # No job starts after `deadline`; one still running GRACE_S later is killed, so the run ends by then.
  hard_deadline = deadline + GRACE_S
  unet_config = args.unet_config
  common = {"tiny": args.tiny, "deadline": deadline}
  model_jobs = [dict(common, kind="model", name=f"{model} {dtype}", model=model, dtype=dtype,
                     config_name=MODEL_CONFIGS[model] or unet_config, batches=args.batches,
                     conv_impl=args.conv_impl, warmup=args.warmup, steps=args.steps,
                     peak_flops=args.peak_flops)
                for model, dtype in args.configs]
  pipeline_job = dict(common, kind="pipeline", config_name=unet_config, batches=args.batches,
                      workers=args.workers, warmup_batches=1 if args.tiny else 3,
                      timed_batches=args.pipeline_batches, data_dir=args.data_dir, manual_dir=args.manual_dir)
  # One subprocess per model and dtype (and one for the pipeline) on accelerators, so that each reports
  # its own peak memory; --tiny runs them all in one.
  groups = [model_jobs + [pipeline_job]] if args.tiny else [[job] for job in model_jobs] + [[pipeline_job]]
  # --tiny only proves that everything runs: XLA's backend optimisations off halve the CPU compile times
  # (and the eager dispatches of model initialisation), which dominate it.
  child_env = {}
  if args.tiny:
    child_env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TINY_XLA_FLAGS}".strip()
  device, models, pipeline_entries, failures = None, [], [], []
  for jobs in groups:
    remaining = deadline - time.time()
    if remaining <= 0:
      failures.append({"jobs": [job.get("name", job["kind"]) for job in jobs],
                       "skipped": "the time budget (--time-budget-s) was spent"})
      continue
    print(f"running {[job.get('name', job['kind']) for job in jobs]} ...", file=sys.stderr, flush=True)
    # A job checks the deadline between batches; one compilation may take it past, by GRACE_S at most.
    lines, error = run_child([sys.executable, __file__, "--worker", json.dumps({"jobs": jobs})],
                             hard_deadline - time.time(), child_env)
    if error:
      failures.append({"jobs": [job.get("name", job["kind"]) for job in jobs], "error": error})
    for line in lines:
      device = device or line.get("device")
      models.extend([line["models"]] if "models" in line else [])
      pipeline_entries.extend([line["pipeline"]] if "pipeline" in line else [])
  compare_pipeline(pipeline_entries, models)

  torch_report = {}
  if not args.torch_python:
    torch_report["skipped"] = "no --torch-python given"
  elif args.tiny:
    torch_report["skipped"] = "--tiny: torch_reference.py has only the full-size 120 px models"
  elif unet_config not in TORCH_MODELS:
    torch_report["skipped"] = f"torch_reference.py has no model of configs/{unet_config}.py"
  elif device is None or device["platform"] not in ("gpu", "cpu"):
    torch_report["skipped"] = ("the torch reference runs on CUDA or the CPU, JAX ran on "
                               f"{device and device['platform']}")
  else:
    torch_device = "cuda" if device["platform"] == "gpu" else "cpu"
    unet_dtypes = sorted({dtype for model, dtype in args.configs if model == "unet"})
    for dtype in unet_dtypes:
      remaining = deadline - time.time()
      if remaining <= 0:
        torch_report[dtype] = {"skipped": "the time budget (--time-budget-s) was spent"}
        continue
      print(f"running torch {dtype} ...", file=sys.stderr, flush=True)
      spec = {"model": TORCH_MODELS[unet_config], "batches": args.batches, "autocast": dtype == "bfloat16",
              "warmup": args.warmup, "steps": args.steps, "device": torch_device}
      lines, error = run_child([args.torch_python, __file__, "--torch-worker", json.dumps(spec)],
                               hard_deadline - time.time())
      torch_report[dtype] = lines[-1] if lines and not error else {"error": error or "no output"}
      for entry in torch_report[dtype].get("results", []):
        log(dict(entry, framework=f"torch {dtype}"))
    compare_torch(torch_report, models)

  device = device or {"platform": None, "device_kind": "unknown", "device_count": None}
  report = {
      "benchmark": "accelerator: engine train steps (compile, step time, images/s, peak memory, MFU), input "
                   "pipeline feed rate, PyTorch reference",
      "command": " ".join(["python", "benchmarks/accelerator.py", *(sys.argv[1:] if argv is None else argv)]),
      "started": datetime.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
      "wall_s": None,
      "git": git_state(),
      "machine": {**device, **host_machine()},
      "settings": {"tiny": args.tiny, "batches": args.batches, "configs": [":".join(c) for c in args.configs],
                   "unet_config": unet_config, "conv_impl": args.conv_impl, "warmup_steps": args.warmup,
                   "timed_steps": args.steps, "step_time": "median of the timed steps",
                   "pipeline_workers": args.workers, "pipeline_timed_batches": args.pipeline_batches,
                   "peak_flops_override": args.peak_flops, "time_budget_s": args.time_budget_s,
                   "child_xla_flags": child_env.get("XLA_FLAGS", os.environ.get("XLA_FLAGS")),
                   "mfu_peak": "dense bf16 peak for bfloat16 steps; for float32 steps the TF32 peak on "
                               "NVIDIA GPUs and the bf16 peak on TPUs (their default float32 precision)"},
      "results": models,
      "pipeline": {"config": f"configs/{unet_config}.py" + (":tiny" if args.tiny else ""),
                   "what": "make_train_iterator batches/s (block_until_ready on the devices), synthetic "
                           "data, compared with the U-Net step at the same global batch; feeds = ratio >= 1",
                   "results": pipeline_entries},
      "torch": torch_report,
      "failures": failures,
  }
  default_out = REPO / "benchmarks" / "results" / f"accelerator_{slug(device['device_kind'])}.json"
  out = pathlib.Path(args.out or default_out)
  report["out"] = str(out)
  report["wall_s"] = round(time.time() - started, 1)
  text = json.dumps(report, indent=1)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text + "\n")
  print(text)
  print(f"wrote {out}", file=sys.stderr)
  return report


if __name__ == "__main__":
  main()
