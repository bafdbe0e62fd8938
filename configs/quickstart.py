"""The quickstart demo: multitask land-cover segmentation + climate zone from early-fused S2 and S1.

Runs on a laptop CPU in a few minutes with nothing downloaded: the first run writes 800 synthetic ben-ge
patches in the real on-disk layout (./data/synthetic/), prepares the TFDS dataset from them, then trains
a narrow U-Net (width 16) on 64x64 crops with two heads (11-class segmentation, 12-class climate zone)
for 5 epochs with Adam, evaluates on validation and test, and writes curves and example maps to
WORKDIR/plots. Every number it prints comes from synthetic data. Arguments: `tiny`, `epochs=N`.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, epochs=5, seed=42)
  config = common.base()
  config.seed = arg.seed
  common.use_synthetic(config, 800)
  config.data.modalities = ["s2", "s1"]
  config.data.image_size = 64
  config.model.update(name="unet", fusion="early", width=16)
  config.tasks = [
      common.task("lulc", "segmentation", 11, head="conv1x1"),
      common.task("climatezone", "classification", 12),
  ]
  config.optimizer.update(name="adam", learning_rate=1e-3, schedule="cosine", schedule_unit="step",
                          decay_steps=0)
  config.train.update(batch_size=32, num_epochs=arg.epochs, log_every_steps=5)
  return common.finalize(config, arg)
