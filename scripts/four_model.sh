#!/usr/bin/env bash
# The four-model table of docs/results.md: tune a uniform and a CRaSh emulator of the default
# model on Alpaca, then evaluate full zero-shot, emulator zero-shot, emulator fine-tuned and
# plug-in on ARC-Easy and PIQA (seeded samples) and on held-out Alpaca loss.
#   bash scripts/four_model.sh [OUT]          (about an hour on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/four-model}
DATA=../shared/data/instruct/alpaca_data.json
EVAL=../shared/data/eval
STEPS=${STEPS:-150}
LIMIT=${LIMIT:-200}
for method in uniform crash; do
  [ -f "$OUT/$method/adapters.safetensors" ] || .venv/bin/fed-crash tune --data "$DATA" --method "$method" --bottom 2 --top 2 --keep 18 \
      --no-share --calib-samples 128 --steps "$STEPS" --lr 1e-4 --max-length 256 --train-examples 2000 --eval-examples 100 \
      --out "$OUT/$method" --no-progress
  [ -f "$OUT/$method/report/report.json" ] || .venv/bin/fed-crash report --emulator "$OUT/$method/emulator" \
      --adapters "$OUT/$method/adapters.safetensors" --task "$EVAL/arc_easy.jsonl" --task "$EVAL/piqa.jsonl" --limit "$LIMIT" \
      --data "$DATA" --max-length 256 --instruct-examples 100 --out "$OUT/$method/report" --no-progress
done
for method in uniform crash; do echo "## $method"; cat "$OUT/$method/report/report.md"; done
