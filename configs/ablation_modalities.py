"""Modality ablation of the ben-ge paper: land cover from each modality set, fused early or late.

`python main.py --config configs/ablation_modalities.py:ARGS --workdir DIR` trains every row and seed
(skipping finished runs) and writes DIR/results.md and DIR/results.csv: per row, `lulc_top` accuracy and
macro F1, `lulc_multihot` F1 and per-label accuracy, `lulc` segmentation mIoU and pixel accuracy, as
mean ± std over seeds (see labeleff_jax/experiments/modality_ablation.py).
Arguments:
- `rows=all` or rows joined by ':' (each a '+'-joined set of S2, S1, Climate, DEM, Weather, Season);
- `fusion=late|early`, `seeds=3`, `task_mode=multitask|separate` (one U-Net with three heads per row, or
  one run per task);
- `steps=N` optimizer steps per run, `batch_size=N`, `lr=1e-3` (Adam, cosine decay), `width=N` (U-Net
  base width; 64 = the reference U-Net), `image_size=N` (crops);
- `synthetic`, `quick` (synthetic-quick, sized for a 2-core CPU, see docs/results.md), `tiny`.
"""

from configs import common
from labeleff_jax.experiments import modality_ablation

SIZES = {
    "full": dict(width=64, image_size=120, steps=2000, batch_size=32, num_workers=2),
    "quick": dict(width=8, image_size=32, steps=150, batch_size=16, num_workers=2),
    "tiny": dict(width=4, image_size=32, steps=4, batch_size=8, num_workers=0),
}
SHARED_DATA_KEYS = ("name", "data_dir", "manual_dir", "synthetic", "image_size", "num_workers")


def get_config(arg=None):
  raw_arg = arg or ""
  arg = common.parse_arg(arg, tiny=False, synthetic=False, quick=False, seeds=3, fusion="late", rows="all",
                         task_mode="multitask", steps=0, batch_size=0, lr=1e-3, width=0, image_size=0)
  size = "tiny" if arg.tiny else "quick" if arg.quick else "full"
  defaults = SIZES[size]

  base = common.base()
  base.data.modalities = ["s2"]  # each row sets its own
  base.model.update(name="unet", fusion=arg.fusion, width=arg.width or defaults["width"])
  base.tasks = [
      common.task("lulc_top", "classification", 11, head="pool"),
      common.task("lulc_multihot", "multilabel", 11, head="pool"),
      common.task("lulc", "segmentation", 11, head="conv1x1"),
  ]
  # The ben-ge paper's recipe as far as it is known: Adam 1e-3 (here decayed by a cosine over the run).
  base.optimizer.update(name="adam", learning_rate=arg.lr, schedule="cosine", schedule_unit="step",
                        decay_steps=0)
  base.train.update(eval_every_epochs=10**9, log_every_steps=25)
  base = common.finalize(base, common.ConfigDict(dict(tiny=arg.tiny, synthetic=arg.synthetic or arg.quick)))
  base.data.update(image_size=arg.image_size or defaults["image_size"], num_workers=defaults["num_workers"])
  base.train.batch_size = arg.batch_size or defaults["batch_size"]

  config = common.ConfigDict()
  config.experiment = "modality_ablation"
  config_path = "configs/ablation_modalities.py" + (f":{raw_arg}" if raw_arg else "")
  config.command = f"python main.py --config {config_path} --workdir DIR"
  config.rows = list(modality_ablation.PAPER_ROWS) if arg.rows == "all" else arg.rows.split(":")
  config.fusion = arg.fusion
  config.task_mode = arg.task_mode
  config.seeds = list(range(arg.seeds))
  config.steps = arg.steps or defaults["steps"]
  config.metrics = ["lulc_top/accuracy", "lulc_top/macro_f1", "lulc_multihot/micro_f1",
                    "lulc_multihot/hamming_accuracy", "lulc/miou", "lulc/pixel_accuracy"]
  config.compilation_cache = True
  # Applied over every run's config (so `--config.data.data_dir=...` reaches all of them).
  config.data = common.ConfigDict({key: base.data[key] for key in SHARED_DATA_KEYS})
  config.base = base
  config.lock()
  return config
