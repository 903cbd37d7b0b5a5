#!/usr/bin/env bash
# The real-size benchmark of issue 8: ZAYA1-8B-shaped random bf16 weights (streamed by
# `zaya init`, ~17.7 GB on disk), `zaya bench --dtype bf16` and transformers 5.23 in bf16 on
# the same checkpoint, one after the other (each needs ~18 GB of RAM at 8B), then the
# side-by-side table (printed) and both results as JSON.
#
#   scripts/bench_8b.sh                                   # the 8B run (needs >= 20 GB free)
#   CONFIG=bench/configs/medium.json MODEL=/tmp/medium-bf16 scripts/bench_8b.sh   # a dry run
#
# Environment (defaults in brackets): CONFIG [bench/configs/zaya1-8b.json], MODEL
# [/work/bench-8b], OUT [$MODEL-results], THREADS [all cores], ATTN [sdpa], PREFILL_LEN [512],
# PROMPT_LEN [32], NEW_TOKENS [32], REPEATS [1], ZAYA [target/release/zaya], PYTHON
# [/work/venv/bin/python], LIMIT_S [3600, per step].
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-bench/configs/zaya1-8b.json}
MODEL=${MODEL:-/work/bench-8b}
OUT=${OUT:-$MODEL-results}
THREADS=${THREADS:-$(nproc)}
ATTN=${ATTN:-sdpa}
PREFILL_LEN=${PREFILL_LEN:-512}
PROMPT_LEN=${PROMPT_LEN:-32}
NEW_TOKENS=${NEW_TOKENS:-32}
REPEATS=${REPEATS:-1}
ZAYA=${ZAYA:-target/release/zaya}
PYTHON=${PYTHON:-/work/venv/bin/python}
LIMIT_S=${LIMIT_S:-3600}
mkdir -p "$OUT"

[ -x "$ZAYA" ] || cargo build --release -p zaya-cli
if [ ! -f "$MODEL/config.json" ]; then
    echo "== zaya init (streaming, bf16) -> $MODEL"
    /usr/bin/time -v -o "$OUT/init.time" timeout "$LIMIT_S" \
        "$ZAYA" init --config "$CONFIG" --dtype bf16 --out "$MODEL"
    grep -E "Elapsed|Maximum resident" "$OUT/init.time"
fi

# Both runs need the weights in memory once; say so up front rather than be OOM-killed.
# In KiB: awk's printf "%d" saturates at 2^31 - 1 under mawk, so bytes would read as 2 GiB.
need=$(du -sk "$MODEL" | cut -f1)
avail=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
echo "== weights on disk: $((need >> 10)) MiB, MemAvailable: $((avail >> 10)) MiB"
if [ "$avail" -lt "$need" ]; then
    echo "not enough memory for the weights; stopping (zaya would refuse to load too)" >&2
    exit 2
fi

common=(--threads "$THREADS" --prefill-len "$PREFILL_LEN" --prompt-len "$PROMPT_LEN"
        --new-tokens "$NEW_TOKENS" --repeats "$REPEATS")
echo "== zaya bench --dtype bf16 --attn $ATTN"
timeout "$LIMIT_S" "$ZAYA" bench --model "$MODEL" --dtype bf16 --attn "$ATTN" "${common[@]}" \
    --json "$OUT/zaya.json"
echo "== transformers 5.23, bf16, attn $ATTN"
timeout "$LIMIT_S" "$PYTHON" scripts/bench_reference.py --model "$MODEL" --dtype bf16 \
    --attn "$ATTN" "${common[@]}" --zaya-json "$OUT/zaya.json" --json "$OUT/bench.json"
echo "== results: $OUT/bench.json (CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
