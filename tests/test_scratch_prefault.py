"""Tests of the scratch pre-fault (labeleff_jax/scratch_prefault.py): host detection, modes, and a train
step compiled with it: same results as the plain step, the whole scratch block written, one compile."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labeleff_jax import config_checks
from labeleff_jax import objectives
from labeleff_jax import scratch_prefault
from labeleff_jax import train

P = jax.sharding.PartitionSpec


@pytest.mark.parametrize("features, expected", [
    ("0110010100000000", True),   # this project's VM: bits 1, 2, 5 and 7
    ("0110000100000000", False),  # a balloon without free page reporting
    ("0000", False),              # too short to hold bit 5
])
def test_host_reports_free_pages_reads_the_balloon_feature_bit(tmp_path, features, expected):
  (tmp_path / "virtio0").mkdir()
  (tmp_path / "virtio0" / "features").write_text(features + "\n")
  assert scratch_prefault.host_reports_free_pages(str(tmp_path / "*" / "features")) is expected


def test_no_balloon_device_means_no_reporting(tmp_path):
  assert not scratch_prefault.host_reports_free_pages(str(tmp_path / "*" / "features"))


def test_modes(monkeypatch):
  monkeypatch.setattr(scratch_prefault, "host_reports_free_pages", lambda: False)
  assert scratch_prefault.wanted("on", "cpu")
  assert not scratch_prefault.wanted("auto", "cpu")
  assert not scratch_prefault.wanted("off", "cpu")
  assert not scratch_prefault.wanted("on", "gpu")
  monkeypatch.setattr(scratch_prefault, "host_reports_free_pages", lambda: True)
  assert scratch_prefault.wanted("auto", "cpu")
  assert not scratch_prefault.wanted("auto", "tpu")
  with pytest.raises(ValueError, match="prefault_scratch='always'"):
    scratch_prefault.wanted("always", "cpu")


def test_config_check_names_the_key():
  from configs import supervised  # pylint: disable=g-import-not-at-top
  config = supervised.get_config("tiny")
  config.train.prefault_scratch = "yes"
  with pytest.raises(config_checks.ConfigError, match=r"train.prefault_scratch='yes'"):
    config_checks.check(config, num_data_devices=1)


def _setup_and_batch(mode, mesh):
  from configs import supervised  # pylint: disable=g-import-not-at-top
  config = supervised.get_config("tiny")
  config.train.prefault_scratch = mode
  config.model.dropout = 0.0
  setup = train.init_training(config, mesh, objectives.make_objective(config), steps_per_epoch=2,
                              total_steps=4)
  rng = np.random.default_rng(0)
  batch = {"inputs": {"s2": rng.uniform(0, 1, (8, 32, 32, 12)).astype(np.float32)},
           "labels": {"climatezone": rng.integers(0, 12, (8,)).astype(np.int32)},
           "valid": np.ones((8,), bool), "index": np.arange(8, dtype=np.int32)}
  return setup, jax.device_put(batch, jax.sharding.NamedSharding(mesh, P("data")))


def _two_steps(setup, batch, mesh):
  state, history = setup.state, []
  with jax.set_mesh(mesh):
    for step in range(2):
      state, step_metrics = setup.train_step(state, setup.rng_state, batch, jnp.int32(step))
      history.append(jax.device_get(step_metrics))
  params = nnx.state(nnx.merge(setup.graphdef, setup.rng_state, state)["model"], nnx.Param)
  return jax.device_get(nnx.to_pure_dict(params)), history


@pytest.mark.parametrize("num_devices", [1, 8])
def test_prefaulted_step_equals_the_plain_step_and_writes_its_whole_block(num_devices):
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:num_devices])
  plain, batch = _setup_and_batch("off", mesh)
  prefaulted, _ = _setup_and_batch("on", mesh)
  assert not isinstance(plain.train_step, scratch_prefault.PrefaultingStep)
  assert isinstance(prefaulted.train_step, scratch_prefault.PrefaultingStep)

  params_plain, history_plain = _two_steps(plain, batch, mesh)
  params_prefaulted, history_prefaulted = _two_steps(prefaulted, batch, mesh)
  # The scratch only feeds a zero added to the step number: bit-identical results.
  jax.tree.map(np.testing.assert_array_equal, params_prefaulted, params_plain)
  jax.tree.map(np.testing.assert_array_equal, history_prefaulted, history_plain)

  # Compiled once for the two calls; the buffer written first covers the executable's whole block.
  (blocks,) = prefaulted.train_step.blocks.values()
  with jax.set_mesh(mesh):
    args = (prefaulted.state, prefaulted.rng_state, batch, jnp.int32(0))
    compiled = prefaulted.train_step.lower(*args).compile()
  assert len(prefaulted.train_step.blocks) == 1
  scratch = blocks["scratch_bytes"]
  assert scratch % scratch_prefault.PAGE_BYTES == 0
  assert blocks["plain_block_bytes"] * scratch_prefault.HEADROOM <= scratch
  assert compiled.memory_analysis().temp_size_in_bytes == blocks["block_bytes"]
  assert scratch <= blocks["block_bytes"] <= scratch + scratch_prefault.PAGE_BYTES
  assert f"s32[{scratch // 4}]" in compiled.as_text()


def test_auto_leaves_small_blocks_to_the_plain_step(monkeypatch):
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  monkeypatch.setattr(scratch_prefault, "host_reports_free_pages", lambda: True)
  setup, batch = _setup_and_batch("auto", mesh)
  assert isinstance(setup.train_step, scratch_prefault.PrefaultingStep)
  with jax.set_mesh(mesh):
    compiled = setup.train_step.lower(setup.state, setup.rng_state, batch, jnp.int32(0)).compile()
  (blocks,) = setup.train_step.blocks.values()
  assert blocks["scratch_bytes"] == 0
  assert compiled.memory_analysis().temp_size_in_bytes == blocks["plain_block_bytes"] < \
      scratch_prefault.MIN_AUTO_SCRATCH_BYTES


def test_scratch_survives_a_step_that_ignores_its_step_number():
  # A step that never reads its step number (constant schedule, no dropout) must still write the buffer.
  prefaulting = scratch_prefault.PrefaultingStep(lambda x, step: jnp.tanh(x @ x) + 1.0, donate_argnums=(),
                                                 mode="on")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
  np.testing.assert_array_equal(prefaulting(x, jnp.int32(3)), jax.jit(lambda x: jnp.tanh(x @ x) + 1.0)(x))
  (blocks,) = prefaulting.blocks.values()
  assert blocks["scratch_bytes"] >= scratch_prefault.PAGE_BYTES
  scratch = blocks["scratch_bytes"]
  assert scratch <= blocks["block_bytes"] <= scratch + scratch_prefault.PAGE_BYTES
