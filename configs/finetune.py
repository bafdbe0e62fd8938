"""Transfer learning: initialise an S2 classifier from a pretraining run or published weights, and train it.

`init_from` names the weights:
- `WORKDIR`, a pretraining run (e.g. `contrastive`): `transfer.load` maps checkpoint sub-trees onto the
  model ("backbone=backbone": the dual encoder's `backbone/encoders/s2` ResNet-18 lands on the classifier's
  `backbone/encoders/s2`; its S1 encoder and projector are reported as skipped, the new head as fresh);
- `FILE.pth`, published PyTorch weights (torchgeo, SSL4EO-S12 MoCo/DINO, Scheibenreif et al.'s dual
  ResNet): layout and bands are found by themselves; ResNet-50 weights also need
  `--config.model.name=resnet50`;
- `catalog:NAME` (labeleff_jax/weights/catalog.py, fetched with `python -m labeleff_jax.weights.fetch`):
  given as this config's argument (`finetune.py:init_from=catalog:NAME`), the architecture and the input
  scaling the weights were trained with (`data.presets`) are set from the catalogue.
Modes: `mode=finetune` (everything trains; `backbone_lr_scale=0.1` slows the backbone) or
`mode=linear_probe` (frozen backbone and BatchNorm statistics, only the head trains).
Task: `lulc_top` (11 land-cover classes) with a global-pool head; `label=climatezone` switches it.
"""

from configs import common
from labeleff_jax.data import constants
from labeleff_jax.data import presets
from labeleff_jax.weights import catalog


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, synthetic=False, init_from="", mode="finetune",
                         backbone_lr_scale=1.0, label="lulc_top", label_fraction=1.0, epochs=10, seed=42)
  config = common.base()
  config.seed = arg.seed
  config.init_from = arg.init_from
  config.data.modalities = ["s2"]
  config.data.label_fraction = arg.label_fraction
  config.data.stratify_by = arg.label
  config.model.update(name="resnet18", fusion="early")
  config.tasks = [common.task(arg.label, "classification", constants.LABELS[arg.label].num_classes, head="pool")]
  config.transfer.update(mode=arg.mode, load=["backbone=backbone"], backbone="backbone",
                         backbone_lr_scale=arg.backbone_lr_scale)
  if arg.init_from.startswith(catalog.CATALOG_PREFIX):
    use_published_weights(config, catalog.get(arg.init_from))
  rate = 1e-3 if arg.mode == "linear_probe" else 1e-4
  config.optimizer.update(name="adam", learning_rate=rate, schedule="cosine", schedule_unit="step",
                          decay_steps=0)
  config.train.update(batch_size=32, num_epochs=arg.epochs)
  return common.finalize(config, arg)


def use_published_weights(config, entry: catalog.WeightsEntry) -> None:
  """The classifier's encoder as the catalogue entry's (architecture, torchvision width) and its modality
  scaled the way the weights were trained, where ben-ge can be scaled that way."""
  if entry.modality != "s2":
    raise ValueError(f"init_from={catalog.CATALOG_PREFIX}{entry.name}: a {entry.modality} encoder; this "
                     "classifier reads s2 (use an s2 entry, or set data.modalities and transfer.modality)")
  config.model.update(name=entry.architecture, width=64)
  config.data.presets.update(presets.for_weights(entry))
