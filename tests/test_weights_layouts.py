"""Published ResNet checkpoints onto our models (weights.layouts, weights.convert), against torch's numbers.

The fixtures (tests/fixtures/pth, written by scripts/torch_fixtures/resnet_cases.py) hold torch's pooled
features for a fixed input; loading a file and running our ResNet on the same input must give the same
features within 1e-5 relative (max abs difference / max abs value). No torch here.
"""

import functools
import pathlib

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import contrastive
from configs import finetune
from labeleff_jax import models
from labeleff_jax import transfer
from labeleff_jax.data import constants
from labeleff_jax.models import resnet
from labeleff_jax.weights import convert
from labeleff_jax.weights import layouts
from labeleff_jax.weights.pth import read_pth

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pth"
TOLERANCE = 1e-5
B10 = 10  # B10's channel among the fixtures' 13 bands
LAYOUT_OF = {"resnet18_w8_s2": "torchvision", "resnet50_w4_s2": "torchvision", "moco_resnet18_w2": "moco",
             "dino_resnet18_w2": "dino", "dual_resnet18_w2": "dual_resnet"}
# name -> (builder, width) of the single-encoder fixtures
SINGLE = {"resnet18_w8_s2": (resnet.resnet18, 8), "resnet50_w4_s2": (resnet.resnet50, 4),
          "moco_resnet18_w2": (resnet.resnet18, 2), "dino_resnet18_w2": (resnet.resnet18, 2)}


@functools.cache
def _fixture(name: str) -> tuple[dict, dict]:
  """(read_pth state, npz arrays as float32); callers must not change them."""
  with np.load(FIXTURES / f"{name}.npz") as npz:
    arrays = {key: npz[key].astype(np.float32) for key in npz.files}
  return read_pth(FIXTURES / f"{name}.pth"), arrays


def _abstract(factory) -> nnx.Module:
  """factory()'s model with zero arrays, built abstractly: initialising a few hundred arrays eagerly takes
  seconds, and the tests load the arrays that matter from a file. RNG state stays abstract (unusable)."""
  model = nnx.eval_shape(factory)
  state = nnx.state(model, nnx.Not(nnx.RngState))
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.to_pure_dict(state)))
  nnx.update(model, state)
  return model


def _bare(build, in_channels: int, width: int) -> nnx.Module:
  return _abstract(lambda: build(in_channels, width=width, rngs=nnx.Rngs(0)))


def _state(model: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState)))


def _int_keys(tree):
  if not isinstance(tree, dict):
    return tree
  return {(int(k) if k.isdigit() else k): _int_keys(v) for k, v in tree.items()}


def _load(model: nnx.Module, source: dict) -> dict:
  """Loads `source` with the identity mapping, as config.transfer.load = ['='] would; returns the report."""
  state = nnx.state(model, nnx.Not(nnx.RngState))
  new_flat, report = transfer.apply_mapping(nnx.to_pure_dict(state), source, [("", "")])
  nnx.replace_by_pure_dict(state, _int_keys(traverse_util.unflatten_dict(new_flat, sep="/")))
  nnx.update(model, state)
  model.eval()
  return report


@nnx.jit
def _pooled_nhwc(model, x):
  return model(x).mean(axis=(1, 2))


def _pooled(model, x_nchw: np.ndarray) -> np.ndarray:
  """Globally average-pooled features of our ResNet for torch's NCHW input."""
  return np.asarray(_pooled_nhwc(model, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _without_b10(x: np.ndarray) -> np.ndarray:
  return np.delete(x, B10, axis=1)


def _encoder(name: str, in_channels: int, **kwargs):
  """Our ResNet for a single-encoder fixture, its weights loaded at the top level (prefix '')."""
  build, width = SINGLE[name]
  model = _bare(build, in_channels, width)
  source, info = convert.build_source(_fixture(name)[0], _state(model), encoder_prefixes={"encoder": ""},
                                      **kwargs)
  report = _load(model, source)
  assert not report["fresh"], report["fresh"][:5]  # every array of the model came from the file
  return model, info


# ---------------------------------------------------------------------------------------------------------
# Detection.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LAYOUT_OF))
def test_each_fixture_is_detected_as_its_layout(name):
  state, _ = _fixture(name)
  assert layouts.detect_layout(state) == LAYOUT_OF[name]
  assert layouts.extract(state).layout == LAYOUT_OF[name]
  assert layouts.extract(state, source=LAYOUT_OF[name]).layout == LAYOUT_OF[name]


@pytest.mark.parametrize("prefix, layout, roles", [
    ("state_dict.", "torchvision", {"encoder": "state_dict."}),
    ("model.", "torchvision", {"encoder": "model."}),
    ("module.", "torchvision", {"encoder": "module."}),
    ("teacher.backbone.", "dino", {"encoder": "teacher.backbone."}),
    ("module.backbone.", "dino", {"encoder": "module.backbone."}),
    ("encoder_q.", "moco", {"encoder": "encoder_q."}),
    ("state_dict.encoder_q.", "moco", {"encoder": "state_dict.encoder_q."}),
])
def test_wrapper_prefixes_are_recognised(prefix, layout, roles):
  state = {prefix + key: value for key, value in _fixture("resnet18_w8_s2")[0].items()}
  extracted = layouts.extract(state)
  assert (extracted.layout, extracted.prefixes) == (layout, roles)
  assert len(extracted.roles["encoder"]) == (len(state) - 2 if layout == "moco" else len(state))
  if layout == "moco":  # encoder_q's fc is MoCo's projection head, not a classifier
    assert extracted.ignored == [prefix + "fc.weight", prefix + "fc.bias"]


def test_dual_layout_under_other_wrappers_and_with_a_shared_head():
  state, _ = _fixture("dual_resnet18_w2")
  bare = {key[len("state_dict."):]: value for key, value in state.items()}
  shared = {("fc." + key[len("backbone1.fc."):] if key.startswith("backbone1.fc.") else key): value
            for key, value in bare.items() if not key.startswith("backbone2.fc.")}
  for wrapped, heads in (({"module." + k: v for k, v in bare.items()}, {"projector_s1", "projector_s2"}),
                         (shared, {"projector"})):
    extracted = layouts.extract(wrapped)
    assert extracted.layout == "dual_resnet"
    assert set(extracted.roles) == {"s1", "s2"} | heads
    assert not extracted.ignored
    assert all(set(extracted.roles[head]) == {"0.weight", "0.bias", "2.weight", "2.bias"} for head in heads)
    assert not any(key.startswith("fc.") for key in extracted.roles["s1"])


def test_forcing_a_wrong_layout_or_an_unknown_name_is_a_clear_error():
  moco, _ = _fixture("moco_resnet18_w2")
  with pytest.raises(layouts.LayoutError, match=r"source='torchvision'.*detection finds 'moco'"):
    layouts.extract(moco, source="torchvision")
  with pytest.raises(layouts.LayoutError, match=r"source='dual_resnet'.*backbone1"):
    layouts.extract(_fixture("resnet18_w8_s2")[0], source="dual_resnet")
  with pytest.raises(layouts.LayoutError, match=r"unknown checkpoint layout 'timm'.*torchvision, moco, dino, "
                                                r"dual_resnet"):
    layouts.extract(moco, source="timm")
  odd = {"net.stem.weight": np.zeros((8, 3, 7, 7)), "net.blocks.0.weight": np.zeros(8)}
  with pytest.raises(layouts.LayoutError, match=r"'net.stem.weight'.*torchvision.*config.transfer.source"):
    layouts.detect_layout(odd)
  assert layouts.extract(moco, source="auto").layout == "moco"


# ---------------------------------------------------------------------------------------------------------
# Features against torch.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18_w8_s2", "resnet50_w4_s2"])
def test_thirteen_band_torchvision_weights_give_torchs_features(name):
  _, expected = _fixture(name)
  model, info = _encoder(name, 13, data_bands=convert.S2_13_BANDS)
  assert info["layout"] == "torchvision" and info["bands"] == []
  assert (info["architecture"], info["width"]) == (name.split("_")[0], SINGLE[name][1])
  assert info["skipped"] == ["fc.weight", "fc.bias"]
  assert _relative(_pooled(model, expected["input"]), expected["features"]) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_twelve_band_model_without_b10_matches_torch_on_a_zero_b10(name):
  _, expected = _fixture(name)
  model, info = _encoder(name, 12)  # data bands default to ben-ge's S2 order
  assert info["bands"] == ["dropped B10 from 13-band weights"]
  ours = _pooled(model, _without_b10(expected["input"]))
  assert _relative(ours, expected["features_b10_zero"]) <= TOLERANCE
  # The zeroed band matters: the 13-band features are not what the 12-band model gives.
  assert _relative(ours, expected["features"]) > 1e-3


def test_moco_loads_encoder_q_and_reports_encoder_k_queue_and_head():
  state, _ = _fixture("moco_resnet18_w2")
  _, info = _encoder("moco_resnet18_w2", 12)
  ignored = info["ignored"]
  assert sum(key.startswith("state_dict.module.encoder_k.") for key in ignored) == 124
  assert {"state_dict.module.queue", "state_dict.module.queue_ptr"} <= set(ignored)
  head = {f"state_dict.module.encoder_q.fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
  assert head <= set(ignored)
  assert not any(key.startswith("state_dict.module.encoder_q.") and ".fc." not in key for key in ignored)
  assert "state_dict.module.encoder_k.* (124 keys)" in info["ignored_summary"]
  # Nothing of the file disappears unreported: loaded + ignored + num_batches_tracked counters.
  assert len(ignored) + 100 + 20 == len(state)


def test_dino_loads_the_teacher_and_ignores_student_and_heads():
  _, info = _encoder("dino_resnet18_w2", 12)
  assert info["layout"] == "dino"
  assert {line.split(" (")[0] for line in info["ignored_summary"]} == {
      "student.module.backbone.*", "student.module.head.mlp.*", "student.module.head.last_layer.*",
      "teacher.module.head.mlp.*", "teacher.module.head.last_layer.*", "dino_loss.center"}


def _dual_config(arg: str = "tiny,separate_projectors"):
  config = contrastive.get_config(arg)
  # The fixture's shapes: width 2 (16 features) and SimCLR heads Linear(16, 16), ReLU, Linear(16, 16).
  config.model.update(width=2, projector=(16, 16), conv_impl="xla")
  return config


def test_dual_checkpoint_loads_both_encoders_and_their_heads_into_the_dual_encoder():
  state, expected = _fixture("dual_resnet18_w2")
  model = _abstract(lambda: models.create_model(_dual_config(), rngs=nnx.Rngs(0)))
  source, info = convert.build_source(state, _state(model))
  assert info["layout"] == "dual_resnet"
  assert info["loaded"] == {"s1": "backbone/encoders/s1", "s2": "backbone/encoders/s2",
                            "projector_s1": "projectors/s1", "projector_s2": "projectors/s2"}
  assert info["bands"] == ["s1: reordered VV,VH -> VH,VV", "s2: dropped B10 from 13-band weights"]
  assert info["architecture"] == {"s1": "resnet18", "s2": "resnet18"} and info["skipped"] == []
  report = _load(model, source)
  assert report["fresh"] == [] and report["skipped"] == []
  # ben-ge's S1 is (VH, VV): the torch input's channels reversed.
  inputs = {"s2": jnp.asarray(_without_b10(expected["input_s2"]).transpose(0, 2, 3, 1)),
            "s1": jnp.asarray(expected["input_s1"][:, ::-1].transpose(0, 2, 3, 1))}
  features = np.asarray(nnx.jit(lambda m, x: m.features(x))(model, inputs))  # [s2 | s1]: modality_a = s2
  assert _relative(features[:, :16], expected["features_s2_b10_zero"]) <= TOLERANCE
  assert _relative(features[:, 16:], expected["features_s1"]) <= TOLERANCE
  for modality in ("s1", "s2"):
    head = model.projectors[modality]
    ours = np.asarray(head(jnp.asarray(expected[f"features_{modality}"])))
    assert _relative(ours, expected[f"projection_{modality}"]) <= TOLERANCE


def test_dual_heads_are_skipped_with_a_reason_where_the_model_has_other_projectors():
  state, _ = _fixture("dual_resnet18_w2")
  shared = _abstract(lambda: models.create_model(_dual_config("tiny"), rngs=nnx.Rngs(0)))  # one projector
  source, info = convert.build_source(state, _state(shared))
  assert set(info["loaded"]) == {"s1", "s2"}
  assert [line.split(":")[0] for line in info["skipped"]] == [
      "projector_s1 (state_dict.backbone1.fc.*)", "projector_s2 (state_dict.backbone2.fc.*)"]
  assert "no two-layer projector at 'projectors/s1'" in info["skipped"][0]
  # A shared head at the top level goes onto the shared projector.
  bare = {key[len("state_dict."):]: value for key, value in state.items()}
  moved = {("fc." + key[len("backbone2.fc."):] if key.startswith("backbone2.fc.") else key): value
           for key, value in bare.items() if not key.startswith("backbone1.fc.")}
  source, info = convert.build_source(moved, _state(shared))
  assert info["loaded"]["projector"] == "projector"
  np.testing.assert_array_equal(source["projector/layers/1/kernel"], bare["backbone2.fc.2.weight"].T)


def test_dual_checkpoint_into_an_s2_classifier_loads_only_the_s2_encoder():
  state, _ = _fixture("dual_resnet18_w2")
  config = finetune.get_config("tiny=True,synthetic=True")
  config.model.update(width=2, conv_impl="xla")
  model = _abstract(lambda: models.create_model(config, rngs=nnx.Rngs(0)))
  source, info = convert.build_source(state, _state(model))
  assert info["loaded"] == {"s2": "backbone/encoders/s2"}
  assert info["skipped"][0].startswith("s1: the model has no encoder at 'backbone/encoders/s1'")
  report = _load(model, source)
  assert all(path.startswith("heads/") for path in report["fresh"])
  assert len(report["loaded"]) == 100


# ---------------------------------------------------------------------------------------------------------
# Mismatches.
# ---------------------------------------------------------------------------------------------------------
def test_width_mismatch_is_an_error_naming_the_array():
  model = _bare(resnet.resnet18, 12, 4)
  config_state = {"backbone": {"encoders": {"s2": _state(model)}}}
  with pytest.raises(convert.ConversionError,
                     match=r"backbone/encoders/s2/conv1/kernel: weights \(7, 7, 12, 8\), "
                           r"model \(7, 7, 12, 4\)"):
    convert.build_source(_fixture("resnet18_w8_s2")[0], config_state)


def test_architecture_mismatch_is_an_error_naming_both():
  model = _bare(resnet.resnet18, 12, 4)
  with pytest.raises(convert.ConversionError, match=r"resnet50 \(width 4.*model at '' is a resnet18"):
    convert.build_source(_fixture("resnet50_w4_s2")[0], _state(model), encoder_prefixes={"encoder": ""})


def test_thirteen_band_weights_into_a_thirteen_band_model_need_the_band_names():
  model = _bare(resnet.resnet18, 13, 8)
  with pytest.raises(convert.ConversionError,
                     match=r"input bands.*\n  conv1/kernel: weights \(7, 7, 12, 8\), model \(7, 7, 13, 8\)"):
    convert.build_source(_fixture("resnet18_w8_s2")[0], _state(model), encoder_prefixes={"encoder": ""})


# ---------------------------------------------------------------------------------------------------------
# Conversion and bands, on small hand-made arrays.
# ---------------------------------------------------------------------------------------------------------
def test_converter_transposes_renames_and_reports_every_key():
  state = dict(_fixture("resnet18_w8_s2")[0])
  state["layer1.0.se.fc1.weight"] = np.zeros((2, 8, 1, 1), np.float32)  # an SE block: not ours
  converted = convert.convert_resnet(state)
  assert (converted.architecture, converted.width, converted.in_channels) == ("resnet18", 8, 13)
  assert converted.skipped == ["fc.weight", "fc.bias", "layer1.0.se.fc1.weight"]
  assert len(converted.dropped) == 20 and all(k.endswith("num_batches_tracked") for k in converted.dropped)
  assert len(converted.flat) + len(converted.skipped) + len(converted.dropped) == len(state)
  np.testing.assert_array_equal(converted.flat["conv1/kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
  # layer2.1 is the 4th block (layer1 has 2): running index over the stages.
  np.testing.assert_array_equal(converted.flat["blocks/3/bn2/mean"], state["layer2.1.bn2.running_mean"])
  np.testing.assert_array_equal(converted.flat["blocks/3/bn2/var"], state["layer2.1.bn2.running_var"])
  np.testing.assert_array_equal(converted.flat["blocks/6/downsample/bn/scale"],
                                state["layer4.0.downsample.1.weight"])
  np.testing.assert_array_equal(converted.flat["blocks/6/downsample/conv/kernel"],
                                state["layer4.0.downsample.0.weight"].transpose(2, 3, 1, 0))


def test_resnet50_blocks_run_over_all_stages():
  state = _fixture("resnet50_w4_s2")[0]
  converted = convert.convert_resnet(state)
  assert (converted.block, converted.blocks_per_stage) == ("bottleneck", (3, 4, 6, 3))
  np.testing.assert_array_equal(converted.flat["blocks/13/conv3/kernel"],
                                state["layer4.0.conv3.weight"].transpose(2, 3, 1, 0))
  assert converted.flat["blocks/15/bn3/scale"].shape == (128,)


def _band_kernel(bands: int) -> np.ndarray:
  """An HWIO kernel whose input channel i holds the value i everywhere."""
  return np.broadcast_to(np.arange(bands, dtype=np.float32)[None, None, :, None], (7, 7, bands, 4)).copy()


def test_select_input_bands_by_name():
  kept = convert.select_input_bands(_band_kernel(13), None, constants.S2_BANDS)
  assert kept[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]  # B10 (index 10) dropped
  s1 = convert.select_input_bands(_band_kernel(2), None, constants.S1_BANDS)
  assert s1[0, 0, :, 0].tolist() == [1, 0]  # VV, VH weights -> ben-ge's VH, VV
  spelled = convert.select_input_bands(_band_kernel(13), [f"b{i}" for i in range(1, 9)] + ["B8a", "B9", "B10",
                                                                                           "b11", "B12"],
                                       ["B4", "B03", "b2"])
  assert spelled[0, 0, :, 0].tolist() == [3, 2, 1]
  rgb = convert.select_input_bands(_band_kernel(3), None, ["B02", "B03", "B04"])
  assert rgb[0, 0, :, 0].tolist() == [2, 1, 0]  # 3-channel weights are R, G, B (B04, B03, B02)
  assert convert.band_changes(None, constants.S1_BANDS, 2) == ["reordered VV,VH -> VH,VV"]
  assert convert.band_changes(None, constants.S2_BANDS, 12) == []


def test_band_errors_name_the_band():
  with pytest.raises(convert.ConversionError, match=r"unknown band name 'B14'"):
    convert.select_input_bands(_band_kernel(13), None, ["B02", "B14"])
  with pytest.raises(convert.ConversionError, match=r"no input channel for data band\(s\) B01"):
    convert.select_input_bands(_band_kernel(3), None, constants.S2_BANDS)
  with pytest.raises(convert.ConversionError, match=r"5 input channels have no default band names"):
    convert.select_input_bands(_band_kernel(5), None, ["B02"])
  with pytest.raises(convert.ConversionError, match=r"13 input channels but 12 weight bands"):
    convert.select_input_bands(_band_kernel(13), constants.S2_BANDS, ["B02"])
  with pytest.raises(convert.ConversionError, match=r"name a band twice"):
    convert.select_input_bands(_band_kernel(13), None, ["B02", "B2"])
  # An early-fusion S2 + S1 encoder: the S2 weights have no S1 bands.
  fused = {"backbone": {"encoders": {"s2_s1": _state(_bare(resnet.resnet18, 14, 8))}}}
  with pytest.raises(convert.ConversionError, match=r"data band\(s\) VH, VV"):
    convert.build_source(_fixture("resnet18_w8_s2")[0], fused, modality="s2_s1")
