#!/usr/bin/env bash
# Set up the environment and run the main job on the embedded defaults: local offsite-tuning of
# SmolLM2-135M-Instruct on Alpaca with a CRaSh emulator, printing the four-model report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${FED_CRASH_DATA:-../shared/data/instruct/alpaca_data.json}
exec "${VENV:-.venv}/bin/fed-crash" tune --data "$DATA" --method crash --calib-samples 128 \
  --train-examples 400 --eval-examples 64 --steps 60 --lr 1e-4 --no-share --out results/demo-tune "$@"
