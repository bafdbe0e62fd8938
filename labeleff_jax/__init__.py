"""labeleff_jax: label-efficient deep learning on multimodal Earth-observation data (ben-ge), in JAX/Flax."""

import os as _os
import platform as _platform
import sys as _sys

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


# glibc's malloc serves every block above 32 MB (the largest threshold it accepts) from fresh mmap'd 4 KiB
# pages and unmaps it on free. XLA:CPU allocates the temporary buffers of every execution that way, so each
# train step page-faults and zero-fills its whole working set again: ~320,000 faults per float32 U-Net step
# at batch 8 (2-core CPU), which cost the step 2.92 -> 2.36 s (measured, benchmarks/train_step.py). With the
# tunable glibc.malloc.hugetlb=1 (glibc >= 2.35) malloc asks for transparent huge pages, 512x fewer faults.
# glibc reads tunables once, at process start, so entry points (main.py, the benchmark workers) re-execute
# themselves with it; library users can export GLIBC_TUNABLES=glibc.malloc.hugetlb=1 themselves. Any
# GLIBC_TUNABLES that already mentions glibc.malloc.hugetlb (e.g. =0) is left alone.
HUGE_PAGE_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def _transparent_huge_pages_usable() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as setting:
      return "[never]" not in setting.read()
  except OSError:
    return False


def reexec_with_huge_page_malloc() -> None:
  """Re-executes this process (same interpreter, same argv) with glibc.malloc.hugetlb=1 when it helps.

  Does nothing off Linux/glibc, without transparent huge pages, or when GLIBC_TUNABLES already decides
  glibc.malloc.hugetlb (which also stops a second re-execution). Call it first thing in an entry point:
  the process is replaced, nothing after the call runs in the old one.
  """
  tunables = _os.environ.get("GLIBC_TUNABLES", "")
  if ("glibc.malloc.hugetlb" in tunables or _sys.platform != "linux"
      or _platform.libc_ver()[0] != "glibc" or not _transparent_huge_pages_usable()):
    return
  _os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, HUGE_PAGE_MALLOC_TUNABLE]))
  _sys.stdout.flush()
  _sys.stderr.flush()
  _os.execv(_sys.executable, [_sys.executable] + _sys.orig_argv[1:])
