"""Catalogue of published Sentinel-1/2 ResNet-18/50 weights: where each file is, what input it expects.

Every entry names one checkpoint file (`url`; `file_name` is what it is saved as), the architecture, the
modality and the input channels in the order of the first convolution's input channels (`bands`), the
input scaling the weights were trained with (`normalization`, a key of NORMALIZATIONS), how the tensors
are laid out in the file (`layout`, plus `subtree` for a file that holds two encoders), the licence, the
paper and where each of these facts was read (`source`). Nothing here is guessed: a fact we could not
read from the publisher's code or pages is said so in `notes`.

Band names follow labeleff_jax.data.constants ("B01".."B12", "B8A"; "VV", "VH"), whatever the publisher
spells. Note that ben-ge itself differs from most of these weights: its S2 is L2A without B10 (12 bands)
and its S1 is ordered (VH, VV), while SSL4EO-S12 and SEN12MS weights take 13 L1C bands and (VV, VH).
Mapping channels is the job of the code that loads a file; this module only says what the file expects.

`config.init_from = "catalog:NAME"` is turned into a local path by `resolve`, which never downloads:
`python -m labeleff_jax.weights.fetch NAME` does (see fetch.py), so a training job cannot stall on the
network and the file it uses is always one whose SHA-256 prefix was checked where one is published.
"""

import dataclasses
import difflib
import hashlib
import os
import pathlib
import re
import shlex
import urllib.parse

from labeleff_jax.weights import layouts

CATALOG_PREFIX = "catalog:"
WEIGHTS_DIR_ENV = "LABELEFF_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = "~/.cache/labeleff_jax/weights"
FETCH_MODULE = "labeleff_jax.weights.fetch"

ARCHITECTURES = ("resnet18", "resnet50")
MODALITIES = ("s2", "s1")
# torchvision: a flat torchvision/timm ResNet state dict (conv1.weight, layer1.0.bn1.*, fc.*), the form
#   torchgeo publishes; moco: an SSL4EO-S12 MoCo training checkpoint, {"state_dict": {"module.encoder_q.*",
#   "module.encoder_k.*", queue}}, of which encoder_q without fc is the backbone; dino: an SSL4EO-S12 DINO
#   training checkpoint, {"teacher": {"module.backbone.*", ...}, "student": ...}; dual_resnet: the
#   SSLTransformerRS checkpoint {"state_dict": {"backbone1.*" (S1), "backbone2.*" (S2)}} (fc = SimCLR head).
LAYOUTS = layouts.LAYOUTS
# Sentinel-2 L1C's 13 bands in band-number order (SSL4EO-S12's and SEN12MS's 13-channel input order; ben-ge
# has the same bands without B10), and Sentinel-1 as SSL4EO-S12 and SEN12MS store it (ben-ge: VH, VV).
S2_BAND_NAMES = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
S1_BAND_NAMES = ("VV", "VH")
S2_RGB_BAND_NAMES = ("B04", "B03", "B02")
# torch.hub's convention for a file name "<stem>-<hex>.<ext>": the hex is the start of the file's SHA-256.
HUB_HASH_RE = re.compile(r"-([a-f0-9]*)\.")

# Pinned copies of the pages the facts were read from, so that a later reader sees the same text.
_TORCHGEO = "https://github.com/microsoft/torchgeo/blob/7ea0616ded0cc27a8feb8b2aafefd7c14155f6fb"
_TORCHGEO_RESNET = f"{_TORCHGEO}/torchgeo/models/resnet.py"
_TORCHGEO_S1_LICENCES = f"{_TORCHGEO}/docs/api/weights/sentinel1.csv"
_TORCHGEO_S2_LICENCES = f"{_TORCHGEO}/docs/api/weights/sentinel2.csv"
_SSL4EO = "https://github.com/zhu-xlab/SSL4EO-S12/blob/2156913c5d8e5a2c572a5b000f0d5eaed6fc3192"
_SSL4EO_README = f"{_SSL4EO}/README.md"
_SSL4EO_DATASET = f"{_SSL4EO}/src/benchmark/pretrain_ssl/datasets/SSL4EO/ssl4eo_dataset.py"
_SSLTRS = "https://github.com/HSG-AIML/SSLTransformerRS/blob/23ffb689e124f74342ebcec50ad946a582d0f64a"

_S2_L1C = S2_BAND_NAMES  # SSL4EO-S12 ALL_BANDS_S2_L1C and SEN12MS S2Bands.ALL, both with B10 after B09
_S2_RGB = S2_RGB_BAND_NAMES
_S1_VV_VH = S1_BAND_NAMES


@dataclasses.dataclass(frozen=True)
class Normalization:
  """How raw values become the network's input; mean/std are per band, in the order of `bands`."""
  name: str
  description: str
  source: str
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  bands: tuple[str, ...] | None = None  # the bands of mean/std (None: one number for every band)


NORMALIZATIONS = {n.name: n for n in (
    Normalization(
        "s2_div10000",
        "x / 10000: S2 digital numbers (reflectance x 10000) to reflectance. torchgeo applies exactly this "
        "(after Resize 256 and CenterCrop 224); SSL4EO-S12's own pretraining also clipped to [0, 1] (README: "
        "'input clip to [0,1] by dividing 10000').",
        f"{_TORCHGEO_RESNET} (_ssl4eo_s12_transforms_s2_10k, _seco_eco_transforms, CLOSP); {_SSL4EO_README}",
        mean=(0.0,), std=(10000.0,)),
    Normalization(
        "s2_l1c_zscore_ssl4eo",
        "(x - mean) / std per band on S2 L1C digital numbers, SSL4EO-S12 band statistics (13 bands, B10 "
        "included), as torchgeo applies for SoftCon.",
        f"{_TORCHGEO_RESNET} (_mean_s2, _std_s2, _ssl4eo_s12_transforms_s2_stats)",
        mean=(1612.9, 1397.6, 1322.3, 1373.1, 1561.0, 2108.4, 2390.7, 2318.7, 2581.0, 837.7, 22.0, 2195.2,
              1537.4),
        std=(791.0, 854.3, 878.7, 1144.9, 1127.5, 1164.2, 1276.0, 1249.5, 1345.9, 577.5, 47.5, 1340.0,
             1142.9),
        bands=S2_BAND_NAMES),
    Normalization(
        "s1_db_zscore_ssl4eo",
        "(x_dB - mean) / std per channel on S1 backscatter in dB, channels (VV, VH); torchgeo's S1 transform "
        "for SSL4EO-S12 MoCo, DeCUR and SoftCon (numbers taken by torchgeo from DeCUR).",
        f"{_TORCHGEO_RESNET} (_mean_s1, _std_s1, _ssl4eo_s12_transforms_s1)",
        mean=(-12.59, -20.26), std=(5.26, 5.91), bands=("VV", "VH")),
    Normalization(
        "s1_db_2sigma_ssl4eo",
        "SSL4EO-S12's own uint8 S1 pipeline: clip((x_dB - (mean - 2 std)) / (4 std), 0, 1) per channel "
        "(VV, VH), stored as uint8 x 255 and read back / 255. The repository does not hold the S1 "
        "pretraining command, so this is the dataset code's default, not a confirmed setting of the S1 "
        "checkpoint; torchgeo serves the same weights with s1_db_zscore_ssl4eo instead.",
        f"{_SSL4EO_DATASET} (S1_MEAN, S1_STD, normalize, get_array)",
        mean=(-12.54847273, -20.19237134), std=(5.25697717, 5.91150917), bands=("VV", "VH")),
    Normalization(
        "s1_raw_closp",
        "No scaling: torchgeo's transform is nn.Identity and CLOSP's dataset feeds the CrisisLandMark S1 "
        "values as stored (NaN -> 1e-6), which we take to be dB (not confirmed).",
        f"{_TORCHGEO_RESNET} (SENTINEL1_GRD_CLOSP); https://github.com/DarthReca/closp "
        "(dataset/crisis_land_mark.py, models/closp.py)"),
    Normalization(
        "seco_rgb_quantiles_imagenet",
        "SeCo: per band clip((x - min) / (max - min), 0, 1) with B04 0..129, B03 2..103, B02 3..88 on the "
        "SeCo GeoTIFFs' pixel scale (not reflectance x 10000; the scale is not documented), then ImageNet "
        "mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225). torchgeo's _seco_transforms lists min/max "
        "in B02, B03, B04 order and multiplies by 255 before the ImageNet step, unlike SeCo's own code.",
        "https://github.com/ServiceNow/seasonal-contrast/blob/8285173ec205b64bc3e53b880344dd6c3f79fa7a/"
        f"datasets/seco_dataset.py (QUANTILES, normalize); {_TORCHGEO_RESNET} (_seco_transforms)",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), bands=("B04", "B03", "B02")),
    Normalization(
        "sen12ms_s1_clip_permax",
        "SSLTransformerRS: clip S1 dB to [-25, 0], add 25, then divide each channel by its own maximum over "
        "the sample (+1e-5): a per-sample scaling with no fixed statistics.",
        f"{_SSLTRS}/dfc_dataset.py (clip_sample_values, the s1_maxs division in __getitem__)"),
    Normalization(
        "sen12ms_s2_clip_permax",
        "SSLTransformerRS: clip S2 L1C digital numbers to [0, 10000], then divide each band by its own "
        "maximum over the sample (+1e-5): a per-sample scaling with no fixed statistics.",
        f"{_SSLTRS}/dfc_dataset.py (clip_sample_values, the s2_maxs division in __getitem__)"),
)}


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
  """One published checkpoint file (or one encoder of a two-encoder file)."""
  name: str
  url: str
  sha256_prefix: str | None  # None where the publisher gives no hash
  architecture: str  # one of ARCHITECTURES
  modality: str  # one of MODALITIES
  bands: tuple[str, ...]  # input channels in the order of conv1's input channels
  normalization: str  # a key of NORMALIZATIONS
  layout: str  # one of LAYOUTS
  method: str
  dataset: str  # the pretraining data
  licence: str
  citation: str
  source: str  # where the facts above were read
  subtree: str | None = None  # dual_resnet: the encoder this entry means ("backbone1" or "backbone2")
  filename: str | None = None  # the name to save as where the URL's basename is not a file name
  direct_download: bool = True  # False: the URL is a web page (Google Drive) to download from by hand
  notes: str = ""

  @property
  def file_name(self) -> str:
    return self.filename or pathlib.PurePosixPath(urllib.parse.urlparse(self.url).path).name

  @property
  def in_channels(self) -> int:
    return len(self.bands)

  @property
  def normalization_info(self) -> Normalization:
    return NORMALIZATIONS[self.normalization]


def _torchgeo(name, url, sha, arch, modality, bands, norm, method, dataset, licence, citation, enum,
              notes=""):
  licences = _TORCHGEO_S1_LICENCES if modality == "s1" else _TORCHGEO_S2_LICENCES
  return WeightsEntry(
      name=name, url=url, sha256_prefix=sha, architecture=arch, modality=modality, bands=bands,
      normalization=norm, layout="torchvision", method=method, dataset=dataset, licence=licence,
      citation=citation, source=f"{_TORCHGEO_RESNET} ({enum}); licence: {licences}", notes=notes)


def _google_drive(file_id: str) -> str:
  return f"https://drive.google.com/file/d/{file_id}/view?usp=sharing"


_SSL4EO_PAPER = "https://arxiv.org/abs/2211.07044"
_SECO_PAPER = "https://arxiv.org/abs/2103.16607"
_DECUR_PAPER = "https://arxiv.org/abs/2309.05300"
_SOFTCON_PAPER = "https://arxiv.org/abs/2405.20462"
_CLOSP_PAPER = "https://arxiv.org/abs/2507.10403"
_SECO_ECO_PAPER = "https://arxiv.org/abs/2504.18256"
_SCHEIBENREIF_PAPERS = (
    "Scheibenreif, Mommert, Borth, Contrastive Self-Supervised Data Fusion for Satellite Imagery, ISPRS "
    "Annals V-3-2022; Scheibenreif, Hanna, Mommert, Borth, Self-supervised Vision Transformers for "
    "Land-cover Segmentation and Classification, CVPR Workshops 2022")
_HF_TG = "https://hf.co/torchgeo"
_CLOSP_HF = "https://huggingface.co/DarthReca/CLOSP-Visual/resolve/3bb8677c21dac56bea2dd7baa08d7871272db440"
_SOFTCON_HF = "https://huggingface.co/wangyi111/softcon/resolve/62ff465b2e7467dbfc70758ec1e9d08ab87fc46b"
_CLOSP_S2_NOTE = ("CLOSP feeds 12-band S2 sources with a zero channel inserted for B10 "
                  "(dataset/crisis_land_mark.py).")
_TORCHGEO_DEPRECATED_S1 = "torchgeo names it SENTINEL1_GRD_*; SENTINEL1_ALL_* is its deprecated alias."

_ENTRIES = (
    # --- torchgeo ResNet18_Weights -------------------------------------------------------------------
    _torchgeo(
        "torchgeo_resnet18_s2_all_moco",
        f"{_HF_TG}/resnet18_sentinel2_all_moco/resolve/5b8cddc9a14f3844350b7f40b85bcd32aed75918/"
        "resnet18_sentinel2_all_moco-59bfdff9.pth",
        "59bfdff9", "resnet18", "s2", _S2_L1C, "s2_div10000", "MoCo", "SSL4EO-S12 (S2 L1C)", "CC-BY-4.0",
        _SSL4EO_PAPER, "ResNet18_Weights.SENTINEL2_ALL_MOCO"),
    _torchgeo(
        "torchgeo_resnet18_s2_rgb_moco",
        f"{_HF_TG}/resnet18_sentinel2_rgb_moco/resolve/e1c032e7785fd0625224cdb6699aa138bb304eec/"
        "resnet18_sentinel2_rgb_moco-e3a335e3.pth",
        "e3a335e3", "resnet18", "s2", _S2_RGB, "s2_div10000", "MoCo", "SSL4EO-S12 (S2 L1C RGB)",
        "CC-BY-4.0", _SSL4EO_PAPER, "ResNet18_Weights.SENTINEL2_RGB_MOCO"),
    _torchgeo(
        "torchgeo_resnet18_s2_rgb_seco",
        f"{_HF_TG}/resnet18_sentinel2_rgb_seco/resolve/f8dcee692cf7142163b55a5c197d981fe0e717a0/"
        "resnet18_sentinel2_rgb_seco-cefca942.pth",
        "cefca942", "resnet18", "s2", _S2_RGB, "seco_rgb_quantiles_imagenet", "SeCo", "SeCo (S2 L2A RGB)",
        "Apache-2.0", _SECO_PAPER, "ResNet18_Weights.SENTINEL2_RGB_SECO"),
    # --- torchgeo ResNet50_Weights, Sentinel-1 ---------------------------------------------------------
    _torchgeo(
        "torchgeo_resnet50_s1_moco",
        f"{_HF_TG}/resnet50_sentinel1_all_moco/resolve/e79862c667853c10a709bdd77ea8ffbad0e0f1cf/"
        "resnet50_sentinel1_all_moco-906e4356.pth",
        "906e4356", "resnet50", "s1", _S1_VV_VH, "s1_db_zscore_ssl4eo", "MoCo", "SSL4EO-S12 (S1 GRD)",
        "CC-BY-4.0", _SSL4EO_PAPER, "ResNet50_Weights.SENTINEL1_ALL_MOCO", _TORCHGEO_DEPRECATED_S1),
    _torchgeo(
        "torchgeo_resnet50_s1_decur",
        "https://huggingface.co/torchgeo/decur/resolve/9328eeb90c686a88b30f8526ed757b4bc0f12027/"
        "rn50_ssl4eo-s12_sar_decur_ep100-f0e69ba2.pth",
        "f0e69ba2", "resnet50", "s1", _S1_VV_VH, "s1_db_zscore_ssl4eo", "DeCUR", "SSL4EO-S12 (S1 GRD)",
        "Apache-2.0", _DECUR_PAPER, "ResNet50_Weights.SENTINEL1_ALL_DECUR", _TORCHGEO_DEPRECATED_S1),
    _torchgeo(
        "torchgeo_resnet50_s1_softcon", f"{_SOFTCON_HF}/B2_rn50_softcon.pth",
        None, "resnet50", "s1", _S1_VV_VH, "s1_db_zscore_ssl4eo", "SoftCon", "SSL4EO-S12 (S1 GRD)",
        "CC-BY-4.0", _SOFTCON_PAPER, "ResNet50_Weights.SENTINEL1_GRD_SOFTCON",
        "The file name carries no hash and none is published."),
    _torchgeo(
        "torchgeo_resnet50_s1_closp", f"{_CLOSP_HF}/closp-rn_s1_encoder-cacc90bc.pth",
        "cacc90bc", "resnet50", "s1", _S1_VV_VH, "s1_raw_closp", "CLOSP", "CrisisLandMark (S1)", "OpenRAIL",
        _CLOSP_PAPER, "ResNet50_Weights.SENTINEL1_GRD_CLOSP",
        "Licence per torchgeo's weights table; the CLOSP code repository states Apache-2.0 for its code."),
    _torchgeo(
        "torchgeo_resnet50_s1_geoclosp", f"{_CLOSP_HF}/geoclosp-rn_s1_encoder-e63ae1af.pth",
        "e63ae1af", "resnet50", "s1", _S1_VV_VH, "s1_raw_closp", "GeoCLOSP", "CrisisLandMark (S1)",
        "OpenRAIL", _CLOSP_PAPER, "ResNet50_Weights.SENTINEL1_GRD_GEOCLOSP",
        "Licence per torchgeo's weights table; the CLOSP code repository states Apache-2.0 for its code."),
    # --- torchgeo ResNet50_Weights, Sentinel-2 ---------------------------------------------------------
    _torchgeo(
        "torchgeo_resnet50_s2_all_moco",
        f"{_HF_TG}/resnet50_sentinel2_all_moco/resolve/da4f3c9dbe09272eb902f3b37f46635fa4726879/"
        "resnet50_sentinel2_all_moco-df8b932e.pth",
        "df8b932e", "resnet50", "s2", _S2_L1C, "s2_div10000", "MoCo", "SSL4EO-S12 (S2 L1C)", "CC-BY-4.0",
        _SSL4EO_PAPER, "ResNet50_Weights.SENTINEL2_ALL_MOCO"),
    _torchgeo(
        "torchgeo_resnet50_s2_all_dino",
        f"{_HF_TG}/resnet50_sentinel2_all_dino/resolve/d7f14bf5530d70ac69d763e58e77e44dbecfec7c/"
        "resnet50_sentinel2_all_dino-d6c330e9.pth",
        "d6c330e9", "resnet50", "s2", _S2_L1C, "s2_div10000", "DINO", "SSL4EO-S12 (S2 L1C)", "CC-BY-4.0",
        _SSL4EO_PAPER, "ResNet50_Weights.SENTINEL2_ALL_DINO"),
    _torchgeo(
        "torchgeo_resnet50_s2_all_decur",
        "https://huggingface.co/torchgeo/decur/resolve/eba7ae5945d482a4319be046d34b552db5dd9950/"
        "rn50_ssl4eo-s12_ms_decur_ep100-fc6b09ff.pth",
        "fc6b09ff", "resnet50", "s2", _S2_L1C, "s2_div10000", "DeCUR", "SSL4EO-S12 (S2 L1C)", "Apache-2.0",
        _DECUR_PAPER, "ResNet50_Weights.SENTINEL2_ALL_DECUR"),
    _torchgeo(
        "torchgeo_resnet50_s2_all_softcon", f"{_SOFTCON_HF}/B13_rn50_softcon.pth",
        None, "resnet50", "s2", _S2_L1C, "s2_l1c_zscore_ssl4eo", "SoftCon", "SSL4EO-S12 (S2 L1C)",
        "CC-BY-4.0", _SOFTCON_PAPER, "ResNet50_Weights.SENTINEL2_ALL_SOFTCON",
        "The file name carries no hash and none is published."),
    _torchgeo(
        "torchgeo_resnet50_s2_all_closp", f"{_CLOSP_HF}/closp-rn_s2_encoder-183922a5.pth",
        "183922a5", "resnet50", "s2", _S2_L1C, "s2_div10000", "CLOSP", "CrisisLandMark (S2)", "OpenRAIL",
        _CLOSP_PAPER, "ResNet50_Weights.SENTINEL2_ALL_CLOSP", _CLOSP_S2_NOTE),
    _torchgeo(
        "torchgeo_resnet50_s2_all_geoclosp", f"{_CLOSP_HF}/geoclosp-rn_s2_encoder-94c37f4a.pth",
        "94c37f4a", "resnet50", "s2", _S2_L1C, "s2_div10000", "GeoCLOSP", "CrisisLandMark (S2)", "OpenRAIL",
        _CLOSP_PAPER, "ResNet50_Weights.SENTINEL2_ALL_GEOCLOSP", _CLOSP_S2_NOTE),
    _torchgeo(
        "torchgeo_resnet50_s2_all_seco_eco",
        f"{_HF_TG}/seco-eco/resolve/aea279ea46572cfca5876ac1f9d8d8595fcdeb3b/"
        "resnet50_sentinel2_all_seco_eco-90ec322f.pth",
        "90ec322f", "resnet50", "s2",
        ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"),
        "s2_div10000", "SeCo-Eco", "SSL4Eco (S2, 12 bands)", "MIT", _SECO_ECO_PAPER,
        "ResNet50_Weights.SENTINEL2_ALL_SECO_ECO",
        "12 bands without B10: the same bands and order as ben-ge's S2. torchgeo resizes to 224 instead "
        "of the Resize 256 / CenterCrop 224 of the SSL4EO-S12 entries."),
    _torchgeo(
        "torchgeo_resnet50_s2_rgb_moco",
        f"{_HF_TG}/resnet50_sentinel2_rgb_moco/resolve/efd9723b59a88e9dc1420dc1e96afb25b0630a3c/"
        "resnet50_sentinel2_rgb_moco-2b57ba8b.pth",
        "2b57ba8b", "resnet50", "s2", _S2_RGB, "s2_div10000", "MoCo", "SSL4EO-S12 (S2 L1C RGB)",
        "CC-BY-4.0", _SSL4EO_PAPER, "ResNet50_Weights.SENTINEL2_RGB_MOCO"),
    _torchgeo(
        "torchgeo_resnet50_s2_rgb_seco",
        f"{_HF_TG}/resnet50_sentinel2_rgb_seco/resolve/fbd07b02a8edb8fc1035f7957160deed4321c145/"
        "resnet50_sentinel2_rgb_seco-018bf397.pth",
        "018bf397", "resnet50", "s2", _S2_RGB, "seco_rgb_quantiles_imagenet", "SeCo", "SeCo (S2 L2A RGB)",
        "Apache-2.0", _SECO_PAPER, "ResNet50_Weights.SENTINEL2_RGB_SECO"),
    # --- SSL4EO-S12's own full training checkpoints (Google Drive share pages in its README) ---------
    WeightsEntry(
        name="ssl4eo_resnet50_s2_all_moco", url=_google_drive("1OrtPfG2wkO05bimstQ_T9Dza8z3zp8i-"),
        sha256_prefix=None, architecture="resnet50", modality="s2", bands=_S2_L1C,
        normalization="s2_div10000", layout="moco", method="MoCo", dataset="SSL4EO-S12 (S2 L1C)",
        licence="CC-BY-4.0", citation=_SSL4EO_PAPER,
        source=f"{_SSL4EO_README} (MoCo ResNet50 'full ckpt'); bands: {_SSL4EO_DATASET} (ALL_BANDS_S2_L1C); "
        f"layout: {_SSL4EO}/src/benchmark/transfer_classification/linear_BE_moco.py",
        filename="ssl4eo_s12_B13_rn50_moco_full.pth", direct_download=False,
        notes="The README also links a 'backbone' file whose layout we could not check; not catalogued."),
    WeightsEntry(
        name="ssl4eo_resnet50_s2_all_dino", url=_google_drive("1iSHHp_cudPjZlshqWXVZj5TK74P32a2q"),
        sha256_prefix=None, architecture="resnet50", modality="s2", bands=_S2_L1C,
        normalization="s2_div10000", layout="dino", method="DINO", dataset="SSL4EO-S12 (S2 L1C)",
        licence="CC-BY-4.0", citation=_SSL4EO_PAPER,
        source=f"{_SSL4EO_README} (DINO ResNet50 'full ckpt'); bands: {_SSL4EO_DATASET}; layout: "
        f"{_SSL4EO}/src/benchmark/transfer_classification/models/dino/utils.py (load_pretrained_weights)",
        filename="ssl4eo_s12_B13_rn50_dino_full.pth", direct_download=False,
        notes="The README also links a 'backbone' file whose layout we could not check; not catalogued."),
    WeightsEntry(
        name="ssl4eo_resnet50_s1_moco", url=_google_drive("1gjTTWikf1qORJyFifWD1ksk9HzezqQ0b"),
        sha256_prefix=None, architecture="resnet50", modality="s1", bands=_S1_VV_VH,
        normalization="s1_db_2sigma_ssl4eo", layout="moco", method="MoCo", dataset="SSL4EO-S12 (S1 GRD)",
        licence="CC-BY-4.0", citation=_SSL4EO_PAPER,
        source=f"{_SSL4EO_README} (MoCo ResNet50 'S1 SAR 2 bands' full ckpt); bands: {_SSL4EO_DATASET} "
        "(ALL_BANDS_S1_GRD = ['VV','VH'])",
        filename="ssl4eo_s12_B2_rn50_moco_full.pth", direct_download=False,
        notes="Layout taken to be the S2 MoCo one (same pretraining script); the S1 command is not "
        "published. pretrain_dino_s2c.py lists ['VH','VV'] for B2, but that list is unused: the data "
        "(LMDB) is written in ALL_BANDS_S1_GRD order."),
    WeightsEntry(
        name="ssl4eo_resnet18_s2_all_moco", url=_google_drive("1iWLm7ljQ6tKZiVp47pJUPDe3Un0BUd9o"),
        sha256_prefix=None, architecture="resnet18", modality="s2", bands=_S2_L1C,
        normalization="s2_div10000", layout="moco", method="MoCo", dataset="SSL4EO-S12 (S2 L1C)",
        licence="CC-BY-4.0", citation=_SSL4EO_PAPER,
        source=f"{_SSL4EO_README} ('Other pre-trained models': MoCo ResNet18 S2-L1C 13 bands)",
        filename="ssl4eo_s12_B13_rn18_moco_full.pth", direct_download=False,
        notes="Layout taken to be the ResNet-50 MoCo one (same pretraining script)."),
    WeightsEntry(
        name="ssl4eo_resnet18_s2_rgb_moco", url=_google_drive("1HfgXS5VpQA39k8mFrWMbHvYwuT_j6Mbi"),
        sha256_prefix=None, architecture="resnet18", modality="s2", bands=_S2_RGB,
        normalization="s2_div10000", layout="moco", method="MoCo", dataset="SSL4EO-S12 (S2 L1C RGB)",
        licence="CC-BY-4.0", citation=_SSL4EO_PAPER,
        source=f"{_SSL4EO_README} ('Other pre-trained models': MoCo ResNet18 S2-L1C RGB); bands: "
        f"{_SSL4EO_DATASET} (RGB_BANDS)",
        filename="ssl4eo_s12_B3_rn18_moco_full.pth", direct_download=False,
        notes="Layout taken to be the ResNet-50 MoCo one (same pretraining script)."),
    WeightsEntry(
        name="ssl4eo_resnet18_s2_rgb_moco_ep200", url=_google_drive("1U_m39Owahk15Vg1uL1MYbPAmAyUWBKfI"),
        sha256_prefix=None, architecture="resnet18", modality="s2", bands=_S2_RGB,
        normalization="s2_div10000", layout="moco", method="MoCo", dataset="SSL4EO-S12 (S2 L1C RGB)",
        licence="CC-BY-4.0", citation=_SSL4EO_PAPER,
        source=f"{_SSL4EO_README} ('Other pre-trained models': MoCo ResNet18 S2-L1C RGB, full ckpt ep200)",
        filename="ssl4eo_s12_B3_rn18_moco_ep200_full.pth", direct_download=False,
        notes="Layout taken to be the ResNet-50 MoCo one (same pretraining script)."),
    WeightsEntry(
        name="ssl4eo_resnet50_s2_rgb_moco", url=_google_drive("1UEpA9sOcA47W0cmwQhkSeXfQxrL-EcJB"),
        sha256_prefix=None, architecture="resnet50", modality="s2", bands=_S2_RGB,
        normalization="s2_div10000", layout="moco", method="MoCo", dataset="SSL4EO-S12 (S2 L1C RGB)",
        licence="CC-BY-4.0", citation=_SSL4EO_PAPER,
        source=f"{_SSL4EO_README} ('Other pre-trained models': MoCo ResNet50 S2-L1C RGB)",
        filename="ssl4eo_s12_B3_rn50_moco_full.pth", direct_download=False),
    # --- Scheibenreif et al.: one SimCLR checkpoint with an S1 (backbone1) and an S2 (backbone2) ResNet --
    *(WeightsEntry(
        name=f"scheibenreif_{arch}_{modality}_sen12ms", url=_google_drive(file_id), sha256_prefix=None,
        architecture=arch, modality=modality, bands=bands, normalization=f"sen12ms_{modality}_clip_permax",
        layout="dual_resnet", subtree=subtree, method="SimCLR (S1/S2 contrastive fusion)",
        dataset="SEN12MS (S1 GRD, S2 L1C)", licence="unspecified (the repository states none)",
        citation=_SCHEIBENREIF_PAPERS,
        source=f"{_SSLTRS}/README.md (Pretrained models: {arch_label}); encoders and channels: "
        f"{_SSLTRS}/train_resnet_backbone.py, {_SSLTRS}/resnet_simclr.py (DoubleResNetSimCLR); band order: "
        f"{_SSLTRS}/dfc_sen12ms_dataset.py (S1Bands.ALL, S2Bands.ALL)",
        filename=f"scheibenreif_dual_{arch}_sen12ms.pth", direct_download=False, notes=notes)
      for arch, arch_label, file_id, notes in (
          ("resnet50", "ResNet50", "1txqsNLUhIiQXRxflK_SMHn4y7Pp8o3mZ",
           "Pretrained on 128 x 128 crops; the S1 and S2 entries are the same file."),
          ("resnet18", "ResNet18", "1vbj9WVK-MZNuAJGEOGEvE663b9BUwPSh",
           "The same file holds both encoders. Channel counts (2 and 13) taken from the ResNet-50 "
           "training script; the ResNet-18 run's settings are not published."))
      for modality, subtree, bands in (("s1", "backbone1", _S1_VV_VH), ("s2", "backbone2", _S2_L1C))),
)

CATALOG: dict[str, WeightsEntry] = {entry.name: entry for entry in _ENTRIES}


def entry_problems(entry: WeightsEntry) -> list[str]:
  """What is wrong with an entry (empty when nothing): the checks every catalogued entry must pass."""
  problems = []
  if not re.fullmatch(r"[a-z0-9_]+", entry.name):
    problems.append(f"name {entry.name!r} is not lower-case snake_case")
  if urllib.parse.urlparse(entry.url).scheme != "https":
    problems.append(f"url {entry.url!r} is not https")
  if not entry.file_name or "/" in entry.file_name or entry.file_name.startswith("."):
    problems.append(f"file name {entry.file_name!r} cannot be saved in a folder")
  if entry.architecture not in ARCHITECTURES:
    problems.append(f"architecture {entry.architecture!r} is not one of {ARCHITECTURES}")
  if entry.modality not in MODALITIES:
    problems.append(f"modality {entry.modality!r} is not one of {MODALITIES}")
  known = S2_BAND_NAMES if entry.modality == "s2" else S1_BAND_NAMES
  unknown = [band for band in entry.bands if band not in known]
  if not entry.bands or unknown:
    problems.append(f"bands {entry.bands} are not {entry.modality} band names (unknown: {unknown})")
  if len(set(entry.bands)) != len(entry.bands):
    problems.append(f"bands {entry.bands} repeat a band")
  if entry.normalization not in NORMALIZATIONS:
    problems.append(f"normalization {entry.normalization!r} is not one of {sorted(NORMALIZATIONS)}")
  if entry.layout not in LAYOUTS:
    problems.append(f"layout {entry.layout!r} is not one of {LAYOUTS}")
  if (entry.layout == "dual_resnet") != (entry.subtree is not None):
    problems.append("subtree is needed exactly for the dual_resnet layout")
  if entry.sha256_prefix is not None and not re.fullmatch(r"[0-9a-f]{8,64}", entry.sha256_prefix):
    problems.append(f"sha256_prefix {entry.sha256_prefix!r} is not 8 to 64 lower-case hex digits")
  hub = HUB_HASH_RE.search(entry.file_name)
  if hub and len(hub.group(1)) >= 8 and hub.group(1) != entry.sha256_prefix:
    # The file name promises a hash (torch.hub's convention): the entry must check that one.
    problems.append(f"file name {entry.file_name!r} carries hash {hub.group(1)!r} but sha256_prefix is "
                    f"{entry.sha256_prefix!r}")
  for field in ("method", "dataset", "licence", "citation", "source"):
    if not getattr(entry, field).strip():
      problems.append(f"{field} is empty")
  return problems


def _check_catalogue() -> None:
  problems = [f"{entry.name}: {problem}" for entry in _ENTRIES for problem in entry_problems(entry)]
  if len(CATALOG) != len(_ENTRIES):
    problems.append("two entries share a name")
  if problems:
    raise ValueError("weights catalogue: " + "; ".join(problems))


_check_catalogue()  # an edit that breaks an entry fails at import, not at a user's download


def names() -> list[str]:
  return sorted(CATALOG)


def _known_names_message(name: str, known) -> str:
  close = difflib.get_close_matches(name, known, n=5, cutoff=0.4)
  rest = [n for n in sorted(known) if n not in close]
  return ", ".join(close + rest)


def get(name: str, catalogue: dict[str, WeightsEntry] | None = None) -> WeightsEntry:
  """The entry called `name` ("catalog:" prefix allowed); KeyError listing known names, closest first."""
  catalogue = CATALOG if catalogue is None else catalogue
  name = name.removeprefix(CATALOG_PREFIX)
  if name not in catalogue:
    raise KeyError(f"no weights called {name!r} in the catalogue; known names, closest first: "
                   f"{_known_names_message(name, catalogue)}")
  return catalogue[name]


def default_weights_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR).expanduser()


class WeightsNotFoundError(FileNotFoundError):
  """A catalogued file that is not in the weights folder yet; the message says how to get it."""


class WeightsHashError(ValueError):
  """A file whose SHA-256 does not start with the catalogued prefix."""


def sha256_of(path: os.PathLike | str, chunk_bytes: int = 1 << 20) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    # Checkpoints are hundreds of MB: read in chunks rather than all at once.
    for chunk in iter(lambda: f.read(chunk_bytes), b""):
      digest.update(chunk)
  return digest.hexdigest()


def fetch_command(entry: WeightsEntry, weights_dir: os.PathLike | str) -> str:
  return f"python -m {FETCH_MODULE} {entry.name} --dir {shlex.quote(str(weights_dir))}"


def how_to_get(entry: WeightsEntry, weights_dir: os.PathLike | str) -> str:
  """The instruction to put `entry`'s file into `weights_dir`: the fetch command, or a manual download."""
  target = pathlib.Path(weights_dir) / entry.file_name
  if entry.direct_download:
    return f"fetch it with:\n  {fetch_command(entry, weights_dir)}\n(it downloads {entry.url})"
  return (f"{entry.url} is a web page (Google Drive), not the file itself: open it in a browser (or use a "
          f"Google Drive downloader such as gdown), download the file and save it as\n  {target}")


def check_hash(entry: WeightsEntry, path: os.PathLike | str) -> None:
  """Raises WeightsHashError when `entry` has a hash prefix and `path`'s SHA-256 does not start with it."""
  if entry.sha256_prefix is None:
    return
  actual = sha256_of(path)[:len(entry.sha256_prefix)]
  if actual != entry.sha256_prefix:
    raise WeightsHashError(
        f"{path} is damaged or a different file: its SHA-256 starts with {actual}, catalogue entry "
        f"{entry.name!r} expects {entry.sha256_prefix} ({entry.url}). Delete it, then "
        f"{how_to_get(entry, pathlib.Path(path).parent)}")


def resolve(spec: str, weights_dir: os.PathLike | str | None = None,
            catalogue: dict[str, WeightsEntry] | None = None) -> pathlib.Path:
  """The local file for `spec` ("catalog:NAME" or NAME), hash-checked where a prefix is known.

  Never downloads: a missing file raises WeightsNotFoundError saying the URL and the command to run.
  """
  entry = get(spec, catalogue)
  weights_dir = pathlib.Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
  path = weights_dir / entry.file_name
  if not path.is_file():
    raise WeightsNotFoundError(
        f"{CATALOG_PREFIX}{entry.name}: {path} is missing; {how_to_get(entry, weights_dir)}")
  check_hash(entry, path)
  return path
