"""Tests of the input pipeline: shuffling, determinism, resume, complete evaluation, sharding, workers."""

import gc
import json
import multiprocessing
import os
import pathlib
import threading

import grain
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from labeleff_jax import config_checks, sharding
from labeleff_jax.data import constants, label_fraction, pipeline, splits, transforms

SIZE = 16  # stored raster side of the in-memory examples


class InMemoryBenGe:
  """Deterministic raw examples with the features of the prepared dataset, at a small image size."""

  def __init__(self, num_examples, size=SIZE, seed=0):
    self.num_examples, self.size, self.seed = num_examples, size, seed
    self.reads = 0

  def __len__(self):
    return self.num_examples

  def __getitem__(self, index):
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    self.reads += 1
    rng = np.random.default_rng([self.seed, index])
    size = self.size
    fractions = rng.random(11).astype(np.float32)
    fractions /= fractions.sum()
    # s2 band 0 encodes the example index and pixel position, so a batch row can be traced back.
    position = np.arange(size * size).reshape(size, size)
    s2 = rng.integers(0, 12000, (size, size, 12)).astype(np.uint16)
    s2[..., 0] = position + 1000 * (index % 9)
    return {
        "s2": s2, "s1": rng.uniform(-30, 5, (size, size, 2)).astype(np.float32),
        "dem": rng.uniform(0, 2500, (size, size, 1)).astype(np.float32),
        "lulc": (position % 11).astype(np.uint8), "lulc_fractions": fractions,
        "lulc_top": int(fractions.argmax()), "climatezone": int(index % 3 if index % 4 else 7),
        "season_s2": np.float32(index / max(self.num_examples, 1)), "season_s1": np.float32(0.5),
        "era5": rng.normal(size=9).astype(np.float32), "geocluster": index % 20,
        "lon": np.float32(8.0), "lat": np.float32(47.0), "patch_id": f"patch_{index}".encode(),
    }


def make_config(**data):
  config = ml_collections.ConfigDict()
  config.seed = 3
  config.data = ml_collections.ConfigDict(dict(modalities=["s2", "lulc", "season"], label_fraction=1.0,
                                               num_workers=0))
  config.data.update(data)
  config.train = ml_collections.ConfigDict(dict(batch_size=8))
  config.eval = ml_collections.ConfigDict(dict(batch_size=8))
  return config


def spec_of(config, labels=()):
  return pipeline.DataSpec.from_config(config, labels=labels)


def train_iterator(config, source, mesh, labels=(), **kwargs):
  return pipeline.make_train_iterator(spec_of(config, labels), source, mesh, **kwargs)


def eval_batches(config, source, mesh, labels=(), **kwargs):
  return pipeline.make_eval_batches(spec_of(config, labels), source, mesh, **kwargs)


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("data",))


def to_numpy(batch):
  return jax.tree.map(np.asarray, batch)


def take(iterator, count):
  return [to_numpy(next(iterator)) for _ in range(count)]


def assert_batches_equal(first, second):
  for a, b in zip(first, second, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_batch_matches_the_documented_format_and_is_sharded(mesh):
  config = make_config(modalities=["s2", "s1", "dem", "lulc", "season", "climatezone", "era5"])
  iterator = train_iterator(config, InMemoryBenGe(20), mesh,
                                          labels=list(constants.LABELS))
  batch = next(iterator)
  channels = constants.MODALITIES
  for name in ("s2", "s1", "dem"):
    assert batch["inputs"][name].shape == (8, SIZE, SIZE, channels[name])
  for name in ("season", "climatezone", "era5"):
    assert batch["inputs"][name].shape == (8, channels[name])
  # Land cover travels as its class map; the models one-hot it on the device.
  assert batch["inputs"]["lulc"].shape == (8, SIZE, SIZE) and batch["inputs"]["lulc"].dtype == np.uint8
  for name, value in batch["inputs"].items():
    assert value.dtype == (np.uint8 if name == "lulc" else np.float32), name
  expected_labels = {"climatezone": ((8,), np.int32), "lulc_top": ((8,), np.int32),
                     "lulc_multihot": ((8, 11), np.float32), "lulc": ((8, SIZE, SIZE), np.int32),
                     "season": ((8,), np.float32), "geocluster": ((8,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch["labels"].items()} == expected_labels
  assert batch["valid"].dtype == bool and batch["index"].dtype == np.int32
  assert "inputs2" not in batch
  for leaf in jax.tree.leaves(batch):
    assert isinstance(leaf, jax.Array)
    assert leaf.sharding.spec == PartitionSpec("data")
    assert len(leaf.addressable_shards) == 8
    assert all(shard.data.shape[0] == 1 for shard in leaf.addressable_shards)


def test_labels_and_vectors_come_from_the_indexed_example(mesh):
  source = InMemoryBenGe(20)
  iterator = train_iterator(make_config(), source, mesh, labels=["climatezone", "season"])
  batch = to_numpy(next(iterator))
  for row, index in enumerate(batch["index"]):
    example = source[int(index)]
    assert batch["labels"]["climatezone"][row] == example["climatezone"]
    np.testing.assert_allclose(batch["inputs"]["season"][row], [example["season_s2"]])
    # The band that encodes the index survives augmentation as a set of values.
    restored = np.rint(batch["inputs"]["s2"][row, ..., 0] * 1e4).astype(np.int64)
    np.testing.assert_array_equal(np.sort(restored.ravel()), np.sort(example["s2"][..., 0].ravel()))


def test_each_epoch_is_a_fresh_permutation_without_the_remainder(mesh):
  source = InMemoryBenGe(21)  # 2 full batches of 8 per epoch, 5 examples dropped each epoch
  iterator = train_iterator(make_config(), source, mesh, labels=[])
  assert iterator.steps_per_epoch == 2 == pipeline.steps_per_epoch(21, 8)
  epochs = []
  for epoch in range(3):
    assert iterator.epoch == epoch
    seen = np.concatenate([b["index"] for b in take(iterator, 2)])
    assert len(set(seen)) == 16 and set(seen) <= set(range(21))
    np.testing.assert_array_equal(seen, iterator.epoch_order(epoch)[:16])
    np.testing.assert_array_equal(np.sort(iterator.epoch_order(epoch)), np.arange(21))
    epochs.append(seen)
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_same_seed_same_batches_and_other_seed_other_batches(mesh):
  def run(seed, workers, worker_type="process"):
    config = make_config(num_workers=workers, worker_type=worker_type,
                         augment=ml_collections.ConfigDict(dict(noise_std=0.1)))
    config.seed = seed
    iterator = train_iterator(config, InMemoryBenGe(24), mesh, labels=["lulc"])
    batches = take(iterator, 4)
    iterator.close()
    return batches
  reference = run(3, 0)
  assert_batches_equal(reference, run(3, 0))
  assert_batches_equal(reference, run(3, 1))  # worker processes never change the data, however many
  assert_batches_equal(reference, run(3, 2))
  assert_batches_equal(reference, run(3, 2, "thread"))  # nor does reading ahead with threads
  other = run(4, 0)
  assert not np.array_equal(reference[0]["index"], other[0]["index"])


def test_augmentation_is_joint_and_differs_between_epochs(mesh):
  source = InMemoryBenGe(8)  # one batch per epoch: the same examples every epoch
  iterator = train_iterator(make_config(), source, mesh, labels=["lulc"])
  first, second = take(iterator, 2)
  assert set(first["index"]) == set(second["index"]) == set(range(8))
  changed = 0
  for batch in (first, second):
    for row, index in enumerate(batch["index"]):
      position = np.rint(batch["inputs"]["s2"][row, ..., 0] * 1e4).astype(np.int64) - 1000 * (index % 9)
      np.testing.assert_array_equal(batch["labels"]["lulc"][row], position % 11)
      np.testing.assert_array_equal(batch["inputs"]["lulc"][row], position % 11)
  for index in range(8):
    a = first["inputs"]["s2"][list(first["index"]).index(index)]
    b = second["inputs"]["s2"][list(second["index"]).index(index)]
    changed += not np.array_equal(a, b)
  assert changed >= 4  # P(same symmetry) = 1/8 per example


def test_crop_to_image_size_random_for_training_centred_for_eval(mesh):
  config = make_config(image_size=8, augment=ml_collections.ConfigDict(dict(flip=False, rot90=False)))
  source = InMemoryBenGe(16)
  offsets = set()
  for batch in take(train_iterator(config, source, mesh, labels=["lulc"]), 4):
    assert batch["inputs"]["s2"].shape == (8, 8, 8, 12) and batch["labels"]["lulc"].shape == (8, 8, 8)
    for row, index in enumerate(batch["index"]):
      # s2 band 0 holds the pixel's position in the source image: its top-left pixel gives the crop.
      raw = int(round(float(batch["inputs"]["s2"][row, 0, 0, 0]) * 1e4)) - 1000 * (int(index) % 9)
      top, left = divmod(raw, SIZE)
      assert 0 <= top <= SIZE - 8 and 0 <= left <= SIZE - 8
      window = (slice(top, top + 8), slice(left, left + 8))
      expected = transforms.normalize({"s2": source[int(index)]["s2"][window]}, ["s2"])["s2"]
      np.testing.assert_allclose(batch["inputs"]["s2"][row], expected)
      np.testing.assert_array_equal(batch["labels"]["lulc"][row], source[int(index)]["lulc"][window])
      offsets.add((top, left))
  # 32 crops drawn from 81 possible windows: a fixed (e.g. centred) window would give one.
  assert len(offsets) >= 10
  evaluation = to_numpy(next(eval_batches(config, source, mesh, labels=["lulc"])))
  expected = transforms.normalize({"s2": source[0]["s2"][4:12, 4:12]}, ["s2"])["s2"]
  np.testing.assert_allclose(evaluation["inputs"]["s2"][0], expected)
  np.testing.assert_array_equal(evaluation["labels"]["lulc"][0], source[0]["lulc"][4:12, 4:12])


@pytest.mark.parametrize("num_examples,batch_size", [(21, 8), (16, 8), (5, 16), (3, 8)])
def test_evaluation_visits_every_example_exactly_once(mesh, num_examples, batch_size):
  config = make_config()
  config.eval.batch_size = batch_size
  source = InMemoryBenGe(num_examples)
  batches = eval_batches(config, source, mesh, labels=["climatezone", "lulc"])
  assert len(batches) == -(-num_examples // batch_size)
  collected = [to_numpy(batch) for batch in batches]
  assert len(collected) == len(batches)
  index = np.concatenate([b["index"] for b in collected])
  valid = np.concatenate([b["valid"] for b in collected])
  assert all(b["index"].shape == (batch_size,) for b in collected)
  np.testing.assert_array_equal(index[valid], np.arange(num_examples))  # fixed order, each once
  assert np.all(index[~valid] == -1) and valid.sum() == num_examples
  s2 = np.concatenate([b["inputs"]["s2"] for b in collected])
  lulc = np.concatenate([b["labels"]["lulc"] for b in collected])
  lulc_input = np.concatenate([b["inputs"]["lulc"] for b in collected])
  assert np.all(s2[~valid] == 0) and np.all(lulc[~valid] == constants.LULC_IGNORE)
  assert np.all(lulc_input[~valid] == constants.LULC_IGNORE)  # a one-hot of nothing in the model
  for position in range(num_examples):  # no augmentation: rows equal the plain transform
    np.testing.assert_allclose(s2[position], transforms.normalize(source[position], ["s2"])["s2"])


def test_eval_batch_size_falls_back_to_the_training_batch_size(mesh):
  config = make_config()
  del config.eval
  batches = eval_batches(config, InMemoryBenGe(20), mesh, labels=[])
  assert len(batches) == 3 and next(batches)["index"].shape == (8,)


def test_resume_from_saved_state_continues_with_the_same_batches(mesh):
  config = make_config(num_workers=2, augment=ml_collections.ConfigDict(dict(brightness=0.1)))
  source = InMemoryBenGe(20)  # 2 steps per epoch: the run below crosses epoch boundaries
  uninterrupted = take(train_iterator(config, source, mesh, labels=["lulc"]), 7)
  interrupted = train_iterator(config, source, mesh, labels=["lulc"])
  assert_batches_equal(uninterrupted[:3], take(interrupted, 3))
  state = json.loads(json.dumps(interrupted.get_state()))  # survives a trip through JSON
  assert state["step"] == 3 and state["epoch"] == 1
  resumed = train_iterator(config, source, mesh, labels=["lulc"])
  resumed.set_state(state)
  assert resumed.step == 3 and resumed.epoch == 1
  assert_batches_equal(uninterrupted[3:], take(resumed, 4))
  # Rewinding a used iterator works too (its prefetched batches are discarded).
  interrupted.set_state({"step": 1})
  assert_batches_equal(uninterrupted[1:3], take(interrupted, 2))


def test_state_from_another_setup_is_refused(mesh):
  iterator = train_iterator(make_config(), InMemoryBenGe(20), mesh, labels=[])
  state = iterator.get_state()
  other = train_iterator(make_config(), InMemoryBenGe(24), mesh, labels=[])
  with pytest.raises(ValueError, match="num_examples"):
    other.set_state(state)


def test_orbax_checkpoints_the_iterator_through_grain(mesh, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  config = make_config()
  iterator = train_iterator(config, InMemoryBenGe(20), mesh, labels=[])
  take(iterator, 3)
  uninterrupted = train_iterator(config, InMemoryBenGe(20), mesh, labels=[])
  expected = take(uninterrupted, 4)[3]
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    restored = train_iterator(config, InMemoryBenGe(20), mesh, labels=[])
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert restored.step == 3
  jax.tree.map(np.testing.assert_array_equal, to_numpy(next(restored)), expected)


def test_two_views_share_examples_but_not_augmentations(mesh):
  config = make_config(num_views=2, modalities=["s2", "s1"])
  batch = to_numpy(next(train_iterator(config, InMemoryBenGe(16), mesh, labels=["lulc"])))
  assert sorted(batch["inputs2"]) == ["s1", "s2"]
  differ = 0
  for row in range(8):
    first, second = batch["inputs"]["s2"][row], batch["inputs2"]["s2"][row]
    # Only flips and rotations are on: view two must be a symmetry of view one, jointly for s2 and s1.
    symmetries = [k for k in range(8) if np.array_equal(_dihedral(first, k), second)]
    assert symmetries
    assert any(np.array_equal(_dihedral(batch["inputs"]["s1"][row], k), batch["inputs2"]["s1"][row])
               for k in symmetries)
    differ += not np.array_equal(first, second)
  assert differ >= 4


def _dihedral(image, k):
  image = image if k < 4 else image[:, ::-1]
  return np.rot90(image, k % 4, axes=(0, 1))


def test_label_fraction_selects_the_nested_stratified_subset(mesh):
  source = InMemoryBenGe(40)
  config = make_config(label_fraction=0.25, label_fraction_seed=5)
  iterator = train_iterator(config, source, mesh, labels=["climatezone"])
  zones = np.array([source[i]["climatezone"] for i in range(40)])
  np.testing.assert_array_equal(iterator.indices, label_fraction.label_fraction_indices(zones, 0.25, 5))
  np.testing.assert_array_equal(pipeline.read_field(source, "climatezone"), zones)
  unlabelled = pipeline.select_indices(spec_of(config), source, "unlabelled")
  assert set(unlabelled) == set(range(40)) - set(iterator.indices)
  seen = np.concatenate([b["index"] for b in take(iterator, iterator.steps_per_epoch)])
  assert set(seen) <= set(iterator.indices)
  everything = train_iterator(config, source, mesh,
                              indices=pipeline.select_indices(spec_of(config), source, "all"))
  assert everything.num_examples == 40


def test_standardisation_from_training_statistics(mesh):
  source = InMemoryBenGe(16)
  config = make_config(normalization="standardize", modalities=["s1", "dem"],
                       augment=ml_collections.ConfigDict(dict(flip=False, rot90=False)))
  iterator = train_iterator(config, source, mesh, labels=[])
  json.dumps(iterator.stats)
  batch = to_numpy(next(iterator))
  for name in ("dem", "s1"):  # per band over every pixel of every training example
    values = np.stack([source[i][name] for i in range(16)]).astype(np.float64)
    mean, std = values.mean(axis=(0, 1, 2)), values.std(axis=(0, 1, 2))
    np.testing.assert_allclose(iterator.stats[name]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(iterator.stats[name]["std"], std, rtol=1e-6)
    for row, index in enumerate(batch["index"]):
      expected = (source[int(index)][name] - mean) / std
      np.testing.assert_allclose(batch["inputs"][name][row], expected, rtol=1e-4, atol=1e-5)
  values = np.stack([source[i]["dem"] for i in range(16)]).astype(np.float64)
  with pytest.raises(ValueError, match="training split"):
    eval_batches(config, source, mesh, labels=[])
  config.data.normalization_stats = iterator.stats  # how the engine hands them to evaluation
  evaluation = to_numpy(next(eval_batches(config, source, mesh, labels=[])))
  np.testing.assert_allclose(evaluation["inputs"]["dem"][0],
                             (source[0]["dem"] - values.mean()) / values.std(), rtol=1e-4, atol=1e-5)


def test_presets_reach_training_and_evaluation_batches(mesh):
  source = InMemoryBenGe(16)
  presets = ml_collections.ConfigDict(dict(s2="s2_div10000", s1="s1_db_zscore_ssl4eo"))
  config = make_config(modalities=["s2", "s1"], presets=presets,
                       augment=ml_collections.ConfigDict(dict(flip=False, rot90=False)))
  training = to_numpy(next(train_iterator(config, source, mesh, labels=[])))
  evaluation = to_numpy(next(eval_batches(config, source, mesh, labels=[])))
  for batch in (training, evaluation):
    for row, index in enumerate(batch["index"]):
      raw = source[int(index)]
      # Unclipped /10000 (the reference scaling would clip reflectances above 1), and dB z-scores.
      np.testing.assert_allclose(batch["inputs"]["s2"][row], raw["s2"] / 10000.0, rtol=1e-6)
      expected_s1 = (raw["s1"] - np.array([-20.26, -12.59])) / np.array([5.91, 5.26])  # VH, VV
      np.testing.assert_allclose(batch["inputs"]["s1"][row], expected_s1, rtol=1e-5, atol=1e-6)
  assert training["inputs"]["s2"].max() > 1.0


def test_auto_axis_mesh_with_a_second_axis(mesh):
  auto = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  config = make_config()
  config.train.batch_size = 4
  batch = next(train_iterator(config, InMemoryBenGe(12), auto, labels=[]))
  assert batch["inputs"]["s2"].shape == (4, SIZE, SIZE, 12)
  assert batch["inputs"]["s2"].sharding.spec == PartitionSpec("data")
  assert {shard.data.shape[0] for shard in batch["inputs"]["s2"].addressable_shards} == {1}


def test_configuration_errors_name_the_key(mesh):
  source = InMemoryBenGe(12)
  config = make_config()
  config.train.batch_size = 12
  with pytest.raises(ValueError, match="train.batch_size=12 is not divisible by the 8 devices"):
    train_iterator(config, source, mesh, labels=[])
  config.train.batch_size = 16
  with pytest.raises(ValueError, match="train.batch_size=16 exceeds the 12 training examples"):
    train_iterator(config, source, mesh, labels=[])
  config.train.batch_size = 8
  config.eval.batch_size = 6
  with pytest.raises(ValueError, match="eval.batch_size"):
    eval_batches(config, source, mesh, labels=[])
  with pytest.raises(ValueError, match="'data' axis"):
    train_iterator(config, source, jax.make_mesh((8,), ("batch",)), labels=[])
  with pytest.raises(ValueError, match="image_size=32"):  # fits the stored 120 px, not these 16 px
    train_iterator(make_config(image_size=32), source, mesh, labels=[])
  # The spec's builder checks the config (config_checks.check_data) and names the key at fault.
  for key, value, message in [
      ("modalities", ["s2", "rgb"], "data.modalities: 'rgb'"), ("num_views", 3, "data.num_views=3"),
      ("normalization", "minmax", "data.normalization='minmax'"),
      ("augment", ml_collections.ConfigDict(dict(flips=True)), "data.augment: unknown option.*flips"),
      ("augment", ml_collections.ConfigDict(dict(blur_prob=1.5)), "data.augment.blur_prob=1.5"),
      ("augment", ml_collections.ConfigDict(dict(flip="yes")), "data.augment.flip"),
      ("image_size", 121, "data.image_size=121"), ("label_fraction", 0.0, "data.label_fraction=0.0"),
      ("label_fraction_seed", 0.5, "data.label_fraction_seed"),
      ("stratify_by", "lulc", "data.stratify_by='lulc'"),
      ("multilabel_threshold", 1.0, "data.multilabel_threshold=1.0"),
      ("num_workers", -1, "data.num_workers=-1"), ("worker_type", "fork", "data.worker_type='fork'"),
      ("prefetch", 1.5, "data.prefetch")]:
    with pytest.raises(config_checks.ConfigError, match=message):
      spec_of(make_config(**{key: value}))
  with pytest.raises(config_checks.ConfigError, match="labels: 'colour'"):
    spec_of(make_config(), labels=["colour"])
  config.train.batch_size = 0
  with pytest.raises(config_checks.ConfigError, match="train.batch_size=0"):
    spec_of(config)


def test_the_spec_holds_what_the_config_says():
  config = make_config(image_size=12, num_views=2, normalization="standardize", multilabel_threshold=0.2,
                       label_fraction=0.5, label_fraction_seed=7, stratify_by="lulc_top", num_workers=3,
                       worker_type="thread", prefetch=5, augment=ml_collections.ConfigDict(dict(flip=False, noise_std=0.1)))
  config.eval.batch_size = 16
  spec = spec_of(config, ["lulc"])
  assert spec == pipeline.DataSpec(
      modalities=("s2", "lulc", "season"), labels=("lulc",), train_batch_size=8, eval_batch_size=16, seed=3,
      image_size=12, flip=False, rot90=True, spectral=transforms.SpectralAugment(noise_std=0.1), num_views=2,
      normalization="standardize", multilabel_threshold=0.2, label_fraction=0.5, label_fraction_seed=7,
      stratify_by="lulc_top", num_workers=3, worker_type="thread", prefetch=5)
  del config.eval
  config.tasks = [ml_collections.ConfigDict(dict(label="climatezone"))]
  spec = pipeline.DataSpec.from_config(config)  # labels: those the tasks need
  assert spec.labels == ("climatezone",) and spec.eval_batch_size == 8


def test_normalization_stats_are_kept_in_the_workdir(tmp_path):
  source = InMemoryBenGe(6)
  spec = spec_of(make_config(normalization="standardize", modalities=["dem"]))
  assert pipeline.normalization_stats(spec_of(make_config()), source, workdir=tmp_path) is None
  stats = pipeline.normalization_stats(spec, source, workdir=tmp_path)
  assert json.loads((tmp_path / "normalization.json").read_text()) == stats
  # A resumed run reads them back instead of computing them from whatever source it is given.
  assert pipeline.normalization_stats(spec, InMemoryBenGe(6, seed=1), workdir=tmp_path) == stats
  assert pipeline.normalization_stats(spec, InMemoryBenGe(6, seed=1)) != stats


def test_missing_prepared_dataset_names_the_path_and_the_build_command(tmp_path):
  config = make_config(name="ben-ge-800", data_dir=str(tmp_path / "tfds"), manual_dir="/raw")
  with pytest.raises(FileNotFoundError) as error:
    splits.open_split(config, "train")
  message = str(error.value)
  assert str(tmp_path / "tfds" / "ben_ge" / "ben-ge-800") in message
  assert "python -m data_builders.ben_ge.build --manual_dir /raw" in message


# ---------------------------------------------------------------------------------------------------------
# Integration: a tiny prepared TFDS dataset, read through tfds.data_source.
# ---------------------------------------------------------------------------------------------------------
def test_prepared_synthetic_dataset_flows_through_the_pipeline(mesh, tmp_path):
  from data_builders.ben_ge import ben_ge, synthetic
  synthetic.write_dataset(tmp_path / "manual", "ben-ge-800", 16, seed=1)
  ben_ge.prepare(tmp_path / "manual", tmp_path / "tfds", "ben-ge-800")
  config = make_config(name="ben-ge-800", data_dir=str(tmp_path / "tfds"), image_size=32,
                       modalities=["s2", "s1", "dem", "lulc", "era5", "season", "climatezone"])
  train = splits.open_split(config, "train")
  validation = splits.open_split(config, "val")
  assert len(train) >= 8 and len(validation) >= 1
  labels = ["climatezone", "lulc_top", "lulc_multihot", "lulc"]
  batch = to_numpy(next(train_iterator(config, train, mesh, labels=labels)))
  assert batch["inputs"]["s2"].shape == (8, 32, 32, 12) and batch["labels"]["lulc"].shape == (8, 32, 32)
  for value in jax.tree.leaves(batch["inputs"]):
    assert np.all(np.isfinite(value))
  assert 0.0 <= batch["inputs"]["s2"].min() and batch["inputs"]["s2"].max() <= 1.0
  for row, index in enumerate(batch["index"]):
    example = train[int(index)]
    assert batch["labels"]["climatezone"][row] == example["climatezone"]
    assert batch["labels"]["lulc_top"][row] == example["lulc_top"]
    np.testing.assert_array_equal(batch["inputs"]["lulc"][row], batch["labels"]["lulc"][row])
  evaluation = [to_numpy(b) for b in eval_batches(config, validation, mesh, labels=labels)]
  index = np.concatenate([b["index"] for b in evaluation])
  np.testing.assert_array_equal(index[index >= 0], np.arange(len(validation)))
  first = validation[0]
  np.testing.assert_array_equal(evaluation[0]["labels"]["lulc"][0], first["lulc"][44:76, 44:76])


def test_open_split_decodes_every_example_exactly_like_tfds(tmp_path):
  import tensorflow_datasets as tfds
  from data_builders.ben_ge import ben_ge, synthetic
  synthetic.write_dataset(tmp_path / "manual", "ben-ge-800", 12, seed=2)
  path = ben_ge.prepare(tmp_path / "manual", tmp_path / "tfds", "ben-ge-800")
  config = make_config(name="ben-ge-800", data_dir=str(tmp_path / "tfds"))
  builder = tfds.builder_from_directory(str(path))
  for split in ("train", "validation", "test"):
    ours, theirs = splits.open_split(config, split), builder.as_data_source(split=split)
    assert isinstance(ours, splits.DecodedSource) and len(ours) == len(theirs)
    for index in range(len(theirs)):
      mine, reference = ours[index], theirs[index]
      assert mine.keys() == reference.keys()
      for key, value in reference.items():
        assert type(mine[key]) is type(value), key
        assert np.asarray(mine[key]).dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(mine[key], value)
        if isinstance(value, np.ndarray):
          assert mine[key].shape == value.shape and not mine[key].flags.writeable


def test_record_decoder_matches_tfds_on_every_feature_kind_it_accepts():
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import example_serializer
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(3, 2, 2), dtype=np.uint16, encoding=tfds.features.Encoding.BYTES),
      "vector": tfds.features.Tensor(shape=(4,), dtype=np.float32, encoding=tfds.features.Encoding.BYTES),
      "label": tfds.features.ClassLabel(num_classes=5),
      "value": tfds.features.Scalar(dtype=np.float32),
      "count": tfds.features.Scalar(dtype=np.int32),
      "flag": tfds.features.Scalar(dtype=np.bool_),
      "name": tfds.features.Text(),
  })
  example = {"image": np.arange(12, dtype=np.uint16).reshape(3, 2, 2),
             "vector": np.float32([0.1, -2, 3e9, 0]),
             "label": 3, "value": np.float32(0.3), "count": -7, "flag": True, "name": "S2A_patch"}
  record = example_serializer.ExampleSerializer(features.get_serialized_info()).serialize_example(
      features.encode_example(example))
  decoder = splits.RecordDecoder.for_features(features)
  mine, reference = decoder(record), features.deserialize_example_np(record)
  assert mine.keys() == reference.keys()
  for key, value in reference.items():
    assert type(mine[key]) is type(value) and np.asarray(mine[key]).dtype == np.asarray(value).dtype, key
    np.testing.assert_array_equal(mine[key], value)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (lengths under 128 here: one byte)."""
  assert len(payload) < 128
  return bytes([number << 3 | 2, len(payload)]) + payload


def _example(features: dict) -> bytes:
  """A tf.Example from {name: (Feature field number, list message bytes)}, written by hand."""
  entries = b"".join(_field(1, _field(1, name.encode()) + _field(2, _field(kind, payload)))
                     for name, (kind, payload) in features.items())
  return _field(1, entries)


def test_record_decoder_reads_unpacked_lists_and_negative_varints_as_protobuf_does():
  # Writers may emit scalars unpacked (tag per value) instead of packed; both are valid tf.Examples.
  from tensorflow_datasets.proto import tf_example_pb2
  record = _example({
      "value": (2, b"\x0d" + np.float32(0.3).tobytes()),  # FloatList, unpacked fixed32
      "count": (3, b"\x08" + bytes.fromhex("f9ffffffffffffffff01")),  # Int64List, unpacked varint -7
      "name": (1, _field(1, b"S2A")),
      "image": (1, _field(1, np.arange(4, dtype=np.uint16).tobytes())),
  })
  parsed = tf_example_pb2.Example.FromString(record).features.feature  # the same bytes, read by protobuf
  assert parsed["value"].float_list.value[0] == np.float32(0.3) and parsed["count"].int64_list.value[0] == -7
  decoder = splits.RecordDecoder([("value", "float_list", np.dtype(np.float32), None),
                                  ("count", "int64_list", np.dtype(np.int32), None),
                                  ("name", "bytes_list", np.dtype(object), None),
                                  ("image", "bytes_list", np.dtype(np.uint16), (2, 2))])
  example = decoder(record)
  assert example["value"] == float(np.float32(0.3)) and type(example["value"]) is float
  assert example["count"] == -7 and type(example["count"]) is int
  assert example["name"] == b"S2A"
  np.testing.assert_array_equal(example["image"], [[0, 1], [2, 3]])


@pytest.mark.parametrize("damage, message", [
    (lambda record: record[:-3], "truncated"),
    (lambda record: b"\x12" + record[1:], "not a serialised tf.Example"),
    (lambda record: record.replace(b"image", b"imagf"), "feature 'image'"),
])
def test_damaged_records_name_the_example_and_the_fault(damage, message):
  plan = [("image", "bytes_list", np.dtype(np.uint16), (2, 2))]
  record = _example({"image": (1, _field(1, np.arange(4, dtype=np.uint16).tobytes()))})
  source = splits.DecodedSource([record, damage(record)], splits.RecordDecoder(plan), where="split 'x'")
  assert source[0]["image"].shape == (2, 2)
  with pytest.raises(splits.DamagedDatasetError, match=f"example 1 of split 'x'.*{message}"):
    source[1]


def test_record_decoder_refuses_a_tensor_of_the_wrong_size():
  plan = [("image", "bytes_list", np.dtype(np.uint16), (3, 2))]
  record = _example({"image": (1, _field(1, np.arange(4, dtype=np.uint16).tobytes()))})
  with pytest.raises(ValueError, match="'image' has 8 bytes, shape \\(3, 2\\) of uint16 needs 12"):
    splits.RecordDecoder(plan)(record)


@pytest.mark.parametrize("feature", ["zlib", "dynamic", "nested"])
def test_record_decoder_leaves_other_features_to_tfds(feature):
  import tensorflow_datasets as tfds
  other = {
      "zlib": tfds.features.Tensor(shape=(4,), dtype=np.float32, encoding=tfds.features.Encoding.ZLIB),
      "dynamic": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
      "nested": tfds.features.FeaturesDict({"a": tfds.features.Scalar(dtype=np.float32)}),
  }[feature]
  features = tfds.features.FeaturesDict({"label": tfds.features.ClassLabel(num_classes=2), "other": other})
  assert splits.RecordDecoder.for_features(features) is None


def test_batches_are_aligned_for_zero_copy_device_placement(mesh):
  iterator = train_iterator(make_config(modalities=["s2", "s1", "lulc"]), InMemoryBenGe(16), mesh,
                            labels=["lulc", "climatezone"])
  batch = iterator.host_batch(0)
  for leaf in jax.tree.leaves(batch):
    assert leaf.ctypes.data % 64 == 0
  np.testing.assert_array_equal(batch["index"], to_numpy(next(iterator))["index"])
  # For worker processes the large arrays are grain's shared memory (page-aligned), the small ones not.
  template = {"inputs": {"big": np.zeros((64, 64, 4), np.float32)}, "labels": {}, "index": np.int32(0)}
  shared = pipeline.empty_batch(template, 4, shared_memory=f"lej_{os.getpid()}_test_")
  assert isinstance(shared["inputs"]["big"], grain.multiprocessing.SharedMemoryArray)
  shared["inputs"]["big"].unlink_on_del()
  assert shared["inputs"]["big"].shape == (4, 64, 64, 4) and shared["labels"] == {}
  assert not isinstance(shared["index"], grain.multiprocessing.SharedMemoryArray)
  assert shared["index"].shape == (4,) and shared["index"].dtype == np.int32


def test_each_process_builds_only_its_rows_of_the_global_batch():
  # Two hosts of four devices each: their rows, made separately, are the rows of the one-host batch.
  config = make_config(augment=ml_collections.ConfigDict(dict(brightness=0.2)))
  spec = spec_of(config, ["lulc"])
  source = InMemoryBenGe(20)
  transform = pipeline.make_transform(spec, train=True)

  def rows(start, stop):
    layout = sharding.BatchLayout(8, start, stop, sharding=None)
    iterator = pipeline.TrainIterator(source, np.arange(20), transform, layout, seed=spec.seed, num_views=1,
                                      num_workers=0, prefetch=0)
    return [iterator.host_batch(step) for step in range(3)]
  whole, first, second = rows(0, 8), rows(0, 4), rows(4, 8)
  for step in range(3):
    jax.tree.map(lambda a, b, c: np.testing.assert_array_equal(a, np.concatenate([b, c])),
                 whole[step], first[step], second[step])


class FailingBenGe(InMemoryBenGe):
  """Raises, naming the example, when example `bad` is read."""

  def __init__(self, num_examples, bad):
    super().__init__(num_examples)
    self.bad = bad

  def __getitem__(self, index):
    if index == self.bad:
      raise ValueError(f"patch_{index}: corrupt record")
    return super().__getitem__(index)


def test_worker_process_errors_reach_the_caller_with_their_message(mesh):
  config = make_config(num_workers=2, prefetch=4)
  source = FailingBenGe(32, bad=-1)
  iterator = train_iterator(config, source, mesh, labels=["lulc"])
  second_batch = iterator.epoch_order(0)[8:16]
  iterator.close()
  source.bad = int(second_batch[second_batch != 0][0])  # example 0 is read up front, in the caller
  # Batches 0..3 are read ahead together; the failure of batch 1 surfaces when batch 1 is asked for.
  iterator = train_iterator(config, source, mesh, labels=["lulc"])
  next(iterator)
  with pytest.raises(ValueError, match=f"patch_{source.bad}: corrupt record"):
    next(iterator)
  with pytest.raises(RuntimeError, match="closed"):
    next(iterator)


def test_errors_in_the_first_row_surface_in_the_caller_before_any_worker_starts(mesh):
  with pytest.raises(ValueError, match="image_size=32"):  # the in-memory rasters are 16 x 16
    train_iterator(make_config(num_workers=2, image_size=32), InMemoryBenGe(16), mesh, labels=["lulc"])
  assert not _grain_workers()


class UnpicklableBenGe(InMemoryBenGe):
  def __init__(self, num_examples):
    super().__init__(num_examples)
    self.lock = threading.Lock()


def test_worker_processes_need_a_picklable_source(mesh):
  with pytest.raises(TypeError, match="num_workers=0"):
    train_iterator(make_config(num_workers=2), UnpicklableBenGe(16), mesh, labels=["lulc"])
  # Without worker processes nothing needs to be pickled.
  iterator = train_iterator(make_config(num_workers=0), UnpicklableBenGe(16), mesh, labels=["lulc"])
  assert next(iterator)["index"].shape == (8,)


def _grain_workers():
  return [child for child in multiprocessing.active_children() if child.name.startswith("grain-")]


def test_close_ends_the_worker_processes(mesh):
  iterator = train_iterator(make_config(num_workers=2), InMemoryBenGe(16), mesh, labels=["lulc"])
  assert not _grain_workers()  # they start with the first batch
  next(iterator)
  workers = _grain_workers()
  assert len(workers) == 2 and all(worker.is_alive() for worker in workers)
  iterator.close()
  assert not any(worker.is_alive() for worker in workers)
  with pytest.raises(RuntimeError, match="closed"):
    next(iterator)


def test_worker_processes_reuse_returned_batch_memory_and_leave_none_behind(mesh, monkeypatch):
  segments = []  # (inode, name) of every shared-memory segment the caller receives
  adopt = pipeline._SegmentReturns.adopt

  def recording_adopt(self, batch):
    for leaf in jax.tree.leaves(batch):
      if isinstance(leaf, grain.multiprocessing.SharedMemoryArray):
        segments.append((os.stat(f"/dev/shm/{leaf.shm.name}").st_ino, leaf.shm.name))
    return adopt(self, batch)
  monkeypatch.setattr(pipeline._SegmentReturns, "adopt", recording_adopt)
  config = make_config(num_workers=2, prefetch=2, augment=ml_collections.ConfigDict(dict(noise_std=0.1)))
  source = InMemoryBenGe(40)
  iterator = train_iterator(config, source, mesh, labels=["lulc"])
  for step in range(30):
    # Reused memory holds an older batch until the worker overwrites it: every value must be the new one.
    assert_batches_equal([iterator.host_batch(step)], [to_numpy(next(iterator))])
  iterator.close()
  del iterator
  gc.collect()
  # s2 is the one array large enough for shared memory (8 x 16 x 16 x 12 float32 = 96 KiB).
  assert len(segments) == 30
  assert len({inode for inode, _ in segments}) <= 12, segments  # per batch in flight, not per batch
  assert not list(pathlib.Path("/dev/shm").glob(f"lej_{os.getpid()}_*"))


def test_without_shared_memory_files_every_batch_gets_fresh_segments(mesh, monkeypatch):
  monkeypatch.setattr(pipeline, "_segments_are_files", lambda: False)  # as on macOS
  config = make_config(num_workers=2, prefetch=2)
  iterator = train_iterator(config, InMemoryBenGe(40), mesh, labels=["lulc"])
  for step in range(6):
    assert_batches_equal([iterator.host_batch(step)], [to_numpy(next(iterator))])
  iterator.close()
  assert not list(pathlib.Path("/dev/shm").glob(f"lej_{os.getpid()}_*_free"))  # nothing was returned


def test_a_killed_worker_process_is_reported_not_waited_for(mesh):
  iterator = train_iterator(make_config(num_workers=2), InMemoryBenGe(16), mesh, labels=["lulc"])
  next(iterator)
  for worker in _grain_workers():
    worker.kill()
  with pytest.raises(RuntimeError, match="terminated unexpectedly with exit code"):
    for _ in range(10):  # batches filled before the kill may still come out first
      next(iterator)
