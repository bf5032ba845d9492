"""Framework overhead: seconds per local training step inside a Flower client under Ray,
against the same steps in a plain PyTorch loop on the same emulator and the same batches.

Each repeat is one real `flwr run` of the app on the default model (one supernode whose Ray
actor gets --cpus cores, one round of --steps steps; the app's emulator, batch size and
length). In this process, a plain loop (response-token loss, backward, gradient clipping,
AdamW step) runs over exactly the batches the client trained on (its shard and seed; the first
step's loss must match the client's) on the same emulator (an emulator folder cut the way the
app cuts it, checked byte for byte against the run's by content hash), with as many torch
threads as the client had. Runs and plain loops alternate, plain first and last, and each
client is compared with the mean of the plain loops right before and after it, so that slow
drifts of a shared machine's load cancel. Both sides time the same span of every step and take
the median after the first step (which pays for lazy allocations): one-time costs (model load,
emulator transfer, tokenization) are excluded. The figure is the median over repeats of
client step / plain step. Ray's workers run at niceness 0 like this process (see
common.run_app).

    python benchmarks/overhead.py --repeats 3 --steps 8 --cpus 1

Goal: at most 1.10x. With --cpus set to every core of the machine, the client shares its cores
with the SuperLink's and Ray's own processes (about 8% of a core while it trains; see
benchmarks/cpu_shares.py), and its steps are that much slower.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL = 1.10


def plain_steps(folder: Path, overrides: dict, threads: int) -> tuple[list[float], float]:
    """Seconds per step of a plain loop over the batches client 0 of 1 trains on in round 1,
    and the first step's loss (equal to the client's when the batches and weights are)."""
    import torch

    from fed_crash.core.artifacts import load_emulator
    from fed_crash.core.data import batches, load_instructions, pad_id, tokenize
    from fed_crash.federation.partition import calibration_slice
    from fed_crash.federation.partition import client_shard, server_and_client_rows
    from fed_crash.core.train import response_loss

    torch.set_num_threads(threads)
    cfg = common.run_config(overrides)
    emulator, tokenizer, _ = load_emulator(folder)
    pool = server_and_client_rows(load_instructions(cfg.data.data), cfg.fed, cfg.data, calibration_slice(cfg))["clients"]
    examples = tokenize(client_shard(pool, cfg.fed, 0, 1, seed=cfg.data.seed), tokenizer, max_length=cfg.data.max_length, template=cfg.data.template)
    train = replace(cfg.train, seed=cfg.train.seed + 1000 * 1 + 0)  # what the client's train handler uses in round 1 for partition 0
    torch.manual_seed(train.seed)
    params = emulator.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    model = emulator.model
    model.train()
    times, losses = [], []
    for batch in batches(examples, train.batch_size, pad_id(tokenizer), shuffle=True, seed=train.seed):
        start = time.perf_counter()
        loss_sum, n = response_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        losses.append(float(loss_sum.detach()) / max(n, 1))
        times.append(time.perf_counter() - start)
        if len(times) == train.steps:
            break
    return times, losses[0]


def main() -> None:
    from fed_crash.core.artifacts import read_manifest

    p = common.parser(__doc__, "overhead")
    p.add_argument("--steps", type=int, default=12, help="local steps per run; the median is over all but the first (default: 12)")
    p.add_argument("--cpus", type=int, default=1, help="cores of the client's Ray actor and torch threads of both sides (default: 1, the app's client resources; the machine's count gives one client every core)")
    args = p.parse_args()
    work = Path(args.work)
    overrides = {"data": str(common.ALPACA), "num-server-rounds": 1, "fraction-train": 1.0, "min-train-nodes": 1, "min-available-nodes": 1,
                 "eval-examples": 8, "save-model": False, "train.steps": args.steps}
    folder = common.emulator_folder(work, "app-default", {})
    plain = [plain_steps(folder, overrides, args.cpus)]  # Ray gives the actor OMP_NUM_THREADS = its CPUs (checked below)
    repeats = []
    for r in range(args.repeats):
        run_dir, lines = common.run_app(overrides, work=work, name="overhead", supernodes=1, cpus_per_client=args.cpus)
        client = common.clients_of(lines, [1])[0]
        if read_manifest(run_dir / "emulator")["weights_sha256"] != read_manifest(folder)["weights_sha256"] or int(client["threads"]) != args.cpus:
            raise RuntimeError(f"the run's emulator or thread count ({client['threads']}) differs from the plain loop's")
        plain.append(plain_steps(folder, overrides, args.cpus))
        (before, first_loss), (after, _) = plain[-2], plain[-1]
        if abs(first_loss - client["first-loss"]) > 1e-3:
            raise RuntimeError(f"the plain loop did not see the client's batches: first loss {first_loss:.5f} vs {client['first-loss']:.5f}")
        plain_step = (common.median(before[1:]) + common.median(after[1:])) / 2
        repeats.append({"client_step_s": client["step-seconds"], "plain_step_s": plain_step, "ratio": client["step-seconds"] / plain_step,
                        "client_threads": int(client["threads"]), "client_train_s": client["seconds"], "plain_before_s": before, "plain_after_s": after,
                        "client_load_s": client["load-seconds"], "client_data_s": client["data-seconds"], "client_delivery_s": client["delivery-seconds"],
                        "client_peak_rss_mib": client["peak-rss-mib"], "load_average": os.getloadavg()})
        print(f"repeat {r + 1}: client {client['step-seconds']:.3f} s/step, plain {plain_step:.3f} s/step, ratio {repeats[-1]['ratio']:.3f}", flush=True)
    ratio = common.median(x["ratio"] for x in repeats)
    rows = [(i + 1, f"{x['client_step_s']:.3f}", f"{x['plain_step_s']:.3f}", f"{x['ratio']:.3f}x", x["client_threads"], f"{x['load_average'][0]:.1f}")
            for i, x in enumerate(repeats)]
    rows.append(("median", f"{common.median(x['client_step_s'] for x in repeats):.3f}", f"{common.median(x['plain_step_s'] for x in repeats):.3f}",
                 f"**{ratio:.3f}x**", "", ""))
    text = common.table(["repeat", "Flower client under Ray (s/step)", "plain PyTorch loop, mean of before and after (s/step)", "client / plain",
                         "torch threads", "load average (1 min)"], rows)
    text += f"\n\nGoal: at most {GOAL:.2f}x: {'met' if ratio <= GOAL else 'NOT met'} ({ratio:.3f}x)."
    common.finish(args, "overhead", {"ratio": ratio, "goal": GOAL, "met": ratio <= GOAL, "repeats_detail": repeats, "run_config": overrides}, text)


if __name__ == "__main__":
    main()
