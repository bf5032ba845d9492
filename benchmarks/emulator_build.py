"""Emulator build: CRaSh's CKA clustering against one forward pass over the same calibration
data, its lower bound (CKA needs every layer's output on every calibration sample).

In one process, on the default model: per repeat, in alternating order, (a) the server's
`plan_emulator` with method crash (tokenize the calibration rows, run them through the model
with hooks that pool every decoder layer's output, the CKA matrix, the clustering) and (b) the
lower bound: tokenize the same rows and run them once through the decoder (no hooks, no
gradients, no LM head, which CKA does not need). The full causal-LM forward (with the LM head)
is timed as well, for reference. The calibration rows are the app's server-held slice of
Alpaca; length, batch size and pooling are the app's. The figure is the median over repeats
of (a) / (b); one untimed forward first warms the process up.

    python benchmarks/emulator_build.py --repeats 3 --calib-samples 128

Goal: at most 1.5x.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL = 1.5


def main() -> None:
    p = common.parser(__doc__, "emulator_build")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration rows (default: 128)")
    args = p.parse_args()

    import torch

    from fed_crash.core.data import batches, pad_id, tokenize
    from fed_crash.core.models import load_model
    from fed_crash.selection.plan import calibration_rows, plan_emulator

    cfg = common.run_config({"emulator.method": "crash", "emulator.calib-samples": args.calib_samples})
    loaded = load_model(cfg.fed.model, device="auto")
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = calibration_rows(str(common.ALPACA), cfg.data, args.calib_samples)  # in memory: neither side reads the file

    def token_batches() -> list[dict]:
        examples = tokenize(rows, tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
        return list(batches(examples, cfg.emulator.calib_batch_size, pad_id(tokenizer)))

    @torch.no_grad()
    def forward(lm_head: bool) -> float:
        start = time.perf_counter()
        net = model if lm_head else model.base_model
        device = next(model.parameters()).device
        for batch in token_batches():
            net(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
        return time.perf_counter() - start

    def crash() -> tuple[float, list]:
        start = time.perf_counter()
        spec, _ = plan_emulator(model, tokenizer, rows, cfg.data, cfg.emulator, progress=False)
        return time.perf_counter() - start, [list(c) for c in spec.clusters]

    def uniform() -> float:
        start = time.perf_counter()
        plan_emulator(model, tokenizer, [], cfg.data, replace(cfg.emulator, method="uniform"), progress=False)
        return time.perf_counter() - start

    forward(False)  # warm-up
    repeats = []
    for r in range(args.repeats):
        if r % 2 == 0:
            cka_s, clusters = crash()
            decoder_s, full_s = forward(False), forward(True)
        else:
            decoder_s, full_s = forward(False), forward(True)
            cka_s, clusters = crash()
        repeats.append({"crash_s": cka_s, "decoder_forward_s": decoder_s, "full_forward_s": full_s, "ratio": cka_s / decoder_s,
                        "ratio_full": cka_s / full_s, "clusters": clusters})
        print(f"repeat {r + 1}: CRaSh {cka_s:.2f} s, decoder forward {decoder_s:.2f} s, ratio {cka_s / decoder_s:.3f}", flush=True)
    ratio = common.median(x["ratio"] for x in repeats)
    uniform_s = uniform()
    rows_out = [(i + 1, f"{x['crash_s']:.2f}", f"{x['decoder_forward_s']:.2f}", f"{x['full_forward_s']:.2f}", f"{x['ratio']:.3f}x", f"{x['ratio_full']:.3f}x")
                for i, x in enumerate(repeats)]
    rows_out.append(("median", f"{common.median(x['crash_s'] for x in repeats):.2f}", f"{common.median(x['decoder_forward_s'] for x in repeats):.2f}",
                     f"{common.median(x['full_forward_s'] for x in repeats):.2f}", f"**{ratio:.3f}x**", f"{common.median(x['ratio_full'] for x in repeats):.3f}x"))
    text = common.table(["repeat", "CRaSh plan (s)", "one decoder forward (s)", "one full forward, LM head (s)", "CRaSh / decoder forward",
                         "CRaSh / full forward"], rows_out)
    text += (f"\n\n{len(rows)} calibration rows, max length {cfg.data.max_length}, batch {cfg.emulator.calib_batch_size}, pooling "
             f"{cfg.emulator.pooling} (skip-first {cfg.emulator.skip_first}); uniform (OFT) plans in {uniform_s * 1000:.1f} ms. "
             f"Goal: at most {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'} ({ratio:.3f}x).")
    common.finish(args, "emulator_build", {"ratio": ratio, "goal": GOAL, "met": ratio <= GOAL, "uniform_s": uniform_s, "repeats_detail": repeats}, text)


if __name__ == "__main__":
    main()
