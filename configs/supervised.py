"""Supervised baseline of the lecture: Sentinel-2 (12 bands) -> climate zone (12 classes), reference U-Net.

Reproduces the reference notebook's first experiment: U-Net backbone with the classification head
(17,445,389 parameters), cross-entropy, SGD lr 1e-4, cosine annealing (T_max 300, per epoch), batch 32,
5 epochs on ben-ge-800. Arguments: `tiny` (CPU smoke run on synthetic data), `synthetic` (the full
recipe on 800 synthetic patches), `label_fraction=F`, `seed=S`.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, synthetic=False, label_fraction=1.0, seed=42)
  config = common.base()
  config.seed = arg.seed
  config.data.modalities = ["s2"]
  config.data.label_fraction = arg.label_fraction
  config.tasks = [common.task("climatezone", "classification", 12)]
  return common.finalize(config, arg)
