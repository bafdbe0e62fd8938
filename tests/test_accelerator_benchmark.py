"""benchmarks/accelerator.py: a `--tiny` run on CPU devices checked number by number; its MFU arithmetic."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import multitask

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accelerator.py"
# Two CPU devices: the batch is sharded (the FLOP count must add the devices' programs up) at half the
# compile time of the suite's eight.
NUM_DEVICES = 2
TINY_BATCH = 8
TINY_CONFIGURATIONS = {"unet float32", "unet bfloat16", "late_fusion bfloat16", "contrastive bfloat16"}


def load_script():
  spec = importlib.util.spec_from_file_location("accelerator_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def report(tmp_path_factory, data_dirs):
  out = tmp_path_factory.mktemp("accelerator") / "accelerator_tiny.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(NUM_DEVICES))
  process = subprocess.run(
      [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--data-dir", data_dirs["data_dir"],
       "--manual-dir", data_dirs["manual_dir"]],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert process.returncode == 0, process.stderr[-3000:]
  result = json.loads(out.read_text())
  assert json.loads(process.stdout) == result and result["out"] == str(out)  # printed as written
  return result


def entry(report, configuration):
  return next(e for e in report["results"] if e["configuration"] == configuration)


def test_every_configuration_ran_and_its_rates_follow_from_the_step_time(report):
  assert not report["failures"]
  assert {e["configuration"] for e in report["results"]} == TINY_CONFIGURATIONS
  for e in report["results"]:
    assert "error" not in e and "skipped" not in e, e
    assert e["batch"] == TINY_BATCH and e["devices"] == NUM_DEVICES
    assert e["step_s"] > 0 and e["compile_s"] > 0
    assert e["images_per_s"] == pytest.approx(e["batch"] / e["step_s"], rel=1e-9)
    assert e["batches_per_s"] == pytest.approx(1 / e["step_s"], rel=1e-9)
    assert len(e["step_times_s"]) == e["timed_steps"] == 3
    assert min(e["step_s_min_max"]) <= e["step_s"] <= max(e["step_s_min_max"])
    assert e["flops_per_step"] > 0
    assert e["first_loss"] == pytest.approx(e["first_loss"])  # finite (NaN != NaN)
  assert entry(report, "contrastive bfloat16")["unit"] == "pairs"


def tiny_unet_step_flops(batch: int) -> float:
  """2 x the multiply-adds of the tiny multitask U-Net's convolutions and linear layers, times 3.

  Each conv costs (output pixels) x kh x kw x c_in x c_out multiply-adds. Its output side follows from where
  it sits: `inc`, `up4` and the heads at the input size, `downK` at size / 2^K, `upK` at size / 2^(4-K).
  The backward pass forms the gradient with respect to the activations and with respect to the weights,
  each as many multiply-adds as the forward pass, hence the 3.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from labeleff_jax import models  # pylint: disable=g-import-not-at-top
  config = multitask.get_config("tiny")
  model = models.create_model(config, rngs=nnx.Rngs(0))
  size = config.data.image_size
  macs = convs = 0
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Conv):
      level = next((int(p[-1]) if p.startswith("down") else 4 - int(p[-1])
                    for p in map(str, path) if p[:-1] in ("down", "up") and p[-1].isdigit()), 0)
      side = size
      for _ in range(level):
        side //= 2  # max pooling floors
      kh, kw, c_in, c_out = node.kernel.shape
      macs += side * side * kh * kw * c_in * c_out
      convs += 1
    elif isinstance(node, nnx.Linear):
      macs += node.kernel.shape[0] * node.kernel.shape[1]
  assert convs == 18 + 3  # the U-Net's nine DoubleConvs and a 1x1 conv per head
  return 3 * 2 * macs * batch


def test_flop_count_agrees_with_the_convolutions_of_the_tiny_unet(report):
  e = entry(report, "unet float32")
  analytic = tiny_unet_step_flops(e["batch"])
  # XLA also counts BatchNorm, ReLU, pooling, upsampling and the Adam update (more than the analytic
  # count), and forms no input gradient for the first convolution (15 % of the forward multiply-adds here,
  # so 5 % less); together they stay well within [0.7, 1.5] of 6 x MACs (0.95 when this was written).
  assert 0.7 < e["flops_per_step"] / analytic < 1.5, (e["flops_per_step"], analytic)
  # The compiled module is one device's program: times the devices it is close to the global count.
  assert e["flops_compiled_per_device"] * NUM_DEVICES == pytest.approx(e["flops_per_step"])
  assert 0.5 < e["flops_per_step"] / e["flops_lowered"] < 2
  # late fusion runs two U-Nets (S1 with 2 input channels, S2 with 12) into one head: about twice the work
  assert 1.5 < entry(report, "late_fusion bfloat16")["flops_per_step"] / e["flops_per_step"] < 2.5


def test_mfu_and_peak_memory_are_null_on_cpu_with_the_reason(report):
  assert report["machine"]["platform"] == "cpu"
  assert report["machine"]["device_count"] == NUM_DEVICES
  kind = report["machine"]["device_kind"]
  for e in report["results"]:
    assert e["mfu"] is None and e["peak_flops_per_device"] is None
    assert e["reason"] == f"no peak for device_kind {kind}"
    assert e["peak_memory_bytes"] is None and "memory_stats" in e["peak_memory_reason"]


def test_pipeline_feeds_is_consistent_with_the_rates_it_compares(report):
  results = report["pipeline"]["results"]
  assert [(p["batch"], p["workers"]) for p in results] == [(TINY_BATCH, 0)]
  for p in results:
    assert "error" not in p, p
    assert p["batches_per_s"] > 0
    assert p["images_per_s"] == pytest.approx(p["batches_per_s"] * p["batch"])
    assert set(p["versus_step"]) == {"unet float32", "unet bfloat16"}
    for configuration, versus in p["versus_step"].items():
      assert versus["step_batches_per_s"] == entry(report, configuration)["batches_per_s"]
      assert versus["ratio"] == pytest.approx(p["batches_per_s"] / versus["step_batches_per_s"])
      assert isinstance(versus["feeds"], bool)
      assert versus["feeds"] == (p["batches_per_s"] >= versus["step_batches_per_s"])


def test_report_records_command_commit_machine_and_settings(report):
  assert report["command"].startswith("python benchmarks/accelerator.py --tiny")
  assert len(report["git"]["commit"]) == 40
  machine = report["machine"]
  for key in ("jax", "jaxlib", "flax", "host_cpu", "host_cpu_count"):
    assert machine[key], key
  assert report["settings"]["batches"] == [TINY_BATCH]
  assert report["torch"] == {"skipped": "no --torch-python given"}


def test_mfu_arithmetic_by_hand():
  bench = load_script()
  h100 = "NVIDIA H100 80GB HBM3"
  # 4.945e12 FLOPs in 10 ms on one H100 is 494.5 TFLOP/s, half its dense bf16 peak of 989 TFLOP/s.
  result = bench.model_flops_utilization(4.945e12, 0.01, device_kind=h100, dtype="bfloat16")
  assert result["mfu"] == pytest.approx(0.5) and result["reason"] is None
  assert result["peak_flops_per_device"] == 989e12
  # The same step spread over 8 devices uses each an eighth as well.
  assert bench.model_flops_utilization(4.945e12, 0.01, device_kind=h100, dtype="bfloat16",
                                       num_devices=8)["mfu"] == pytest.approx(0.0625)
  # float32 against the TF32 peak (494 TFLOP/s): 4.94e12 / (0.02 s x 494e12) = 0.5.
  assert bench.model_flops_utilization(4.94e12, 0.02, device_kind=h100,
                                       dtype="float32")["mfu"] == pytest.approx(0.5)
  assert bench.model_flops_utilization(1e12, 0.01, device_kind="TPU v5 lite")["mfu"] == pytest.approx(
      1e12 / (0.01 * 197e12))
  # --peak-flops replaces the table: 3e9 / (0.5 s x 2 devices x 1e10) = 0.3.
  override = bench.model_flops_utilization(3e9, 0.5, device_kind=h100, num_devices=2, peak_flops=1e10)
  assert override["mfu"] == pytest.approx(0.3) and override["peak_from"] == "--peak-flops"


def test_unknown_device_kind_or_missing_flops_give_null_mfu():
  bench = load_script()
  unknown = bench.model_flops_utilization(1e12, 0.1, device_kind="cpu", dtype="float32")
  assert unknown["mfu"] is None and unknown["reason"] == "no peak for device_kind cpu"
  with_peak = bench.model_flops_utilization(1e12, 0.1, device_kind="cpu", peak_flops=1e13)
  assert with_peak["mfu"] == pytest.approx(1)
  missing = bench.model_flops_utilization(None, 0.1, device_kind="NVIDIA H200")
  assert missing["mfu"] is None and "FLOP" in missing["reason"]


def test_flops_are_read_from_any_shape_cost_analysis_takes():
  bench = load_script()

  class Stage:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      if isinstance(self.analysis, Exception):
        raise self.analysis
      return self.analysis

  assert bench.flops_of(Stage({"flops": 12.0, "bytes accessed": 3.0})) == 12.0
  assert bench.flops_of(Stage([{"flops": 7.0}])) == 7.0  # one dict per program (older jaxlibs)
  assert bench.flops_of(Stage({"bytes accessed": 3.0})) is None
  assert bench.flops_of(Stage(None)) is None
  assert bench.flops_of(Stage([])) is None
  assert bench.flops_of(Stage(NotImplementedError("no cost model"))) is None
