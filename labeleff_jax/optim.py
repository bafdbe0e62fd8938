"""Optimizers and learning-rate schedules built by name from `config.optimizer`.

Schedules count optimizer steps. The reference steps its cosine annealing once per epoch with T_max=300
epochs; `schedule_unit='epoch'` reproduces that (the rate is held constant within an epoch).
"""

import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam", "adamw", "lars")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def make_schedule(config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int):
  """Returns an optax schedule (step -> learning rate) for `config.optimizer`."""
  opt = config.optimizer
  name = opt.get("schedule", "constant")
  base = opt.learning_rate
  unit = opt.get("schedule_unit", "step")
  if unit not in ("step", "epoch"):
    raise ValueError(f"optimizer.schedule_unit must be 'step' or 'epoch', got {unit!r}")
  # Lengths are given in the schedule's unit; `decay_steps` defaults to the whole run.
  per_unit = steps_per_epoch if unit == "epoch" else 1
  total_units = max(1, total_steps // per_unit)
  if name == "constant":
    schedule = optax.constant_schedule(base)
  elif name == "cosine":
    decay = opt.get("decay_steps", None) or total_units
    schedule = optax.cosine_decay_schedule(base, decay_steps=decay, alpha=opt.get("alpha", 0.0))
  elif name == "warmup_cosine":
    decay = opt.get("decay_steps", None) or total_units
    warmup = opt.get("warmup_steps", 0)
    if warmup >= decay:
      raise ValueError(f"optimizer.warmup_steps ({warmup}) must be smaller than the decay length ({decay})")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base, warmup_steps=warmup, decay_steps=decay,
        end_value=base * opt.get("alpha", 0.0))
  else:
    raise ValueError(f"optimizer.schedule={name!r} is unknown; choose one of {SCHEDULES}")
  if unit == "epoch":
    return lambda step: schedule(step // steps_per_epoch)
  return schedule


def make_optimizer(config: ml_collections.ConfigDict, *, steps_per_epoch: int,
                   total_steps: int) -> optax.GradientTransformation:
  """Returns the gradient transformation of `config.optimizer` (clipping and weight decay included)."""
  opt = config.optimizer
  schedule = make_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  name = opt.name
  weight_decay = opt.get("weight_decay", 0.0)
  if name == "sgd":
    momentum = opt.get("momentum", 0.0) or None
    tx = optax.sgd(schedule, momentum=momentum, nesterov=opt.get("nesterov", False))
    if weight_decay:
      tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  elif name == "adam":
    tx = optax.adam(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999), eps=opt.get("eps", 1e-8))
    if weight_decay:  # L2 penalty as in torch.optim.Adam(weight_decay=...)
      tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999), eps=opt.get("eps", 1e-8),
                     weight_decay=weight_decay)
  elif name == "lars":
    tx = optax.lars(schedule, weight_decay=weight_decay, momentum=opt.get("momentum", 0.9))
  else:
    raise ValueError(f"optimizer.name={name!r} is unknown; choose one of {OPTIMIZERS}")
  clip = opt.get("grad_clip_norm", None)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx
