"""Tests of labeleff_jax.models: reference parameter counts, layer semantics, fusion, heads, modes, dtypes."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from labeleff_jax.data import constants
from labeleff_jax import cpu
from labeleff_jax.models import count_params, create_model, fusion, resampling, torch_style
from labeleff_jax.models.resnet import resnet18, resnet50
from labeleff_jax.models.supervised import uncertainty_weighted_sum
from labeleff_jax.models.unet import UNet

# ---------------------------------------------------------------------------------------------------------
# Config helpers (independent of configs/, which describe experiments rather than test fixtures).
# ---------------------------------------------------------------------------------------------------------


def task(name, kind, num_classes=None, head=None, weight=1.0, label=None, **extra):
  return ml_collections.ConfigDict(dict(name=name, kind=kind, label=label or name, num_classes=num_classes,
                                        weight=weight, head=head, **extra))


CLIMATE = dict(name="climatezone", kind="classification", num_classes=12, head="reference")


def config(name="unet", modalities=("s2",), tasks=(CLIMATE,), image_size=120, compute_dtype="float32",
           **model):
  return ml_collections.ConfigDict({
      "data": {"modalities": list(modalities), "image_size": image_size},
      "model": {"name": name, **model},
      "tasks": [task(**t) for t in tasks],
      "train": {"compute_dtype": compute_dtype},
  })


MULTITASK = (dict(name="lulc", kind="segmentation", num_classes=11, head="conv1x1"), CLIMATE,
             dict(name="season", kind="regression", head="reference"))


def abstract_count(cfg):
  model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model))
  assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves), "nothing may be allocated"
  return count_params(model)


def images(batch=2, size=18, seed=0, modalities=("s2", "s1", "dem", "season", "era5", "climatezone")):
  rng = np.random.default_rng(seed)
  out = {}
  for name in modalities:
    channels = constants.MODALITIES[name]
    shape = (batch, size, size, channels) if name in constants.IMAGE_MODALITIES else (batch, channels)
    out[name] = rng.random(shape, dtype=np.float32)
  return out


def tiny(cfg_kwargs, seed=0):
  return create_model(config(**cfg_kwargs), rngs=nnx.Rngs(seed))


def abstract(cfg_kwargs):
  """The model's structure without initialising anything (XLA compiles of random inits are slow on CPU)."""
  return nnx.eval_shape(lambda: tiny(cfg_kwargs))


# Forward passes run eagerly with one batch size, width and image size per backbone, so the ops XLA compiles
# for one test are reused by the next (compiling dominates these tests on a 2-core CPU). The U-Net size is
# odd on purpose: 18 -> 9 -> 4 -> 2 -> 1, and the 8-pixel upsample of the 4-pixel level is padded to 9.
UNET_SIZE = 18
RESNET_SIZE = 32


# ---------------------------------------------------------------------------------------------------------
# Exact reference parameter counts (docs/reference.md), from shapes only.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, expected", [
    (config(modalities=["s2"]), 17_445_389),
    (config(modalities=["s2", "s1"], fusion="early"), 17_446_541),
    # One more input channel (the season plane) adds one 3x3 slice per first-conv filter: 64 * 9 weights.
    (config(modalities=["s2", "s1", "season"], fusion="early"), 17_446_541 + 64 * 9),
    (config(modalities=["s1", "s2"], fusion="late"), 34_712_205),
    (config(modalities=["s2"], tasks=MULTITASK), 17_460_570),
    (config(name="dual_encoder", modalities=[]), 22_772_096),
], ids=["supervised", "early_fusion", "early_fusion_season", "late_fusion", "multitask", "dual_encoder"])
def test_reference_parameter_counts(cfg, expected):
  assert abstract_count(cfg) == expected


def test_resnet_counts_match_torchvision():
  # torchvision's resnet18 / resnet50 (3 input channels, 1000-way fc) have 11,689,512 / 25,557,032 params.
  fc18, fc50 = 512 * 1000 + 1000, 2048 * 1000 + 1000
  r18 = nnx.eval_shape(lambda: resnet18(3, rngs=nnx.Rngs(0)))
  r50 = nnx.eval_shape(lambda: resnet50(3, rngs=nnx.Rngs(0)))
  assert count_params(r18) + fc18 == 11_689_512
  assert count_params(r50) + fc50 == 25_557_032
  assert (r18.out_channels, r50.out_channels) == (512, 2048)


def test_count_params_excludes_batch_stats_and_counts_shared_modules_once():
  cfg = config(name="dual_encoder", modalities=[], width=8, projector=(32, 16))
  shared = abstract_count(cfg)
  cfg.model.shared_projector = False
  separate = abstract_count(cfg)
  assert separate - shared == (64 * 32 + 32) + (32 * 16 + 16)  # exactly one more projector
  model = nnx.eval_shape(lambda: resnet18(2, width=8, rngs=nnx.Rngs(0)))
  every_variable = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model)))
  batch_stats = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  assert batch_stats > 0 and count_params(model) == every_variable - batch_stats


# ---------------------------------------------------------------------------------------------------------
# Layer semantics against independent numpy computations.
# ---------------------------------------------------------------------------------------------------------
def numpy_upsample_align_corners(x, out_h, out_w):
  """Per-pixel bilinear sampling at i * (in - 1) / (out - 1), written the textbook way."""
  batch, in_h, in_w, channels = x.shape
  out = np.zeros((batch, out_h, out_w, channels), np.float64)
  for i in range(out_h):
    y = i * (in_h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = int(np.floor(y)); y1 = min(y0 + 1, in_h - 1); wy = y - y0
    for j in range(out_w):
      xx = j * (in_w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = int(np.floor(xx)); x1 = min(x0 + 1, in_w - 1); wx = xx - x0
      out[:, i, j] = ((1 - wy) * (1 - wx) * x[:, y0, x0] + (1 - wy) * wx * x[:, y0, x1]
                      + wy * (1 - wx) * x[:, y1, x0] + wy * wx * x[:, y1, x1])
  return out


@pytest.mark.parametrize("height, width", [(7, 7), (3, 5), (1, 4), (15, 2)])
def test_upsample_matches_align_corners_formula(height, width):
  x = np.random.default_rng(height * 10 + width).normal(size=(2, height, width, 3)).astype(np.float32)
  got = np.asarray(resampling.upsample_bilinear_align_corners(jnp.asarray(x), 2))
  np.testing.assert_allclose(got, numpy_upsample_align_corners(x, 2 * height, 2 * width), atol=1e-5)
  # The corners coincide with the input's (what align_corners means), unlike half-pixel resizing.
  np.testing.assert_allclose(got[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]], atol=1e-6)


@pytest.mark.parametrize("draw", ["plain", "block"])
def test_initialisers_follow_torch(draw):
  source = torch_style.plain_draw if draw == "plain" else cpu.block_draw
  with torch_style.drawing_with(source):
    conv = torch_style.conv(128, 128, 3, rngs=nnx.Rngs(0))  # 147,456 weights: three random blocks
    block_1 = resnet18(3, width=64, rngs=nnx.Rngs(1)).blocks[0]
  weights = np.asarray(conv.kernel[...]).ravel()
  bound = 1 / math.sqrt(128 * 9)  # torch: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
  assert np.abs(weights).max() <= bound and weights.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
  assert np.abs(np.asarray(conv.bias[...])).max() <= bound and np.asarray(conv.bias[...]).std() > 0
  block = cpu.initializers.BLOCK
  assert not np.allclose(weights[:1000], weights[block:block + 1000])  # no repeated samples
  resnet_weights = np.asarray(block_1.conv1.kernel[...])  # kaiming_normal, fan_out = 64 * 9
  assert resnet_weights.mean() == pytest.approx(0, abs=0.005)
  assert resnet_weights.std() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)


def test_max_pool_drops_odd_edge_like_torch():
  x = np.random.default_rng(1).normal(size=(2, 7, 5, 3)).astype(np.float32)
  expected = np.array([[x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(1, 2)) for j in range(2)]
                       for i in range(3)]).transpose(2, 0, 1, 3)  # [i, j, B, C] -> [B, i, j, C]
  np.testing.assert_array_equal(np.asarray(resampling.max_pool_2x2(jnp.asarray(x))), expected)


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window_like_torch():
  rng = np.random.default_rng(3)
  x = rng.integers(0, 3, size=(2, 7, 6, 3)).astype(np.float32)  # small integers: many tied maxima
  cotangent = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
  _, vjp = jax.vjp(resampling.max_pool_2x2, jnp.asarray(x))
  (grad,) = vjp(jnp.asarray(cotangent))
  expected = np.zeros_like(x)  # torch: all of a window's gradient to its first maximum, row-major
  for b, i, j, c in np.ndindex(*cotangent.shape):
    window = x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
    di, dj = np.unravel_index(np.argmax(window), (2, 2))
    expected[b, 2 * i + di, 2 * j + dj, c] = cotangent[b, i, j, c]
  np.testing.assert_array_equal(np.asarray(grad), expected)  # the odd last row gets nothing


def test_max_pool_gradient_matches_reduce_window_on_distinct_values():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 10, 4)).astype(np.float32))
  loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(x)))  # noqa: E731
  ours = jax.grad(loss(resampling.max_pool_2x2))(x)
  xla = jax.grad(loss(lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2))))(x)
  np.testing.assert_allclose(ours, xla, rtol=1e-6, atol=1e-6)


def test_resnet_stem_pool_and_feature_size():
  x = np.random.default_rng(2).normal(size=(1, 9, 9, 2)).astype(np.float32)
  pooled = np.asarray(resampling.max_pool_3x3_stride2(jnp.asarray(x)))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  expected = np.array([[padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2)) for j in range(5)]
                       for i in range(5)]).transpose(2, 0, 1, 3)
  np.testing.assert_array_equal(pooled, expected)
  net = nnx.eval_shape(lambda: resnet18(2, width=4, rngs=nnx.Rngs(0)))
  for size in (32, 33, 45, 120):
    out = nnx.eval_shape(lambda m, x: m(x), net, jax.ShapeDtypeStruct((1, size, size, 2), jnp.float32))
    assert out.shape[1] == net.feature_size(size) == math.ceil(size / 32)


def test_unet_keeps_resolution_on_odd_sizes():
  # 30 -> 15 -> 7 -> 3 -> 1 and 120 -> ... -> 7: every decoder level pads up to its skip connection.
  net = nnx.eval_shape(lambda: UNet(3, width=4, rngs=nnx.Rngs(0)))
  for size in (30, 120, 121):
    out = nnx.eval_shape(lambda m, x: m(x), net, jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    assert out.shape == (2, size, size, 4) and UNet.feature_size(size) == size


# ---------------------------------------------------------------------------------------------------------
# Heads and multitask.
# ---------------------------------------------------------------------------------------------------------
EVERY_HEAD = (
    dict(name="cz_ref", kind="classification", num_classes=12, head="reference"),
    dict(name="cz_pool", kind="classification", num_classes=5, head="pool"),
    dict(name="lulc_multihot", kind="multilabel", num_classes=11, head="pool"),
    dict(name="lulc", kind="segmentation", num_classes=11),
    dict(name="season", kind="regression", head="reference"),
    dict(name="weather", kind="regression", num_classes=3, head="pool"),
)


@pytest.mark.parametrize("backbone, size, width", [("unet", UNET_SIZE, 4), ("resnet18", RESNET_SIZE, 4)])
def test_every_head_kind_output_shape_and_dtype(backbone, size, width):
  model = tiny(dict(name=backbone, modalities=["s2"], tasks=EVERY_HEAD, image_size=size, width=width))
  model.eval()
  out = model(images(2, size, modalities=["s2"]))
  expected = {"cz_ref": (2, 12), "cz_pool": (2, 5), "lulc_multihot": (2, 11), "lulc": (2, size, size, 11),
              "season": (2,), "weather": (2, 3)}
  assert {k: v.shape for k, v in out.items()} == expected
  assert all(v.dtype == np.dtype("float32") for v in out.values())
  channels = width if backbone == "unet" else 8 * width
  assert model.features(images(2, size, modalities=["s2"])).shape == (2, channels)


def test_reference_head_dropout_rates():
  model = abstract(dict(modalities=["s2"], tasks=MULTITASK, image_size=UNET_SIZE, width=4, dropout=0.3))
  assert model.heads["climatezone"].head.dropout.rate == 0.3
  assert model.heads["season"].head.dropout.rate == 0.1  # the reference's regression head


def test_fixed_and_uncertainty_loss_weighting_follow_kendall():
  tasks = [dict(MULTITASK[0], weight=2.0), dict(CLIMATE, weight=0.5), dict(MULTITASK[2], weight=3.0)]
  losses = {"lulc": 1.3, "climatezone": 2.1, "season": 0.4}
  fixed = abstract(dict(modalities=["s2"], tasks=tasks, image_size=UNET_SIZE, width=4))
  assert float(fixed.combine_losses(losses)) == pytest.approx(2.0 * 1.3 + 0.5 * 2.1 + 3.0 * 0.4, rel=1e-6)
  model = abstract(dict(modalities=["s2"], tasks=tasks, image_size=UNET_SIZE, width=4,
                        task_weighting="uncertainty"))
  assert count_params(fixed) + 3 == count_params(model)
  assert model.task_log_vars.shape == (3,)
  s = np.array([0.3, -0.7, 1.1])
  model.task_log_vars = nnx.Param(jnp.asarray(s, jnp.float32))  # only this needs real values
  # 1/sigma^2 L + log sigma for classification-type losses, 1/(2 sigma^2) L + log sigma for regression.
  expected = (np.exp(-s[0]) * 1.3 + s[0] / 2 + np.exp(-s[1]) * 2.1 + s[1] / 2
              + 0.5 * np.exp(-s[2]) * 0.4 + s[2] / 2)
  assert float(model.combine_losses(losses)) == pytest.approx(expected, rel=1e-6)
  # d/ds_i = -c_i exp(-s_i) L_i + 1/2: the learned weights trade a task's loss against its uncertainty.
  grads = jax.grad(uncertainty_weighted_sum, argnums=1)(
      jnp.asarray([1.3, 2.1, 0.4]), jnp.asarray(s, jnp.float32), model.task_kinds)
  expected_grad = [-np.exp(-s[0]) * 1.3 + 0.5, -np.exp(-s[1]) * 2.1 + 0.5, -0.5 * np.exp(-s[2]) * 0.4 + 0.5]
  np.testing.assert_allclose(np.asarray(grads), expected_grad, rtol=1e-5)
  with pytest.raises(KeyError, match="season"):
    model.combine_losses({"lulc": 1.0, "climatezone": 1.0})


# ---------------------------------------------------------------------------------------------------------
# Fusion.
# ---------------------------------------------------------------------------------------------------------
def test_early_fusion_stacks_channels_in_order_with_blown_up_vectors():
  batch = images(2, 8, modalities=["s2", "s1", "season", "era5"])
  stacked = np.asarray(fusion.stack_channels(batch, ["s2", "s1", "season", "era5"], jnp.float32, 8))
  assert stacked.shape == (2, 8, 8, 12 + 2 + 1 + 9)
  np.testing.assert_array_equal(stacked[..., :12], batch["s2"])
  np.testing.assert_array_equal(stacked[..., 12:14], batch["s1"])
  np.testing.assert_array_equal(stacked[..., 14], np.tile(batch["season"][:, :, None], (1, 8, 8)))
  np.testing.assert_array_equal(stacked[:, 3, 5, 15:], batch["era5"])
  model = tiny(dict(modalities=["s2", "s1", "season", "era5"], fusion="early", image_size=UNET_SIZE, width=4))
  (net,) = model.backbone.encoders.values()
  assert net.inc.conv1.kernel.shape == (3, 3, 24, 4)
  assert model(images(2, UNET_SIZE))["climatezone"].shape == (2, 12)


def test_land_cover_class_map_input_is_one_hot_in_the_model():
  class_map = np.array([[[0, 10], [255, 3]]], np.uint8)  # 255: no data
  stacked = np.asarray(fusion.stack_channels({"lulc": class_map}, ["lulc"], jnp.float32, 2))
  expected = np.zeros((1, 2, 2, 11), np.float32)
  expected[0, 0, 0, 0] = expected[0, 0, 1, 10] = expected[0, 1, 1, 3] = 1.0
  np.testing.assert_array_equal(stacked, expected)
  # A one-hot given as such is taken as it is.
  np.testing.assert_array_equal(fusion.stack_channels({"lulc": expected}, ["lulc"], jnp.float32, 2), expected)


def test_late_fusion_of_images_and_vectors():
  modalities = ["s2", "s1", "dem", "era5"]
  tasks = (CLIMATE, dict(name="pooled", kind="classification", num_classes=4, head="pool"))
  model = tiny(dict(modalities=modalities, fusion="late", image_size=UNET_SIZE, width=4, mlp_features=(6, 5),
                    tasks=tasks))
  batch = images(2, UNET_SIZE)
  out = model(batch)
  assert out["climatezone"].shape == (2, 12) and out["pooled"].shape == (2, 4)
  assert model.backbone.feature_dims == (4, 4, 4, 5)
  assert model.heads["climatezone"].head.reduce.kernel.shape == (1, 1, 17, 1)
  # Pooling the blown-up planes gives back the vector encoding itself (= concatenation after pooling).
  features = np.asarray(model.features(batch))
  encoding = np.asarray(model.backbone.encoders["era5"](jnp.asarray(batch["era5"])))
  np.testing.assert_allclose(features[:, 12:], encoding, rtol=1e-6)
  # Each image branch only sees its own modality.
  s1_features = np.asarray(model.backbone.encode(batch, "s1").mean(axis=(1, 2)))
  np.testing.assert_allclose(features[:, 4:8], s1_features, rtol=1e-5, atol=1e-6)


def test_shared_backbone_late_fusion(monkeypatch):
  # No two real image modalities have equal channel counts, so a second 2-channel modality is made up.
  monkeypatch.setitem(constants.IMAGE_MODALITIES, "s1_copy", 2)
  monkeypatch.setitem(constants.MODALITIES, "s1_copy", 2)
  kwargs = dict(modalities=["s1", "s1_copy", "season"], fusion="late", image_size=UNET_SIZE, width=4)
  separate = abstract(kwargs)
  shared = tiny(dict(kwargs, shared_backbone=True))
  unet_params = count_params(nnx.eval_shape(lambda: UNet(2, width=4, rngs=nnx.Rngs(0))))
  assert count_params(separate) - count_params(shared) == unet_params
  batch = images(2, UNET_SIZE, modalities=["s1", "season"])
  batch["s1_copy"] = batch["s1"]
  shared.eval()
  features = np.asarray(shared.features(batch))
  np.testing.assert_allclose(features[:, :4], features[:, 4:8], rtol=1e-6)  # same weights, same input
  with pytest.raises(ValueError, match="shared_backbone.*equal channel counts"):
    abstract(dict(modalities=["s2", "s1"], fusion="late", image_size=UNET_SIZE, width=4, shared_backbone=True))


# ---------------------------------------------------------------------------------------------------------
# Train / eval modes and mixed precision.
# ---------------------------------------------------------------------------------------------------------
def test_dropout_and_batchnorm_follow_train_and_eval():
  model = tiny(dict(modalities=["s2"], image_size=UNET_SIZE, width=4, dropout=0.5))
  batch = images(2, UNET_SIZE, modalities=["s2"])
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

  model.train()
  first, second = model(batch)["climatezone"], model(batch)["climatezone"]
  assert not np.allclose(first, second)  # fresh dropout masks
  stats_after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  mean_before = stats_before["backbone"]["encoders"]["s2"]["inc"]["bn1"]["mean"][...]
  mean_after = stats_after["backbone"]["encoders"]["s2"]["inc"]["bn1"]["mean"][...]
  conv_out = np.asarray(model.backbone.encoders["s2"].inc.conv1(jnp.asarray(batch["s2"])))
  # Two train-mode calls: running mean = 0.9 * (0.9 * 0 + 0.1 * m) + 0.1 * m (torch momentum 0.1).
  np.testing.assert_allclose(mean_after, 0.19 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  assert not np.allclose(mean_before, mean_after)

  model.eval()
  third, fourth = model(batch)["climatezone"], model(batch)["climatezone"]
  np.testing.assert_array_equal(third, fourth)
  stats_eval = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, stats_after, stats_eval)
  # In eval mode an example's output does not depend on the rest of the batch (here: its order).
  swapped = model({"s2": batch["s2"][::-1]})["climatezone"]
  np.testing.assert_allclose(swapped, third[::-1], rtol=1e-4, atol=1e-5)
  model.train()
  swapped_train = model({"s2": batch["s2"][::-1]})["climatezone"]
  assert not np.allclose(swapped_train, first[::-1], atol=1e-3)  # dropout masks are not tied to examples


def test_bfloat16_compute_keeps_float32_params_stats_and_outputs():
  kwargs = dict(modalities=["s2"], image_size=UNET_SIZE, width=4, tasks=EVERY_HEAD)
  model16 = tiny(dict(kwargs, compute_dtype="bfloat16"))
  model32 = tiny(kwargs)
  float32 = np.dtype("float32")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model16, (nnx.Param, nnx.BatchStat)))} == {float32}
  batch = images(2, UNET_SIZE, modalities=["s2"])
  model16.eval(); model32.eval()
  out16, out32 = nnx.jit(lambda m, x: m(x))(model16, batch), model32(batch)
  assert all(v.dtype == float32 for v in out16.values())
  # Same weights (same seed), so only rounding differs. bfloat16 keeps 8 significant bits (a relative
  # rounding step of 2**-8); a few layers of it add up to a few steps of each head's output scale: measured
  # 0.4-1.4 steps, and 3.4 for the season head, whose small output (~0.03) is a difference of larger terms.
  for name in out32:
    scale = np.max(np.abs(out32[name]))
    np.testing.assert_allclose(out16[name], out32[name], rtol=0, atol=6 * 2.0 ** -8 * scale, err_msg=name)
  assert any(not np.allclose(out16[name], out32[name], atol=1e-6) for name in out32)
  jaxpr = str(jax.make_jaxpr(lambda x: model16.backbone(x))(batch))
  assert "conv_general_dilated" in jaxpr and "bf16[2,18,18,4]" in jaxpr

  def train_forward(model, batch):
    model(batch)
    return nnx.state(model, nnx.BatchStat)

  model16.train()
  updated_stats = nnx.eval_shape(train_forward, model16, batch)
  assert {x.dtype for x in jax.tree.leaves(updated_stats)} == {float32}


# ---------------------------------------------------------------------------------------------------------
# Contrastive encoders.
# ---------------------------------------------------------------------------------------------------------
def test_dual_encoder_outputs_features_and_options():
  cfg = config(name="dual_encoder", modalities=[], width=4, projector=(16, 8), image_size=RESNET_SIZE)
  model = create_model(cfg, rngs=nnx.Rngs(0))
  batch = images(2, RESNET_SIZE, modalities=["s2", "s1"])
  out = model(batch)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {"z_a": ((2, 8), np.dtype("float32")),
                                                            "z_b": ((2, 8), np.dtype("float32"))}
  assert model.features(batch).shape == (2, 64)
  # Each tower sees only its modality.
  changed = dict(batch, s1=batch["s1"] + 1.0)
  model.eval()
  np.testing.assert_allclose(model(changed)["z_a"], model(batch)["z_a"], rtol=1e-6)
  assert not np.allclose(model(changed)["z_b"], model(batch)["z_b"])

  cfg.model.update(backbone="resnet50", modality_b="era5", shared_projector=False, mlp_features=(8,))
  other = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))
  out = nnx.eval_shape(lambda m, x: m(x), other, images(2, RESNET_SIZE, modalities=["s2", "era5"]))
  assert out["z_a"].shape == out["z_b"].shape == (2, 8)
  assert other.backbone.feature_dims == (4 * 8 * 4, 8)
  with pytest.raises(ValueError, match="shared_projector"):
    create_model(config(name="dual_encoder", modalities=[], width=4, modality_b="era5"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must differ"):
    create_model(config(name="dual_encoder", modalities=[], modality_b="s2"), rngs=nnx.Rngs(0))


def test_simclr_encoder_and_transfer_paths():
  cfg = config(name="simclr", modalities=["s2"], width=4, projector=(16, 8), image_size=RESNET_SIZE,
               backbone="resnet18")
  model = create_model(cfg, rngs=nnx.Rngs(0))
  batch = images(2, RESNET_SIZE, modalities=["s2"])
  assert model(batch)["z"].shape == (2, 8) and model.features(batch).shape == (2, 32)
  # Contrastive and supervised models keep the S2 encoder under the same path, with the same shapes.
  supervised = abstract(dict(name="resnet18", modalities=["s2"], width=4, image_size=RESNET_SIZE,
                             tasks=[dict(CLIMATE, head="pool")]))
  dual = abstract(dict(name="dual_encoder", modalities=[], width=4, image_size=RESNET_SIZE))
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nnx.state(m, nnx.Param)["backbone"]["encoders"]["s2"])
  assert shapes(model) == shapes(supervised) == shapes(dual)


# ---------------------------------------------------------------------------------------------------------
# Errors name the key at fault and the allowed values.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (dict(name="vgg"), r"config.model.name.*'vgg'.*allowed.*resnet18"),
    (dict(fusion="middle"), r"config.model.fusion.*'middle'.*early"),
    (dict(modalities=["s2", "hyperspectral"]), r"config.data.modalities.*'hyperspectral' is not a ben-ge modality"),
    (dict(tasks=[dict(CLIMATE, head="mlp")]), r"task head.*'mlp'.*allowed.*pool"),
    (dict(tasks=[dict(CLIMATE, head="conv1x1")]), r"config.tasks\[0\].head for a classification"),
    (dict(tasks=[dict(CLIMATE, kind="ranking")]), r"config.tasks\[0\].kind.*'ranking'.*regression"),
    (dict(tasks=[dict(CLIMATE, num_classes=None)]), r"config.tasks\[0\].num_classes"),
    (dict(task_weighting="magic"), r"config.model.task_weighting.*fixed"),
    (dict(compute_dtype="float16"), r"config.train.compute_dtype.*bfloat16"),
    (dict(conv_impl="cudnn"), r"config.model.conv_impl='cudnn'.*cpu_fast"),
    (dict(shared_backbone=True), r"late fusion only"),
])
def test_bad_config_raises_clear_error(change, match):
  kwargs = dict(modalities=["s2"], image_size=UNET_SIZE, width=4)
  kwargs.update(change)
  with pytest.raises(ValueError, match=match):
    nnx.eval_shape(lambda: tiny(kwargs))


def test_bad_inputs_raise_clear_errors():
  model = abstract(dict(modalities=["s2", "s1"], image_size=UNET_SIZE, width=4))
  with pytest.raises(KeyError, match="'s1'"):
    model(images(2, UNET_SIZE, modalities=["s2"]))
  bad = images(2, UNET_SIZE, modalities=["s2", "s1"])
  bad["s1"] = bad["s1"][..., :1]
  with pytest.raises(ValueError, match=r"inputs\['s1'\] must be \[B, H, W, 2\]"):
    model(bad)


# ---------------------------------------------------------------------------------------------------------
# Stock models (conv_impl='xla') are ordinary JAX functions: forward-mode autodiff works through them.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_kwargs, size", [
    (dict(name="unet", modalities=["s2", "s1", "season"], fusion="early", tasks=MULTITASK), UNET_SIZE),
    (dict(name="resnet18", modalities=["s2", "era5"], fusion="late",
          tasks=[dict(CLIMATE, head="pool")]), RESNET_SIZE),
    (dict(name="unet", modalities=["s1", "s2"], fusion="late"), UNET_SIZE),
    (dict(name="dual_encoder", modalities=[]), RESNET_SIZE),
], ids=["unet_early_multitask", "resnet_late", "unet_late", "dual_encoder"])
def test_jvp_through_stock_models_matches_reverse_mode(cfg_kwargs, size):
  """d/de f(p + e t, x + e u), by jax.jvp, against <grad, (t, u)> of the same scalar by reverse mode."""
  model = tiny(dict(cfg_kwargs, image_size=size, width=4, conv_impl="xla", projector=(8, 4), mlp_features=(8,)))
  model.eval()  # deterministic: running BatchNorm statistics, no dropout
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  modalities = cfg_kwargs["modalities"] or ["s2", "s1"]
  inputs = {k: jnp.asarray(v) for k, v in images(2, size, modalities=modalities).items()}
  rng = np.random.default_rng(7)
  random_like = lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype)  # noqa: E731

  def scalar(params, inputs):
    outputs = nnx.merge(graphdef, params, rest)(inputs)
    return sum(jnp.sum(jnp.sin(out)) for out in jax.tree.leaves(outputs))

  tangents = (jax.tree.map(random_like, params), jax.tree.map(random_like, inputs))
  value, derivative = jax.jvp(scalar, (params, inputs), tangents)
  grads = jax.grad(scalar, argnums=(0, 1))(params, inputs)
  expected = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangents)))
  assert np.isfinite(value)
  np.testing.assert_allclose(derivative, expected, rtol=1e-4, atol=1e-4)
