#!/usr/bin/env bash
# The four-model tables of docs/results.md: tune a uniform and a CRaSh emulator of the default
# model on Alpaca (2+18+2 layers, no sharing, 100 steps), then evaluate full zero-shot,
# emulator zero-shot, emulator fine-tuned and plug-in on ARC-Easy and PIQA (seeded samples of
# 200) and on 100 held-out Alpaca rows. The CRaSh report reuses the full model's scores.
#   bash scripts/four_model.sh [OUT]          (about an hour on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/four-model}
DATA=../shared/data/instruct/alpaca_data.json
EVAL=../shared/data/eval
STEPS=${STEPS:-100}
LIMIT=${LIMIT:-200}
tune() {
  [ -f "$OUT/$1/adapters.safetensors" ] || .venv/bin/fed-crash tune --data "$DATA" --method "$1" --bottom 2 --top 2 --keep 18 \
      --no-share --calib-samples 128 --steps "$STEPS" --lr 1e-4 --max-length 256 --train-examples 2000 --eval-examples 100 \
      --out "$OUT/$1" --no-progress
}
report() {
  [ -f "$OUT/$1/report/report.json" ] || .venv/bin/fed-crash report --emulator "$OUT/$1/emulator" \
      --adapters "$OUT/$1/adapters.safetensors" --task "$EVAL/arc_easy.jsonl" --task "$EVAL/piqa.jsonl" --limit "$LIMIT" \
      --data "$DATA" --max-length 256 --instruct-examples 100 --out "$OUT/$1/report" --no-progress "${@:2}"
}
tune uniform
report uniform
tune crash
report crash --full-from "$OUT/uniform/report/report.json"
for method in uniform crash; do echo "## $method"; cat "$OUT/$method/report/report.md"; done
