#!/usr/bin/env bash
# Gemma-3-270M end to end (docs/results.md, "A second model"): the CKA heatmaps, the emulator
# comparison at k = 6, 8, 10 of its 14 middle layers, and a federated run with the emulator the
# comparison favours at k = 8. Needs `scripts/setup.sh --gemma`; about 45 minutes on 2 cores.
#   bash scripts/gemma.sh [out-folder]        (default: results/gemma)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gemma}
PY=${VENV:-.venv}/bin
DATA=../shared/data/instruct/alpaca_data.json
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr}
mkdir -p "$OUT"
stamp() { date +%s; }

t=$(stamp)
for skip in 1 0; do  # sink-aware (the default) and as published
  "$PY/fed-crash" similarity --model gemma3-270m --data "$DATA" --calib-samples 128 --skip-first $skip --max-length 128 \
    --out "$OUT/similarity-skip$skip" --no-progress
done
echo "similarity: $(( $(stamp) - t ))s"

t=$(stamp)
"$PY/fed-crash" emulator compare --model gemma3-270m --data "$DATA" --budgets 6 8 10 --compare-eval-examples 200 \
  --calib-samples 64 --search-samples 16 --search-evaluations 40 --max-length 128 --out "$OUT/compare" --no-progress
echo "compare: $(( $(stamp) - t ))s"

# the federated run: the method and sharing with the lowest zero-shot loss at k = 8
read -r METHOD SHARE SKIP < <("$PY/python" - "$OUT/compare/compare.json" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["budget"] == 8 and "emulator_loss" in r]
best = min(rows, key=lambda r: r["emulator_loss"])
method = "crash" if best["method"] in ("crash", "crash-sink") else best["method"]  # crash-sink is crash with skip-first 0
print(method, str(best["share"]).lower(), 0 if best["method"] == "crash-sink" else 1)
EOF
)
echo "federated run: method $METHOD, share $SHARE, skip-first $SKIP"
t=$(stamp)
"$PY/fed-crash" simulate --flwr-home "$FLWR_HOME" --num-supernodes 4 --run-config \
  "model='gemma3-270m' emulator.method='$METHOD' emulator.share=$SHARE emulator.skip-first=$SKIP emulator.keep=8 emulator.calib-samples=64 emulator.search-samples=16 emulator.search-evaluations=40 num-server-rounds=4 fraction-train=1.0 min-train-nodes=4 train.steps=10 train.lr=0.00003 eval-examples=64 results-dir='$OUT' run-name='federated'"
echo "federated: $(( $(stamp) - t ))s"
