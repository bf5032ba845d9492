"""What a federation leaves on disk and nothing else removes: the emulators nodes cached
(hundreds of MB each for the default model) and every round's adapters of a run.
``fed-crash prune`` calls these; run it when no federation uses the folders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from fed_crash.federation.checkpoint import CHECKPOINT

_ROUND_FILE = re.compile(r"^round-(\d+)(\.optimizer)?\.safetensors$")


def prune_node_caches(root: Path) -> list[Path]:
    """Remove every ``node-*`` folder (a node's received emulators) under ``root``; returns them."""
    removed = sorted(p for p in root.glob("node-*") if p.is_dir()) if root.is_dir() else []
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def prune_rounds(run_dir: Path, keep_last: int = 1) -> list[Path]:
    """Remove the per-round adapter files of a run except round 0, the last ``keep_last``
    rounds and the round its checkpoint names (so ``resume=true`` still works); ``final`` and
    the emulator stay. Returns what was removed."""
    files = {p: int(m.group(1)) for p in (run_dir / "adapters").glob("round-*.safetensors") if (m := _ROUND_FILE.match(p.name))}
    rounds = sorted(set(files.values()))
    keep = {0, *rounds[len(rounds) - keep_last:]} if keep_last > 0 else {0}
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.is_file():
        keep.add(json.loads(checkpoint.read_text())["round"])
    removed = sorted(p for p, r in files.items() if r not in keep)
    for path in removed:
        path.unlink()
    return removed
