"""Late data fusion of the lecture: one U-Net per modality (S1: 2 ch, S2: 12 ch), feature maps concatenated.

The concatenated 128-channel features feed the reference classification head (Conv1x1 128->1, flatten,
dropout, linear) -> climate zone. Reference: 34,712,205 parameters; same recipe as `supervised`.
`shared_backbone` ties the image backbones' weights (only for modalities with equal channel counts).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, synthetic=False, label_fraction=1.0, seed=42)
  config = common.base()
  config.seed = arg.seed
  config.data.modalities = ["s1", "s2"]
  config.data.label_fraction = arg.label_fraction
  config.model.fusion = "late"
  config.tasks = [common.task("climatezone", "classification", 12)]
  return common.finalize(config, arg)
