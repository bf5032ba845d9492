#!/usr/bin/env bash
# Set up the environment and run the main job on the embedded defaults: the Flower simulation
# `simulations/alpaca` (SmolLM2-135M-Instruct, Alpaca shards, OFT's uniform emulator, FedAvg over
# 4 simulated clients, 2 sampled per round, 3 rounds) through `flwr run`. Results land in
# results/<method>-<strategy>-<timestamp>/. Extra arguments go to `fed-crash simulate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FED_CRASH_ROOT=$PWD   # relative run-config paths (data, results) resolve against the checkout
DATA=${FED_CRASH_DATA:-../shared/data/instruct/alpaca_data.json}
exec "${VENV:-.venv}/bin/fed-crash" simulate --num-supernodes 4 --run-config "data='$DATA'" "$@"
