"""Optimizers and learning-rate schedules built by name from `config.optimizer`.

Schedules count optimizer steps. The reference steps its cosine annealing once per epoch with T_max=300
epochs; `schedule_unit='epoch'` reproduces that (the rate is held constant within an epoch).
"""

import ml_collections
import optax

from labeleff_jax import config_checks


def make_schedule(config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int):
  """Returns an optax schedule (step -> learning rate) for `config.optimizer`."""
  config_checks.check_optimizer(config)
  opt = config.optimizer
  name = opt.get("schedule", "constant")
  base = opt.learning_rate
  unit = opt.get("schedule_unit", "step")
  # Lengths are given in the schedule's unit; `decay_steps` defaults to the whole run.
  per_unit = steps_per_epoch if unit == "epoch" else 1
  total_units = max(1, total_steps // per_unit)
  if name == "constant":
    schedule = optax.constant_schedule(base)
  elif name == "cosine":
    decay = opt.get("decay_steps", None) or total_units
    schedule = optax.cosine_decay_schedule(base, decay_steps=decay, alpha=opt.get("alpha", 0.0))
  else:  # warmup_cosine (config_checks admits no other name)
    decay = opt.get("decay_steps", None) or total_units
    warmup = opt.get("warmup_steps", 0)
    if warmup >= decay:
      raise config_checks.ConfigError(
          f"optimizer.warmup_steps ({warmup}) must be smaller than the decay length ({decay})")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base, warmup_steps=warmup, decay_steps=decay,
        end_value=base * opt.get("alpha", 0.0))
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
  else:  # lars (config_checks admits no other name)
    tx = optax.lars(schedule, weight_decay=weight_decay, momentum=opt.get("momentum", 0.9))
  clip = opt.get("grad_clip_norm", None)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx
