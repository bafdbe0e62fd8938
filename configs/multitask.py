"""Multitask learning of the lecture: one S2 U-Net, three heads trained together.

Heads: land-cover segmentation (11 classes, Conv1x1), climate zone (12 classes, reference head) and season
regression (Conv1x1 -> flatten -> dropout 0.1 -> linear). Losses CE + CE + MSE with weights [1, 1, 1]
(or learned uncertainty weighting with `uncertainty`), Adam lr 1e-5, 5 epochs, batch 32.
Reference: 17,460,570 parameters. Metrics: mIoU (11 classes), accuracy (12), MAE.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, synthetic=False, uncertainty=False, label_fraction=1.0, seed=42)
  config = common.base()
  config.seed = arg.seed
  config.data.modalities = ["s2"]
  config.data.label_fraction = arg.label_fraction
  config.tasks = [
      common.task("lulc", "segmentation", 11, head="conv1x1"),
      common.task("climatezone", "classification", 12),
      common.task("season", "regression", 1),
  ]
  config.model.task_weighting = "uncertainty" if arg.uncertainty else "fixed"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-5
  config.optimizer.schedule = "constant"
  return common.finalize(config, arg)
