"""What a workdir guarantees: one config per run, no non-finite checkpoints, damaged checkpoints detected
with a fallback, one run at a time, and a finished run that is not run again."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from labeleff_jax import checkpoint as checkpoint_lib
from labeleff_jax import sharding
from labeleff_jax import train
from labeleff_jax import workdir as workdir_lib
from tests import tiny_data

REPO = pathlib.Path(__file__).resolve().parent.parent


def _config(data_dirs, **train_overrides):
  from configs import supervised  # pylint: disable=g-import-not-at-top
  config = tiny_data.point_at(supervised.get_config("tiny"), data_dirs)
  config.optimizer.update(name="adam", learning_rate=1e-3)
  config.train.update(**train_overrides)
  return config


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def finished_run(data_dirs, tmp_path_factory):
  """One finished tiny run (3 epochs, checkpoints at steps 8 and 12), copied by the tests that damage it."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  config = _config(data_dirs, num_epochs=3, checkpoint_every_steps=4)
  summary = train.train_and_evaluate(config, workdir)
  return config, workdir, summary


def _contents(workdir):
  """Every file's bytes but the lock's (which names the last holder)."""
  return {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file() and path.name != ".lock"}


def _copy(workdir, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(workdir, target, ignore=shutil.ignore_patterns(".lock"))
  return target


def test_a_changed_config_is_refused_before_anything_is_written(finished_run, tmp_path):
  config, source, _ = finished_run
  workdir = _copy(source, tmp_path)
  files = _contents(workdir)
  changed = config.copy_and_resolve_references()
  changed.optimizer.learning_rate = 0.01
  changed.model.dropout = 0.0
  with pytest.raises(workdir_lib.ConfigChangedError) as refusal:
    train.train_and_evaluate(changed, workdir)
  message = str(refusal.value)
  assert "optimizer.learning_rate: 0.001 -> 0.01" in message and "model.dropout:" in message
  assert "--allow_config_change" in message
  assert _contents(workdir) == files
  # Where the data lies and how many workers read it are not part of a run's identity.
  moved = config.copy_and_resolve_references()
  moved.data.num_workers = 1
  assert workdir_lib.identity(moved) == workdir_lib.identity(config)


def test_an_allowed_config_change_continues_and_is_recorded(finished_run, tmp_path):
  config, source, _ = finished_run
  workdir = _copy(source, tmp_path)
  longer = config.copy_and_resolve_references()
  longer.train.num_epochs = 4
  summary = train.train_and_evaluate(longer, workdir, allow_config_change=True)
  assert summary["steps"] == 16 and _steps(workdir)[-1] == 16
  (record,) = [json.loads(line) for line in (workdir / "config_changes.jsonl").read_text().splitlines()]
  assert record == {"resumed_at_step": 12, "changed": {"train.num_epochs": [3, 4]}}
  assert json.loads((workdir / "config.json").read_text())["train"]["num_epochs"] == 4


def test_a_finished_run_rerun_changes_nothing_and_returns_its_summary(finished_run, tmp_path):
  config, source, summary = finished_run
  workdir = _copy(source, tmp_path)
  files = _contents(workdir)
  again = train.train_and_evaluate(config, workdir)
  assert json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)
  assert _contents(workdir) == files


def _largest_file(directory):
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bytes(path):
  data = bytearray(path.read_bytes())
  start = len(data) // 3
  for index in range(start, min(start + 400, len(data))):
    data[index] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _abstract_state(config):
  """The restore target of the run's checkpoints, as the engine builds it (no step is compiled)."""
  import flax.nnx as nnx  # pylint: disable=g-import-not-at-top
  from labeleff_jax import objectives, sharding  # pylint: disable=g-import-not-at-top
  setup = train.init_training(config, sharding.make_mesh(), objectives.make_objective(config),
                              steps_per_epoch=4, total_steps=12)
  return checkpoint_lib.abstract_like(nnx.to_pure_dict(setup.state))


def test_a_bit_flipped_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
    finished_run, tmp_path):
  config, source, summary = finished_run
  workdir = _copy(source, tmp_path)
  (workdir / "summary.json").unlink()  # as if the run had died after its last checkpoint
  _flip_bytes(_largest_file(workdir / "checkpoints" / "12" / "state"))
  resumed = train.train_and_evaluate(config, workdir)
  assert (workdir / "checkpoints_damaged" / "12").is_dir()
  # Resumed at step 8, it retrains steps 9-12 and ends exactly where the undamaged run ended.
  assert json.dumps(resumed["final"], sort_keys=True) == json.dumps(summary["final"], sort_keys=True)
  assert _steps(workdir) == [8, 12]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_metadata", "delete_meta_item"])
def test_every_kind_of_damage_is_detected_and_the_previous_checkpoint_restored(finished_run, tmp_path, damage):
  config, source, _ = finished_run
  workdir = _copy(source, tmp_path)
  latest = workdir / "checkpoints" / "12"
  if damage == "flip":
    _flip_bytes(_largest_file(latest / "state"))
  elif damage == "truncate":
    _truncate(_largest_file(latest / "state"))
  elif damage == "delete_metadata":
    (latest / "state" / "_METADATA").unlink()
  else:
    shutil.rmtree(latest / "meta")
  checkpointer = checkpoint_lib.RunCheckpointer(workdir)
  step, _, data_state, meta = checkpointer.restore_latest(_abstract_state(config))
  checkpointer.close()
  assert step == 8 and meta["step"] == 8 and data_state["step"] == 8
  assert (workdir / "checkpoints_damaged" / "12").is_dir() and not latest.exists()


def test_no_intact_checkpoint_stops_with_the_advice(finished_run, tmp_path):
  config, source, _ = finished_run
  workdir = _copy(source, tmp_path)
  for step in _steps(workdir):
    _flip_bytes(_largest_file(workdir / "checkpoints" / str(step) / "state"))
  checkpointer = checkpoint_lib.RunCheckpointer(workdir)
  with pytest.raises(checkpoint_lib.DamagedCheckpointError, match="Delete .*checkpoints to start the run afresh"):
    checkpointer.restore_latest(_abstract_state(config))
  checkpointer.close()


def test_non_finite_state_is_never_checkpointed(data_dirs, tmp_path):
  config = _config(data_dirs, checkpoint_every_steps=1, log_every_steps=8)
  config.optimizer.learning_rate = 1e10
  with pytest.raises(FloatingPointError):
    train.train_and_evaluate(config, tmp_path)
  checkpointer = checkpoint_lib.RunCheckpointer(tmp_path)
  for step in checkpointer.manager.all_steps():
    meta = checkpointer.read_meta(step)
    state = checkpointer.manager.restore(step)["state"]
    assert not checkpoint_lib.non_finite_paths(state), f"step {step} ({meta}) holds non-finite arrays"
  checkpointer.close()


def test_checksums_and_non_finite_paths_against_numpy():
  tree = {"a": np.arange(4, dtype=np.float32), "b": {"c": np.array([1.0, np.nan])}, "d": np.arange(3)}
  import zlib  # pylint: disable=g-import-not-at-top
  assert sharding.checksums(tree)["['a']"] == zlib.crc32(np.arange(4, dtype=np.float32).tobytes())
  assert checkpoint_lib.non_finite_paths(tree) == ["['b']['c']"]


def test_a_second_run_in_a_locked_workdir_is_refused_and_a_dead_holder_is_no_obstacle(data_dirs, tmp_path):
  config = _config(data_dirs)
  with workdir_lib.WorkdirLock(tmp_path):
    with pytest.raises(workdir_lib.WorkdirInUseError, match=r"in use by pid \d+ on host"):
      train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()
  # A lock file left by a killed run (the kernel released its lock with the process) is taken over.
  (tmp_path / ".lock").write_text("pid 1234567 on host elsewhere\n")
  lock = workdir_lib.WorkdirLock(tmp_path)
  lock.acquire()
  lock.release()


def _children(pid):
  """Pids of the live (not zombie) processes whose parent is `pid`."""
  found = []
  for entry in pathlib.Path("/proc").iterdir():
    if entry.name.isdigit():
      try:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid and fields[0] != "Z":
        found.append(int(entry.name))
  return found


def _alive(pid):
  try:
    return (pathlib.Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_main_process_leaves_no_worker_and_no_shared_memory(data_dirs, tmp_path, stop):
  shm = pathlib.Path("/dev/shm")
  before = set(os.listdir(shm))
  command = [sys.executable, "main.py", "--config", "configs/supervised.py:tiny", "--workdir", str(tmp_path),
             f"--config.data.data_dir={data_dirs['data_dir']}", f"--config.data.manual_dir={data_dirs['manual_dir']}",
             "--config.data.num_workers=2", "--config.train.num_epochs=1000"]
  with (tmp_path / "log.txt").open("w") as log:
    main = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  deadline = time.time() + 240
  # Training has started (and with it the workers) once the first train record is written.
  while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
    assert main.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
    time.sleep(0.2)
  helpers = _children(main.pid)
  assert len(helpers) >= 2, helpers  # the grain workers (and Python's resource tracker)
  main.send_signal(stop)
  main.wait(timeout=120)
  if stop == signal.SIGTERM:  # a clean stop: checkpointed at the next log step, then exit status 143
    log = (tmp_path / "log.txt").read_text()
    assert main.returncode == 128 + signal.SIGTERM, log[-3000:]
    stopped_at = int(log.split("stopped at step ")[1].split()[0])
    assert stopped_at in _steps(tmp_path)
  deadline = time.time() + 30
  while any(_alive(pid) for pid in helpers) and time.time() < deadline:
    time.sleep(0.2)
  assert not [pid for pid in helpers if _alive(pid)], "processes outlived the main process"
  while set(os.listdir(shm)) - before and time.time() < deadline:
    time.sleep(0.2)  # entries of other tests running in parallel come and go; ours must go
  assert not set(os.listdir(shm)) - before


def test_a_diagnosed_failure_ends_the_output_with_its_message_and_nothing_after(data_dirs, tmp_path):
  command = [sys.executable, "main.py", "--config", "configs/supervised.py:tiny", "--workdir", str(tmp_path),
             f"--config.data.data_dir={data_dirs['data_dir']}", f"--config.data.manual_dir={data_dirs['manual_dir']}",
             "--config.optimizer.learning_rate=1e10", "--config.train.checkpoint_every_steps=1"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1
  last = [line for line in result.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("error: NonFinite") and ("not checkpointed" in last or "loss became" in last), last
  assert "Traceback" not in result.stderr


def _dataset_copy(data_dirs, tmp_path):
  """A copy of the tiny prepared dataset (and a config pointing at it) that a test may damage."""
  data_dir = tmp_path / "tfds"
  shutil.copytree(data_dirs["data_dir"], data_dir)
  config = _config({"data_dir": str(data_dir), "manual_dir": data_dirs["manual_dir"]})
  from data_builders.ben_ge import ben_ge  # pylint: disable=g-import-not-at-top
  return config, ben_ge.dataset_dir(data_dir, tiny_data.NAME)


def test_a_truncated_record_file_is_named_with_the_commands_that_rebuild_it(data_dirs, tmp_path):
  from labeleff_jax.data import splits  # pylint: disable=g-import-not-at-top
  config, prepared = _dataset_copy(data_dirs, tmp_path)
  (shard,) = prepared.glob("*-train.array_record-*")
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  with pytest.raises(splits.DamagedDatasetError) as damaged:
    source = splits.open_split(config, "train")
    for index in range(len(source)):
      source[index]  # pylint: disable=pointless-statement
  message = str(damaged.value)
  assert "split 'train'" in message and str(prepared) in message and shard.name in message
  assert f"rm -rf {prepared} && python -m data_builders.ben_ge.build" in message


def test_a_deleted_dataset_info_is_reported_and_the_advised_commands_rebuild_it(data_dirs, tmp_path):
  from labeleff_jax.data import splits  # pylint: disable=g-import-not-at-top
  config, prepared = _dataset_copy(data_dirs, tmp_path)
  (prepared / "dataset_info.json").unlink()
  with pytest.raises(splits.DamagedDatasetError, match="no dataset_info.json") as damaged:
    splits.ensure_prepared(config)
  command = str(damaged.value).splitlines()[-1].strip()
  assert command.startswith("rm -rf ")
  rebuilt = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  assert len(splits.open_split(config, "train")) == tiny_data.SPLIT_SIZES["train"]


def test_experiment_runners_reuse_only_finished_runs_of_the_same_config(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from labeleff_jax.experiments import runner  # pylint: disable=g-import-not-at-top
  trained = []

  def fake_train(config, workdir):
    trained.append(workdir.name)
    summary = {"config_fingerprint": workdir_lib.fingerprint(workdir_lib.identity(config)),
               "final": {"test": {"accuracy": config.optimizer.learning_rate}}}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text(json.dumps(summary))
    return summary

  def runs(rate_b):
    make = lambda rate: ml_collections.ConfigDict({"optimizer": {"learning_rate": rate}})  # noqa: E731
    return [runner.Run("a", make(0.1), {"run": "a"}), runner.Run("b", make(rate_b), {"run": "b"})]

  runner.execute(runs(0.2), tmp_path, train_fn=fake_train)
  assert trained == ["a", "b"]
  again = runner.execute(runs(0.2), tmp_path, train_fn=fake_train)
  assert trained == ["a", "b"] and all(record["skipped"] for record in again)
  with pytest.raises(runner.StaleRunsError, match=r"another config than this experiment would use now: b\."):
    runner.execute(runs(0.3), tmp_path, train_fn=fake_train)
  assert trained == ["a", "b"]  # refused before anything trained


def test_two_runs_preparing_the_same_fresh_data_take_turns(tmp_path):
  script = (
      "import sys; from configs import supervised; from labeleff_jax.data import splits\n"
      "config = supervised.get_config('tiny')\n"
      "config.data.data_dir, config.data.manual_dir = sys.argv[1], sys.argv[2]\n"
      "print(len(splits.open_splits(config)['train']))\n")
  command = [sys.executable, "-c", script, str(tmp_path / "tfds"), str(tmp_path / "manual")]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  both = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(2)]
  for process in both:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert out.split()[-1] == str(tiny_data.SPLIT_SIZES["train"])
  assert not list(tmp_path.rglob("*.partial*")) and not list(tmp_path.rglob("*incomplete*"))
  # The first run on a fresh machine wrote the synthetic raw data and prepared the TFDS dataset itself.
  assert any((tmp_path / "manual").iterdir())
  assert len(list((tmp_path / "tfds").rglob("dataset_info.json"))) == 1


def test_a_full_disk_ends_the_output_with_what_to_do(data_dirs, tmp_path):
  import resource  # pylint: disable=g-import-not-at-top

  def small_files_only():  # in the child: files above 100 kB cannot be written, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

  command = [sys.executable, "main.py", "--config", "configs/supervised.py:tiny", "--workdir", str(tmp_path),
             f"--config.data.data_dir={data_dirs['data_dir']}", f"--config.data.manual_dir={data_dirs['manual_dir']}"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=small_files_only,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1
  last = [line for line in result.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("error: writing the run's files failed: the disk is full") and "File too large" in last
  assert not (tmp_path / "summary.json").exists()
