#!/usr/bin/env bash
# LoRA SFT at real size (issue 11): ZAYA1-8B-shaped random bf16 weights (streamed by
# `zaya init`, ~17.7 GB on disk), `zaya train --lora` with the base frozen in bf16 (and, with
# QUANT set, quantized while loading: QLoRA), gradient checkpointing every layer, batch 1 x
# 512 pre-tokenized random tokens; peak RSS (/usr/bin/time), seconds per step (median of the
# steps after the first) and tokens/s, as a table and JSON. zaya prints its own memory
# estimate before the base is loaded and refuses a run that will not fit.
#
#   scripts/bench_lora_8b.sh                      # bf16 base, then a q4_k base (the 8B run)
#   CONFIG=bench/configs/medium.json MODEL=/tmp/medium-bf16 STEPS=3 scripts/bench_lora_8b.sh
#
# Environment (defaults in brackets): CONFIG [bench/configs/zaya1-8b.json], MODEL
# [/work/bench-8b], OUT [$MODEL-lora-results], VARIANTS ["bf16 q4_k"] (bf16 = dense bf16
# base, anything else a --quant format), STEPS [4], SEQ_LEN [512], BATCH [1],
# LORA [r=16,alpha=32,targets=q_proj,k_proj,v_proj_current,v_proj_delayed,o_proj,experts],
# CHECKPOINTING [every], THREADS [all cores], ZAYA [target/release/zaya], LIMIT_S [5400 per run].
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-bench/configs/zaya1-8b.json}
MODEL=${MODEL:-/work/bench-8b}
OUT=${OUT:-$MODEL-lora-results}
VARIANTS=${VARIANTS:-bf16 q4_k}
STEPS=${STEPS:-4}
SEQ_LEN=${SEQ_LEN:-512}
BATCH=${BATCH:-1}
LORA=${LORA:-r=16,alpha=32,targets=q_proj,k_proj,v_proj_current,v_proj_delayed,o_proj,experts}
CHECKPOINTING=${CHECKPOINTING:-every}
THREADS=${THREADS:-$(nproc)}
ZAYA=${ZAYA:-target/release/zaya}
LIMIT_S=${LIMIT_S:-5400}
mkdir -p "$OUT"
export CANDLE_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS

[ -x "$ZAYA" ] || cargo build --release -p zaya-cli
if [ ! -f "$MODEL/config.json" ]; then
    echo "== zaya init (streaming, bf16) -> $MODEL"
    timeout "$LIMIT_S" "$ZAYA" init --config "$CONFIG" --dtype bf16 --out "$MODEL"
fi

# Pre-tokenized random tokens (the init model has no tokenizer): one example per row.
vocab=$(grep -o '"vocab_size": *[0-9]*' "$MODEL/config.json" | grep -o '[0-9]*$')
data="$OUT/data.jsonl"
awk -v n=$((STEPS * BATCH)) -v len="$SEQ_LEN" -v vocab="$vocab" 'BEGIN {
    srand(7);
    for (r = 0; r < n; r++) {
        printf "{\"input_ids\": [";
        for (i = 0; i < len; i++) printf "%s%d", (i ? ", " : ""), 4 + int(rand() * (vocab - 4));
        print "]}";
    }
}' > "$data"

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
rows=()
for v in $VARIANTS; do
    run="$OUT/run-$v"
    rm -rf "$run"
    base=(--dtype bf16)
    [ "$v" = bf16 ] || base=(--dtype bf16 --quant "$v")
    echo "== zaya train --lora $LORA ${base[*]} --checkpointing $CHECKPOINTING, $BATCH x $SEQ_LEN, $STEPS steps"
    set +e
    /usr/bin/time -v -o "$OUT/$v.time" timeout "$LIMIT_S" "$ZAYA" train --model "$MODEL" \
        --data "$data" --out "$run" --lora "$LORA" "${base[@]}" --checkpointing "$CHECKPOINTING" \
        --seq-len "$SEQ_LEN" --batch-size "$BATCH" --max-steps "$STEPS" --save-every 1000000 \
        --warmup-steps 0 --lr 1e-4 --no-progress 2> >(tee "$OUT/$v.log" >&2)
    rc=$?
    set -e
    rss_kib=$(awk -F: '/Maximum resident/ {gsub(/ /, "", $2); print $2}' "$OUT/$v.time")
    estimate=$(grep -m1 '^memory (' "$OUT/$v.log" | sed 's/.*total \([0-9.]*\) GiB.*/\1/' || true)
    if [ "$rc" -ne 0 ] || [ ! -f "$run/loss.csv" ]; then
        echo "run $v failed (exit $rc); see $OUT/$v.log" >&2
        rows+=("{\"variant\": \"$v\", \"exit\": $rc, \"peak_rss_mib\": $((${rss_kib:-0} >> 10))}")
        continue
    fi
    # seconds per step: median of the steps after the first (which also loads and warms up)
    spstep=$(awk -F, 'NR > 2 {print $9}' "$run/loss.csv" | sort -g |
        awk '{a[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}')
    first=$(awk -F, 'NR == 2 {print $9}' "$run/loss.csv")
    losses=$(awk -F, 'NR > 1 {printf "%s%s", (NR > 2 ? ", " : ""), $3}' "$run/loss.csv")
    tps=$(awk -v s="$spstep" -v t=$((SEQ_LEN * BATCH)) 'BEGIN {if (s > 0) printf "%.2f", t / s; else print "nan"}')
    rows+=("{\"variant\": \"$v\", \"exit\": 0, \"peak_rss_mib\": $((rss_kib >> 10)), \"estimate_gib\": ${estimate:-null}, \"seconds_per_step\": $spstep, \"first_step_seconds\": $first, \"tokens_per_second\": $tps, \"losses\": [$losses]}")
done

json="$OUT/lora_bench.json"
{
    echo "{\"config\": \"$CONFIG\", \"cpu\": \"$cpu\", \"threads\": $THREADS, \"batch\": $BATCH,"
    echo " \"seq_len\": $SEQ_LEN, \"steps\": $STEPS, \"lora\": \"$LORA\", \"checkpointing\": \"$CHECKPOINTING\","
    echo " \"runs\": [$(IFS=,; echo "${rows[*]}")]}"
} > "$json"
echo
echo "LoRA SFT, $CONFIG, batch $BATCH x $SEQ_LEN, checkpointing $CHECKPOINTING, $THREADS threads, $cpu"
printf '%-8s %14s %14s %14s %12s\n' base "peak RSS MiB" "estimate GiB" "s / step" "tok / s"
for r in "${rows[@]}"; do
    echo "$r" | awk '{
        match($0, /"variant": "[^"]*"/); v = substr($0, RSTART + 12, RLENGTH - 13);
        n = split("peak_rss_mib estimate_gib seconds_per_step tokens_per_second", k, " ");
        for (i = 1; i <= n; i++) {
            val[i] = "-";
            if (match($0, "\"" k[i] "\": [0-9.e+-]+")) { s = substr($0, RSTART, RLENGTH); sub(/.*: /, "", s); val[i] = s }
        }
        printf "%-8s %14s %14s %14s %12s\n", v, val[1], val[2], val[3], val[4]
    }'
done
echo "JSON: $json"
