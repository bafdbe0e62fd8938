"""labeleff_jax: label-efficient deep learning on multimodal Earth-observation data (ben-ge), in JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU's default scheduler orders a program for concurrency "by trading off extra memory pressure". For
# the reference U-Net train step (benchmarks/train_step.py, 2-core CPU) turning it off cut peak RSS from
# 3.6 to 1.6 GiB at batch 8 and from 11.4 to 3.5 GiB at batch 32, and made the step 8 % and 29 % faster
# (less memory traffic), with bit-identical losses and gradients. XLA reads XLA_FLAGS once, when jax starts
# its first backend, and this option has no effect as a per-jit compiler option (measured), so it is added
# here, on import, unless XLA_FLAGS already sets it. Other platforms ignore xla_cpu_* flags.
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def _add_default_xla_flags() -> None:
  flags = _os.environ.get("XLA_FLAGS", "")
  for flag in CPU_XLA_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  _os.environ["XLA_FLAGS"] = flags


_add_default_xla_flags()
