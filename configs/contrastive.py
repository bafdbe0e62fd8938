"""Multimodal contrastive pretraining of the lecture (Scheibenreif et al. 2022): S2 and S1 dual encoder.

Two ResNet-18 (12-channel S2, 2-channel S1) share one projector Linear(512,512)-ReLU-Linear(512,256)
(22,772,096 parameters). Co-located S2/S1 patches are positives, every other patch of the global batch a
negative: NT-Xent at temperature 0.1, Adam 3e-4, batch 64 (incomplete batches dropped). No labels are
used for training; a k-NN probe on `lulc_top` tracks representation quality on the validation split.
Arguments: `separate_projectors` (one projector per modality, as Scheibenreif et al.), `resnet50`,
`pair=s2:dem` (any two modalities), `epochs=N`, `tiny`, `synthetic`.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, synthetic=False, separate_projectors=False, resnet50=False,
                         pair="s2:s1", epochs=5, seed=42)
  config = common.base()
  config.seed = arg.seed
  config.objective = "contrastive"
  modality_a, modality_b = arg.pair.split(":")
  config.data.modalities = [modality_a, modality_b]
  config.model.update(name="dual_encoder", backbone="resnet50" if arg.resnet50 else "resnet18",
                      modality_a=modality_a, modality_b=modality_b, projector=(512, 256),
                      shared_projector=not arg.separate_projectors)
  config.tasks = []
  config.contrastive.temperature = 0.1
  config.probe.label = "lulc_top"
  config.optimizer.update(name="adam", learning_rate=3e-4, schedule="constant", schedule_unit="step")
  config.train.update(batch_size=64, num_epochs=arg.epochs)
  config.eval.batch_size = 64
  return common.finalize(config, arg)
