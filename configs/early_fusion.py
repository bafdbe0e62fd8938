"""Early data fusion of the lecture: S2 and S1 stacked as 14 input channels of one U-Net -> climate zone.

`:season` adds the season as a 15th, constant ("blown-up") channel, as in the reference notebook.
Reference: 17,446,541 parameters (14 channels); same recipe as `supervised`.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, synthetic=False, season=False, label_fraction=1.0, seed=42)
  config = common.base()
  config.seed = arg.seed
  config.data.modalities = ["s2", "s1"] + (["season"] if arg.season else [])
  config.data.label_fraction = arg.label_fraction
  config.model.fusion = "early"
  config.tasks = [common.task("climatezone", "classification", 12)]
  return common.finalize(config, arg)
