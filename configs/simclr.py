"""Single-modality SimCLR pretraining: two augmented views of each S2 patch, ResNet-18 + projector, NT-Xent.

Views differ by flips, 90-degree rotations and physically plausible spectral changes (per-band brightness
and contrast jitter, Gaussian noise, blur); both views pass through the encoder in one batch so BatchNorm
sees all 2B images. LARS (SimCLR's optimiser) or AdamW with linear warmup and cosine decay. A k-NN probe
on `lulc_top` tracks representation quality. Arguments: `optimizer=adamw|lars`, `epochs=N`,
`modality=s2`, `tiny`, `synthetic`.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, synthetic=False, optimizer="adamw", epochs=20, modality="s2",
                         seed=42)
  config = common.base()
  config.seed = arg.seed
  config.objective = "contrastive"
  config.data.modalities = [arg.modality]
  config.data.num_views = 2
  config.data.augment.update(flip=True, rot90=True, brightness=0.2, contrast=0.2, noise_std=0.02,
                             blur_prob=0.3)
  config.model.update(name="simclr", backbone="resnet18", projector=(512, 128))
  config.tasks = []
  config.contrastive.temperature = 0.1
  config.probe.label = "lulc_top"
  if arg.optimizer == "lars":
    config.optimizer.update(name="lars", learning_rate=0.3, momentum=0.9, weight_decay=1e-6)
  else:
    config.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=1e-4)
  config.optimizer.update(schedule="warmup_cosine", schedule_unit="step", warmup_steps=10, decay_steps=0)
  config.train.update(batch_size=64, num_epochs=arg.epochs)
  config.eval.batch_size = 64
  config = common.finalize(config, arg)
  if arg.tiny:
    config.optimizer.warmup_steps = 1
  return config
