#!/usr/bin/env bash
# The NCCL checks, run on a lent GPU machine (bare CUDA image: no Rust, no MPI):
#   here:  bash scripts/gpu_bundle.sh        (builds .gpu/: binaries + Open MPI runtime)
#   there: bash scripts/gpu_check.sh         (with .gpu carried; logs under $OUT)
# Runs the NCCL backend test (2 and 4 processes) and the MPI-process CLI tests with
# `--collectives nccl` (forward with captures, training under TP / PP / DP against one
# process). With fewer GPUs than ranks every rank names itself a host of its own
# (NCCL_HOSTID): NCCL then accepts several ranks on one GPU and joins them over sockets.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc

# the binaries and the repository at the path they were built at (fixtures, CARGO_BIN_EXE)
tar -xzf .gpu/bin.tgz -C /tmp
built=$(cat .gpu/built_at)
if [ "$(pwd -P)" != "$built" ] && [ ! -e "$built" ]; then
  mkdir -p "$(dirname "$built")" && ln -s "$(pwd -P)" "$built"
fi
mkdir -p "$built/target/release" && cp /tmp/bin/zaya "$built/target/release/zaya"

# Open MPI 4 (the binaries link libmpi.so.40)
if [ ! -x /usr/bin/mpirun.openmpi ]; then tar -xzf .gpu/ompi.tgz -C / && ldconfig; fi
mkdir -p /tmp/gpubin
cat > /tmp/gpubin/hostid-exec <<'SH'
#!/bin/sh
export NCCL_HOSTID="zaya-rank-${OMPI_COMM_WORLD_RANK}"
exec "$@"
SH
cat > /tmp/gpubin/mpirun <<'SH'
#!/usr/bin/env bash
# mpirun whose ranks each get a host id of their own (several NCCL ranks on one GPU)
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|-np|--np) args+=("$1" "$2"); shift 2 ;;
    -*) args+=("$1"); shift ;;
    *) break ;;
  esac
done
exec /usr/bin/mpirun.openmpi "${args[@]}" /tmp/gpubin/hostid-exec "$@"
SH
chmod +x /tmp/gpubin/*
export PATH=/tmp/gpubin:$PATH
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_mca_base_component_show_load_errors=0 OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_mtl='^ofi,psm,psm2' OMPI_MCA_osc='^ucx'

# libnccl as cudarc looks for it (libnccl.so), libcuda from the driver
nccl=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib'))" 2>/dev/null)
[ -e "$nccl/libnccl.so.2" ] || nccl=$(dirname "$(find / -name 'libnccl.so.2' -not -path '/proc/*' 2>/dev/null | head -1)")
mkdir -p /tmp/ncclib && ln -sf "$nccl/libnccl.so.2" /tmp/ncclib/libnccl.so
export LD_LIBRARY_PATH=/tmp/ncclib:${LD_LIBRARY_PATH:-}
if ! ldconfig -p | grep -q 'libcuda.so'; then
  cuda=$(dirname "$(find / -name 'libcuda.so.1' -not -path '/proc/*' 2>/dev/null | head -1)")
  export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$cuda
fi
export NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 NCCL_DEBUG=${NCCL_DEBUG:-VERSION}
echo "libnccl: $(readlink -f /tmp/ncclib/libnccl.so)"
mpirun --version | head -1

status=0
check() { # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  printf '%-28s rc %-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" \
    "$(grep -E '^test result|NCCL version' "$OUT/$name.log" | sort -u | head -2 | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
}
check nccl_comm 150 /tmp/bin/nccl_comm --ignored --nocapture --test-threads 1
export ZAYA_TEST_COLLECTIVES=nccl
check forward_launch 80 /tmp/bin/parallel_cli launch_on_mpi_processes_equals_local_ranks --exact
check train_tp2 100 /tmp/bin/train_parallel_cli tp2_mpi_processes_reproduce_the_single_process_run --exact
check train_pp2_dp2 100 /tmp/bin/train_parallel_cli pp2_dp2_mpi_processes_reproduce_the_single_process_run --exact
check train_tp2_pp2 120 /tmp/bin/train_parallel_cli tp2_pp2_mpi_processes_reproduce_the_single_process_run_and_resume --exact
exit $status
