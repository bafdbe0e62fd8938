"""Label-fraction sweep: scratch vs contrastive pretraining + fine-tune / linear probe, over fractions, seeds.

`python main.py --config configs/sweep_label_fraction.py:ARGS --workdir DIR` runs every run of the sweep
(skipping those already finished) and writes DIR/results.md, DIR/results.csv and DIR/*_vs_fraction.png.
Per seed: one S2/S1 contrastive pretraining (`configs/contrastive.py`) on all training images, then the
S2 ResNet-18 `lulc_top` classifier of `configs/finetune.py` at each label fraction, from scratch,
fine-tuned and linearly probed (see labeleff_jax/experiments/label_fraction_sweep.py).
Arguments:
- `seeds=3`, `fractions=0.01:0.05:0.1:0.25:0.5:1.0`, `methods=scratch:finetune:linear_probe`;
- `steps=N` optimizer steps of every downstream run, `pretrain_steps=N`, `batch_size=32` (upper bound);
- `lr=3e-4` (scratch and fine-tuning share it, so only the initialisation differs), `probe_lr=1e-3`;
- `width=N` (ResNet-18 base width, 64 = torchvision), `image_size=N` (random crops in training, centre
  crops in evaluation);
- `synthetic` (800 synthetic patches), `quick` (synthetic-quick: small encoder and crops, sized for a
  2-core CPU, see docs/results.md), `tiny` (test-sized);
- `published=catalog:NAME` or `published=FILE.pth`: published S2 weights as a third starting point, adding
  the methods `published_finetune` and `published_linear_probe` (with `published_model=resnet18|resnet50`
  and `published_width=64` for a file outside the catalogue; a catalogue entry says both, and its input
  scaling is applied to those runs through data.presets).
"""

import os

from configs import common
from configs import contrastive
from configs import finetune
from labeleff_jax.data import presets
from labeleff_jax.weights import catalog

# Defaults of the three sizes. quick: ResNet-18 at width 16 on 32 px crops; see docs/results.md for why.
SIZES = {
    "full": dict(width=64, image_size=120, steps=1000, pretrain_steps=2000, pretrain_eval_every_epochs=50,
                 num_workers=2),
    "quick": dict(width=16, image_size=32, steps=200, pretrain_steps=450, pretrain_eval_every_epochs=10,
                  num_workers=2),
    "tiny": dict(width=4, image_size=32, steps=4, pretrain_steps=4, pretrain_eval_every_epochs=1000,
                 num_workers=0),
}
SHARED_DATA_KEYS = ("name", "data_dir", "manual_dir", "synthetic", "image_size", "num_workers")
NEVER = 10**9  # eval_every_epochs that never comes: downstream runs evaluate once, at the end


def get_config(arg=None):
  raw_arg = arg or ""
  arg = common.parse_arg(arg, tiny=False, synthetic=False, quick=False, seeds=3,
                         fractions="0.01:0.05:0.1:0.25:0.5:1.0", methods="scratch:finetune:linear_probe",
                         label="lulc_top", steps=0, pretrain_steps=0, batch_size=32, lr=3e-4, probe_lr=1e-3,
                         width=0, image_size=0, published="", published_model="resnet18", published_width=64)
  size = "tiny" if arg.tiny else "quick" if arg.quick else "full"
  defaults = SIZES[size]
  data_arg = "tiny" if arg.tiny else "synthetic" if (arg.synthetic or arg.quick) else ""
  width = arg.width or defaults["width"]
  image_size = arg.image_size or defaults["image_size"]

  pretrain = contrastive.get_config(data_arg)
  pretrain.train.update(eval_every_epochs=defaults["pretrain_eval_every_epochs"], checkpoint_every_steps=100,
                        log_every_steps=min(25, defaults["pretrain_steps"]))
  downstream = finetune.get_config(",".join(filter(None, [data_arg, f"label={arg.label}"])))
  downstream.train.update(eval_every_epochs=NEVER, log_every_steps=min(25, defaults["steps"]))

  config = common.ConfigDict()
  config.experiment = "label_fraction_sweep"
  config_path = "configs/sweep_label_fraction.py" + (f":{raw_arg}" if raw_arg else "")
  config.command = f"python main.py --config {config_path} --workdir DIR"
  config.seeds = list(range(arg.seeds))
  config.fractions = [float(f) for f in arg.fractions.split(":")]
  config.methods = arg.methods.split(":")
  published = arg.published
  if published and not published.startswith(catalog.CATALOG_PREFIX):
    published = os.path.abspath(os.path.expanduser(published))  # the runs may start elsewhere
  config.published = common.ConfigDict(dict(init_from=published, model=arg.published_model,
                                            width=arg.published_width, presets={}))
  if arg.published:
    if arg.published.startswith(catalog.CATALOG_PREFIX):
      entry = catalog.get(arg.published)
      config.published.update(model=entry.architecture, width=64)
      config.published.presets = presets.for_weights(entry)
    if "methods=" not in raw_arg:
      config.methods += ["published_finetune", "published_linear_probe"]
  config.metrics = [f"{arg.label}/accuracy", f"{arg.label}/macro_f1"]
  config.steps = arg.steps or defaults["steps"]
  config.pretrain_steps = arg.pretrain_steps or defaults["pretrain_steps"]
  config.batch_size = arg.batch_size
  config.learning_rates = common.ConfigDict(dict(
      scratch=arg.lr, finetune=arg.lr, linear_probe=arg.probe_lr, published_finetune=arg.lr,
      published_linear_probe=arg.probe_lr))
  config.compilation_cache = True
  # Applied over every run's config, so pretraining and downstream runs read one dataset with one encoder.
  config.data = common.ConfigDict({key: downstream.data[key] for key in SHARED_DATA_KEYS})
  config.data.update(image_size=image_size, num_workers=defaults["num_workers"])
  config.model = common.ConfigDict(dict(width=width))
  config.pretrain = pretrain
  config.downstream = downstream
  config.lock()
  return config
