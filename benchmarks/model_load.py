"""Cold GGUF load (de-quantize every tensor) against the cached safetensors load.

Each load runs in a fresh Python process, so nothing is shared through memory; the cold load
uses an empty cache folder and writes the cache that the next (cached) loads read.

    python benchmarks/model_load.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

PROBE = """
import sys, time, torch
from fed_crash.models import load_model
t = time.perf_counter()
loaded = load_model(sys.argv[1], cache_dir=sys.argv[2])
seconds = time.perf_counter() - t
ids = torch.tensor([[1, 2, 3, 4]])
print(seconds, float(loaded.model(ids).logits.double().sum()))
"""


def load_once(model: str, cache: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, model, cache], check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model source to load (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--repeats", type=int, default=3, help="cold/cached pairs to time (default: 3)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    cold, cached, same_logits = [], [], True
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            c, logits_cold = load_once(args.model, cache)
            w, logits_cached = load_once(args.model, cache)
        cold.append(c)
        cached.append(w)
        same_logits &= logits_cold == logits_cached
    result = {
        "model": args.model, "repeats": args.repeats,
        "cold_s_median": statistics.median(cold), "cached_s_median": statistics.median(cached),
        "speedup": statistics.median(cold) / statistics.median(cached), "identical_logits": same_logits,
        "cold_s": cold, "cached_s": cached,
    }
    print(f"{'load':<8} {'median s':>9}  runs")
    print(f"{'cold':<8} {result['cold_s_median']:>9.2f}  {', '.join(f'{x:.2f}' for x in cold)}")
    print(f"{'cached':<8} {result['cached_s_median']:>9.2f}  {', '.join(f'{x:.2f}' for x in cached)}")
    print(f"speed-up {result['speedup']:.1f}x, identical logits: {same_logits}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
