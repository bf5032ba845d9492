"""ServerApp: build the emulator once, federate adapter training, plug in and evaluate each round.

The main reads top to bottom; each step is one call into the installed ``fed_crash`` library
(:mod:`fed_crash.federation.server`), the strategy comes from the ``strategies`` package.

The library is imported inside main, not here: Flower loads the ServerApp and the ClientApp
under one lock and the simulation starts Ray only once the ClientApp has loaded, so a module
that imports torch and transformers (about 10 s on 2 cores) would hold back Ray's start, and
with it every client actor's, by that long.
"""

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fed_crash.core.models import load_model
    from fed_crash.federation.context import run_config
    from fed_crash.federation.faults import FaultPlan
    from fed_crash.federation.server import (RoundEvaluator, check_clients, finish, initial_adapters, open_run, plan_or_resume,
                                             removed_if_it_fails_to_start, write_run)
    from strategies import OffsiteStrategy, make_strategy

    cfg = run_config(context)  # unknown keys and wrong types fail here, by name
    run = open_run(cfg)  # run folder and checkpoint checked (nothing written yet), data slices
    strategy = OffsiteStrategy(make_strategy(cfg.fed), seed=cfg.data.seed, min_available_nodes=cfg.fed.min_available_nodes,
                               min_train_nodes=cfg.fed.min_train_nodes, node_timeout=cfg.fed.node_timeout,
                               min_replies=cfg.fed.min_replies, max_update_norm=cfg.fed.max_update_norm,
                               round_timeout=cfg.fed.round_timeout, faults=FaultPlan(cfg.faults), round_offset=run.round_offset,
                               wire_dtype=cfg.fed.wire_dtype)
    strategy.ask_partitions(grid)  # the nodes import their library while the server loads the model
    loaded = load_model(cfg.fed.model, cache_dir=cfg.fed.cache_dir or None, device=cfg.compute.server_device)
    run.laps.mark("model_load")
    spec, similarity = plan_or_resume(run, loaded)
    # ---- from here on the run writes to its folder (removed again if it fails before round 1 is saved)
    with removed_if_it_fails_to_start(run):
        emulator_folder = write_run(run, loaded, spec, similarity)  # while the client actors start
        if run.checkpoint:
            strategy.load_state_dict(run.checkpoint.strategy)
        evaluate_fn = RoundEvaluator(run, loaded, spec, similarity, emulator_folder, strategy)
        nodes = strategy.connect(grid)
        strategy.shard_sizes, strategy.shard_sha256 = check_clients(run, strategy.num_partitions, len(nodes))  # replies' bounds, nodes' shard checks
        initial = initial_adapters(run, loaded.model, spec)
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.fed.num_server_rounds - run.round_offset,
            timeout=cfg.fed.round_timeout,
            train_config=ConfigRecord(),
            evaluate_fn=evaluate_fn,
            evaluate_round_0_while_training=cfg.fed.fedbiot_align_steps == 0,  # FedBiOT aligns the emulator at round 0
        )
        finish(run, loaded, evaluate_fn, result.arrays, initial)
