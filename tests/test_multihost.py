"""Multi-process runs through main.py: 2 processes x 4 CPU devices joined by jax.distributed (gloo
collectives), the way the hosts of a TPU pod slice or a GPU cluster are joined, against 1 process x 8.

The two layouts compute the same global batches on the same 8-device mesh; only the order in which
partial sums meet differs. Measured on the 2-vCPU Intel build VM (Dec 2026): the largest relative
difference of any logged value (loss, grad norm, metrics) was 1.2e-6 for the supervised tiny config,
5.0e-6 for the contrastive one and 1.6e-5 for a fine-tune loading either run's checkpoint, so the tests
allow 1e-4: an order of magnitude above the float32 reordering noise, far below any real difference.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
RTOL = 1e-4
TIMING_KEYS = {"images_per_second"}


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def _cpu_env(devices: int) -> dict:
  """This environment for a process with `devices` CPU devices and gloo collectives."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
          "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}


def _start(config: str, workdir: pathlib.Path, data_dirs: dict, *, processes: int, overrides=(),
           per_process=lambda index: []):
  """Starts main.py in `processes` processes that share 8 CPU devices; returns (Popen list, log paths).

  `per_process(index)` adds flags to one process's command only.
  """
  command = [sys.executable, "main.py", "--config", config, "--workdir", str(workdir),
             f"--config.data.data_dir={data_dirs['data_dir']}",
             f"--config.data.manual_dir={data_dirs['manual_dir']}", *overrides]
  env = _cpu_env(devices=8 // processes)
  if processes > 1:
    command += [f"--coordinator_address=localhost:{_free_port()}", f"--num_processes={processes}"]
  running, logs = [], []
  for index in range(processes):
    log = workdir.parent / f"{workdir.name}.process{index}.log"
    extra = ([f"--process_id={index}"] if processes > 1 else []) + per_process(index)
    with log.open("w") as handle:
      running.append(subprocess.Popen(command + extra, cwd=REPO, env=env, stdout=handle,
                                      stderr=subprocess.STDOUT))
    logs.append(log)
  return running, logs


def _run(config, workdir, data_dirs, *, processes, overrides=()) -> list[str]:
  running, logs = _start(config, workdir, data_dirs, processes=processes, overrides=overrides)
  for process, log in zip(running, logs):
    assert process.wait(timeout=600) == 0, log.read_text()[-4000:]
  return [log.read_text() for log in logs]


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_close_records(actual, expected, rtol):
  assert [(r["step"], r["split"]) for r in actual] == [(r["step"], r["split"]) for r in expected]
  for got, want in zip(actual, expected):
    assert set(got) == set(want), (got, want)
    for key in set(want) - TIMING_KEYS:
      if isinstance(want[key], float):
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=1e-7,
                                   err_msg=f"{want['split']} step {want['step']} {key}")
      else:
        assert got[key] == want[key], (want["split"], want["step"], key)


def _assert_written_once(workdir, reference):
  """Process 0 alone wrote the run's files: as many records and event files as the one-process run."""
  assert len(_records(workdir)) == len(_records(reference))
  assert len(list((workdir / "tensorboard").iterdir())) == 1
  assert list((workdir / "plots").glob("curve_*.png"))
  assert not list(workdir.glob(".*.tmp*"))


def _assert_same_summary(workdir, reference, rtol):
  summary = json.loads((workdir / "summary.json").read_text())
  expected = json.loads((reference / "summary.json").read_text())
  for split in ("validation", "test"):
    assert summary["final"][split].keys() == expected["final"][split].keys()
    for key, value in expected["final"][split].items():
      np.testing.assert_allclose(summary["final"][split][key], value, rtol=rtol, atol=1e-7, err_msg=key)
  assert summary["num_params"] == expected["num_params"] and summary["steps"] == expected["steps"]


# 8 steps, a checkpoint every 2. Longer runs drift further apart (the reordering noise grows with every
# step: 5e-4 relative in the grad norm by step 10), which says nothing about the code.
SUPERVISED = ("configs/supervised.py:tiny", ["--config.train.checkpoint_every_steps=2"])


def test_two_processes_match_one_process_and_resume_exactly_after_both_are_killed(data_dirs, tmp_path):
  config, overrides = SUPERVISED
  _run(config, tmp_path / "one", data_dirs, processes=1, overrides=overrides)
  _run(config, tmp_path / "two", data_dirs, processes=2, overrides=overrides)
  _assert_close_records(_records(tmp_path / "two"), _records(tmp_path / "one"), RTOL)
  _assert_same_summary(tmp_path / "two", tmp_path / "one", RTOL)
  _assert_written_once(tmp_path / "two", tmp_path / "one")

  # Kill both processes (SIGKILL, no chance to clean up) once a checkpoint has been committed.
  killed = tmp_path / "killed"
  running, logs = _start(config, killed, data_dirs, processes=2, overrides=overrides)
  deadline = time.time() + 300
  while not any(p.name.isdigit() for p in (killed / "checkpoints").glob("*")):
    assert time.time() < deadline and all(p.poll() is None for p in running), logs[0].read_text()[-3000:]
    time.sleep(0.05)
  for process in running:
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert not (killed / "summary.json").exists(), "the run finished before it was killed: nothing resumed"

  texts = _run(config, killed, data_dirs, processes=2, overrides=overrides)
  resumed_at = [line for line in texts[0].splitlines() if "resumed from" in line]
  assert resumed_at, texts[0][-3000:]
  step = int(resumed_at[0].rsplit("at step", 1)[1])
  assert 0 < step < json.loads((tmp_path / "two" / "summary.json").read_text())["steps"]
  # Same processes, same devices: the resumed run is the uninterrupted one, bit for bit.
  _assert_close_records(_records(killed), _records(tmp_path / "two"), rtol=0)
  _assert_same_summary(killed, tmp_path / "two", rtol=0)


def test_two_processes_pretrain_contrastive_like_one_process(data_dirs, tmp_path):
  config = "configs/contrastive.py:tiny"
  _run(config, tmp_path / "one", data_dirs, processes=1)
  _run(config, tmp_path / "two", data_dirs, processes=2)
  records = _records(tmp_path / "two")
  assert any("probe/knn_accuracy" in record for record in records)
  _assert_close_records(records, _records(tmp_path / "one"), RTOL)
  _assert_same_summary(tmp_path / "two", tmp_path / "one", RTOL)
  _assert_written_once(tmp_path / "two", tmp_path / "one")


def test_processes_that_would_train_different_models_stop_before_training(data_dirs, tmp_path):
  running, logs = _start("configs/supervised.py:tiny", tmp_path / "run", data_dirs, processes=2,
                         per_process=lambda index: [f"--config.seed={index}"])
  for process in running:
    assert process.wait(timeout=300) != 0
  text = logs[0].read_text()
  assert "the initial train state differs between processes" in text, text[-3000:]
  assert not list((tmp_path / "run").glob("checkpoints/[0-9]*"))  # no step was trained or saved
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("flags, named", [
    (["--coordinator_address=localhost:1234"], "--num_processes, --process_id missing"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"], "--coordinator_address"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"], "--process_id=2"),
    (["--num_processes=0", "--process_id=0", "--coordinator_address=h:1"], "--num_processes=0"),
])
def test_main_py_names_the_cluster_flag_at_fault(flags, named):
  result = subprocess.run([sys.executable, "main.py", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  assert named in result.stderr, result.stderr[-2000:]


# One process of two reaches a jitted step's first collective LATE_S after the other (as a process whose
# compilation is slower would). JAX's CPU collectives (Gloo) fail the other after 30 s when the step is a
# plain jax.jit (measured: "Gloo context initialization failed: GetKeyValue() timed out");
# sharding.compile_together makes both wait for each other's compilation at a coordination-service barrier.
LATE_PROCESS = """
import sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp
from labeleff_jax import sharding
mesh = sharding.make_mesh()
x = jax.make_array_from_process_local_data(
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXIS)), jnp.ones(2))
step = sharding.compile_together(jax.jit(jnp.sum), "late step")
if jax.process_index() == 1:
  time.sleep(float(sys.argv[3]))
print("sum", float(step(x)), flush=True)
sharding.wait_for_every_process("end")
"""
LATE_S = 40


def test_a_process_that_reaches_the_first_step_late_does_not_fail_the_others(tmp_path):
  script = tmp_path / "late_process.py"
  script.write_text(LATE_PROCESS)
  address = f"localhost:{_free_port()}"
  env = {**_cpu_env(devices=2), "PYTHONPATH": str(REPO)}
  logs = [tmp_path / f"process{index}.log" for index in range(2)]
  running = []
  for index, log in enumerate(logs):
    with log.open("w") as handle:
      running.append(subprocess.Popen([sys.executable, str(script), address, str(index), str(LATE_S)],
                                      cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT))
  try:
    for process, log in zip(running, logs):
      # Both finish ~LATE_S after starting; a failed collective leaves the other process waiting longer.
      assert process.wait(timeout=LATE_S + 120) == 0, log.read_text()[-3000:]
      assert "sum 4.0" in log.read_text()
  finally:
    for process in running:
      process.kill()
