"""Model load: cold GGUF load (de-quantize every tensor, write the safetensors cache) against
the cached load (read the safetensors cache).

Each load runs in a fresh process, so nothing is shared through memory (interpreter and
library imports are excluded from the timing); per repeat the cold load starts from an empty
cache folder and writes the cache that the cached load of the same repeat reads. Both loads'
logits on a fixed input are compared. The figure is the median over repeats of cold / cached.

    python benchmarks/model_load.py --repeats 3

Goal: the cached load at least 5x faster.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL = 5.0


def child(payload: dict) -> None:
    """One load from ``payload['cache']`` (runs in a fresh process)."""
    import torch

    from fed_crash.core.models import load_model

    start = time.perf_counter()
    loaded = load_model(payload["model"], cache_dir=payload["cache"])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = float(loaded.model(torch.tensor([[1, 2, 3, 4]])).logits.double().sum())
    common.emit({"seconds": seconds, "logits": logits, "peak_mib": common.peak_rss_mib()})


def main() -> None:
    p = common.parser(__doc__, "model_load")
    p.add_argument("--model", default="smollm2", help="model source to load (default: the embedded SmolLM2 GGUF)")
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    repeats = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            cold = common.run_child(__file__, {"model": args.model, "cache": cache})
            cached = common.run_child(__file__, {"model": args.model, "cache": cache})
        repeats.append({"cold_s": cold["seconds"], "cached_s": cached["seconds"], "ratio": cold["seconds"] / cached["seconds"],
                        "identical_logits": cold["logits"] == cached["logits"], "cold_peak_mib": cold["peak_mib"], "cached_peak_mib": cached["peak_mib"]})
        print(f"repeat {r + 1}: cold {cold['seconds']:.2f} s, cached {cached['seconds']:.2f} s", flush=True)
    ratio = common.median(x["ratio"] for x in repeats)
    identical = all(x["identical_logits"] for x in repeats)
    rows = [(i + 1, f"{x['cold_s']:.2f}", f"{x['cached_s']:.2f}", f"{x['ratio']:.1f}x", f"{x['cold_peak_mib']:.0f}", f"{x['cached_peak_mib']:.0f}")
            for i, x in enumerate(repeats)]
    rows.append(("median", f"{common.median(x['cold_s'] for x in repeats):.2f}", f"{common.median(x['cached_s'] for x in repeats):.2f}", f"**{ratio:.1f}x**",
                 f"{common.median(x['cold_peak_mib'] for x in repeats):.0f}", f"{common.median(x['cached_peak_mib'] for x in repeats):.0f}"))
    text = common.table(["repeat", "cold: de-quantize GGUF, write cache (s)", "cached: read safetensors (s)", "cold / cached", "cold peak RSS (MiB)",
                         "cached peak RSS (MiB)"], rows)
    text += f"\n\nIdentical logits: {identical}. Goal: cached at least {GOAL:.0f}x faster: {'met' if ratio >= GOAL else 'NOT met'} ({ratio:.1f}x)."
    common.finish(args, "model_load", {"ratio": ratio, "goal": GOAL, "met": ratio >= GOAL, "identical_logits": identical, "repeats_detail": repeats}, text)


if __name__ == "__main__":
    main()
