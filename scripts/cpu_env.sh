# The CPU environment recipe for labeleff_jax: source it in the shell that starts Python on a CPU host.
#
#   source scripts/cpu_env.sh && python main.py --config configs/supervised.py --workdir workdirs/s2
#
# What it sets, and why (measurements: docs/performance_cpu.md):
# - LD_PRELOAD of tcmalloc, a caching allocator (Debian/Ubuntu: apt-get install libtcmalloc-minimal4;
#   conda: gperftools). XLA:CPU allocates every step's temporary buffers anew (about 1 GB for the reference
#   U-Net at batch 8); glibc's malloc hands blocks that large back to the kernel when they are freed, so the
#   next step page-faults them in again, and on VMs whose host reclaims freed memory it waits for the host
#   too. tcmalloc keeps them in the process. PyTorch's and TensorFlow's CPU performance guides recommend
#   the same.
# - TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD: silences tcmalloc's "large alloc" notices for those blocks.
#
# It changes nothing when tcmalloc is not installed (it says so), and nothing on GPU or TPU hosts needs it.
# Library code never sets any of this itself: an allocator can only be chosen before the process starts.

_labeleff_tcmalloc=""
for _labeleff_candidate in \
    "$(ldconfig -p 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 /{print $NF; exit}')" \
    "$(ldconfig -p 2>/dev/null | awk '/libtcmalloc\.so\.4 /{print $NF; exit}')" \
    "${CONDA_PREFIX:+$CONDA_PREFIX/lib/libtcmalloc_minimal.so.4}"; do
  if [ -n "$_labeleff_candidate" ] && [ -f "$_labeleff_candidate" ]; then
    _labeleff_tcmalloc="$_labeleff_candidate"
    break
  fi
done

if [ -n "$_labeleff_tcmalloc" ]; then
  case ":${LD_PRELOAD:-}:" in
    *":$_labeleff_tcmalloc:"*) ;;  # sourced twice: already there
    *) export LD_PRELOAD="${LD_PRELOAD:+$LD_PRELOAD:}$_labeleff_tcmalloc" ;;
  esac
  export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD="${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-107374182400}"
  echo "cpu_env.sh: LD_PRELOAD=$LD_PRELOAD" >&2
else
  echo "cpu_env.sh: tcmalloc not found; install it (apt-get install libtcmalloc-minimal4, or conda install" \
       "gperftools) and source this file again. Nothing was changed." >&2
fi
unset _labeleff_tcmalloc _labeleff_candidate
