#!/usr/bin/env bash
# The README's "Quantized weights" quality table: quantizes the embedded default model in
# each row's format (with or without calibration) and scores it against the f32 model on
# held-out text with `zaya eval`. Prints a Markdown table and writes every eval report as
# JSON.
#
#   scripts/quant_quality.sh [OUT.json]
#
# The calibration text is the default model's training corpus (Genesis, one chapter per
# line of data/corpus/genesis-kjv.jsonl) written as one line, chapters joined by spaces:
# the same form as the held-out text (Exodus 1–10, verses joined by spaces). Calibrating
# on another form of the text (e.g. chapters on lines of their own) costs the GPTQ rows:
# q8_0 with the embedding kept measured KL 2.6e-4 / top-1 99.45 % that way against
# 5e-5–3.5e-4 / 99.50–99.54 % with the matching form.
#
# Environment: ZAYA (binary, default target/release/zaya, built if missing), MODEL
# (default models/default), TEXT (held-out text), CALIBRATION (a calibration text instead
# of the Genesis one), TOKENS / CONTEXT (calibration tokens and window, default: the
# command's own defaults), ROWS (a file of "label|quantize options" lines instead of the
# built-in list; CAL in the options stands for the calibration text, whose path must not
# contain spaces; lines starting with # are skipped).
set -euo pipefail
here=$PWD
abs() { case "$1" in /*) echo "$1" ;; *) echo "$here/$1" ;; esac; }
# paths given by the caller are relative to where it runs, the defaults to the repository
[ -n "${1:-}" ] && OUT=$(abs "$1")
[ -n "${ZAYA:-}" ] && ZAYA=$(abs "$ZAYA")
[ -n "${MODEL:-}" ] && MODEL=$(abs "$MODEL")
[ -n "${TEXT:-}" ] && TEXT=$(abs "$TEXT")
[ -n "${CALIBRATION:-}" ] && CALIBRATION=$(abs "$CALIBRATION")
[ -n "${ROWS:-}" ] && ROWS=$(abs "$ROWS")
cd "$(dirname "$0")/.."

OUT=${OUT:-bench/results/quant-quality-$(date -u +%Y-%m-%d).json}
MODEL=${MODEL:-models/default}
TEXT=${TEXT:-data/eval/exodus-1-10.txt}
if [ -z "${ZAYA:-}" ]; then
    cargo build --release -p zaya-cli # a no-op when the binary is current
    ZAYA=target/release/zaya
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
CAL=${CALIBRATION:-$work/genesis.txt}
if [ -z "${CALIBRATION:-}" ]; then
    python3 -c 'import json,sys; print(" ".join(json.loads(l)["text"] for l in open(sys.argv[1])), end="")' \
        data/corpus/genesis-kjv.jsonl >"$CAL"
fi
calib=()
[ -n "${TOKENS:-}" ] && calib+=(--calibration-tokens "$TOKENS")
[ -n "${CONTEXT:-}" ] && calib+=(--calibration-context "$CONTEXT")

default_rows() {
    cat <<EOF
q8_0|--format q8_0
q8_0, lookup kept|--format q8_0 --embed-format keep
q8_0, embedding and head kept|--format q8_0 --embed-format keep --head-format keep
q6_k|--format q6_k
q5_k|--format q5_k
q4_k|--format q4_k
q4_k_m|--format q4_k_m
q4_k_m, lookup kept|--format q4_k_m --embed-format keep
q5_k_m|--format q5_k_m
q4_0|--format q4_0
q3_k|--format q3_k
q2_k|--format q2_k
q4_k --imatrix|--format q4_k --imatrix CAL
q4_k_m --imatrix|--format q4_k_m --imatrix CAL
q4_0 --imatrix|--format q4_0 --imatrix CAL
q3_k --imatrix|--format q3_k --imatrix CAL
q2_k --imatrix|--format q2_k --imatrix CAL
q8_0 --gptq|--format q8_0 --gptq CAL
q8_0, lookup kept, --gptq|--format q8_0 --embed-format keep --gptq CAL
q8_0, embedding and head kept, --gptq|--format q8_0 --embed-format keep --head-format keep --gptq CAL
q6_k --gptq|--format q6_k --gptq CAL
q5_k_m --gptq|--format q5_k_m --gptq CAL
q4_k --gptq|--format q4_k --gptq CAL
q4_k_m --gptq|--format q4_k_m --gptq CAL
q4_k_m, lookup kept, --gptq|--format q4_k_m --embed-format keep --gptq CAL
q4_0 --gptq|--format q4_0 --gptq CAL
EOF
}

echo "| format | weight bytes | bytes / token | perplexity | mean KL | median KL | rerouted | top-1 agreement |"
echo "|---|---|---|---|---|---|---|---|"
: >"$work/reports.jsonl"
while IFS='|' read -r label opts; do
    [ -z "$label" ] || [[ "$label" == \#* ]] && continue
    # shellcheck disable=SC2206 # the options are words on purpose
    args=(${opts//CAL/$CAL})
    extra=()
    [[ "$opts" == *CAL* ]] && extra=(${calib[@]+"${calib[@]}"})
    "$ZAYA" quantize --model "$MODEL" --out "$work/q.gguf" "${args[@]}" ${extra[@]+"${extra[@]}"} \
        </dev/null >/dev/null 2>"$work/quantize.log" || { cat "$work/quantize.log" >&2; exit 1; }
    "$ZAYA" eval --model "$work/q.gguf" --reference "$MODEL" --text "$TEXT" </dev/null >"$work/r.json"
    python3 - "$label" "$opts" "$work/r.json" "$work/reports.jsonl" <<'PY'
import json, sys
label, opts, path, out = sys.argv[1:]
d = json.load(open(path))
d["label"], d["options"] = label, opts
open(out, "a").write(json.dumps(d) + "\n")
print("| %s | %.2f M | %.2f M | %.1f | %.1e | %.1e | %d | %.2f %% |" % (
    label, d["weight_bytes"] / 1e6, d["bytes_per_token"] / 1e6, d["perplexity"],
    d["mean_kl"], d["kl_median"], round(d["rerouted"] * d["tokens"]),
    100 * d["top1_agreement"]))
PY
done < <(if [ -n "${ROWS:-}" ]; then cat "$ROWS"; else default_rows; fi)

mkdir -p "$(dirname "$OUT")"
python3 - "$work/reports.jsonl" "$OUT" "$(lscpu | sed -n 's/^Model name: *//p')" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
json.dump({"cpu": sys.argv[3], "rows": rows}, open(sys.argv[2], "w"), indent=1)
PY
echo "JSON: $OUT" >&2
