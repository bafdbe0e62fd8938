"""Tests of the process-level settings labeleff_jax applies: XLA flags on import, the malloc re-execution."""

import os
import subprocess
import sys

import labeleff_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import os, labeleff_jax; labeleff_jax.reexec_with_huge_page_malloc(); "
         "print(os.environ.get('GLIBC_TUNABLES', '') + '|' + os.environ['XLA_FLAGS'])")


def run_probe(**env_updates) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
  env.update(env_updates)
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                       check=True, timeout=120).stdout
  assert len(out.splitlines()) == 1, out  # the replaced process printed nothing
  return out.strip().split("|")


def test_reexec_sets_huge_page_malloc_once_and_keeps_flags():
  tunables, xla_flags = run_probe(XLA_FLAGS="--xla_cpu_use_onednn=false")
  usable = (sys.platform == "linux" and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
            and labeleff_jax._transparent_huge_pages_usable())  # pylint: disable=protected-access
  assert tunables == (labeleff_jax.HUGE_PAGE_MALLOC_TUNABLE if usable else "")
  assert xla_flags.split() == ["--xla_cpu_use_onednn=false", *labeleff_jax.CPU_XLA_FLAGS]


def test_reexec_respects_an_explicit_choice():
  assert run_probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")[0] == "glibc.malloc.hugetlb=0"
  tunables = run_probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0]
  assert tunables.split(":")[0] == "glibc.malloc.arena_max=2"
