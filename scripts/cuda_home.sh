# Sourced by the scripts that build the CUDA kernels: sets CUDA_HOME, when
# unset, to the toolkit that the nvcc on PATH belongs to. nvcc may be a
# wrapper script elsewhere on PATH, so ask nvcc itself where the toolkit is.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  CUDA_HOME=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  CUDA_HOME=$(readlink -f "$CUDA_HOME")
  export CUDA_HOME
fi
