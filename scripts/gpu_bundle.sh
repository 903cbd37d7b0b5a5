#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh needs on a GPU machine that has no Rust toolchain and no
# MPI (a lent, bare machine with the CUDA image): the release zaya and the test binaries with
# `--features mpi,nccl`, and this machine's Open MPI runtime, packed into .gpu/ (ignored by
# git; carry it with the call). Needs libopenmpi-dev / openmpi-bin here (as .ci/run installs).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu
rm -rf "$out" && mkdir -p "$out"
features="mpi,nccl"
cargo build --release -p zaya-cli --features "$features"
json=$(cargo test --release -p zaya-dist -p zaya-cli \
  --features "zaya-dist/mpi zaya-dist/nccl zaya-cli/mpi zaya-cli/nccl" \
  --test nccl_comm --test mpi_comm --test parallel_cli --test train_parallel_cli \
  --no-run --message-format json 2>/dev/null)
mkdir -p "$out/bin"
cp target/release/zaya "$out/bin/zaya"
for t in nccl_comm mpi_comm parallel_cli train_parallel_cli; do
  exe=$(printf '%s\n' "$json" | python3 -c "
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get('reason') == 'compiler-artifact' and m['target']['name'] == '$t' and m.get('executable'):
        print(m['executable'])" | tail -1)
  cp "$exe" "$out/bin/$t"
done
strip "$out"/bin/*
# the test binaries find zaya and the fixtures by the absolute paths they were built at
printf '%s\n' "$(pwd)" > "$out/built_at"
# Open MPI 4 and the libraries it loads, by package (the GPU machine's image has none)
pkgs="openmpi-bin libopenmpi3 openmpi-common libpmix2 libhwloc15 libevent-core-2.1-7 libevent-pthreads-2.1-7 libevent-2.1-7"
for p in $pkgs; do dpkg -L "$p"; done | sort -u | while read -r f; do
  if [ -f "$f" ] || [ -L "$f" ]; then echo "$f"; fi
done | grep -v -e '^/usr/share/doc' -e '^/usr/share/man' -e '^/usr/share/lintian' > "$out/ompi.files"
tar -czf "$out/ompi.tgz" -T "$out/ompi.files" 2>/dev/null
tar -czf "$out/bin.tgz" -C "$out" bin && rm -rf "$out/bin"
du -sh "$out"/*
