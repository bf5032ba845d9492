"""The "measured" entries of the attacks table in docs/reliability.md: each attack in-process
against the code at 1b4bed6, before issue 16 (the test suite's LocalGrid drives that commit's real
ClientApp). Run it from a worktree of that commit:

    git worktree add /tmp/old 1b4bed6
    cd /tmp/old && PYTHONPATH=/tmp/old:/tmp/old/simulations/alpaca /work/main/.venv/bin/python /work/main/docs/attacks_on_1b4bed6.py
"""
import numpy as np, json, math
from flwr.supercore.task_identity import TaskIdentity
for n, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
    setattr(TaskIdentity, n, v)
import fed_crash, strategies
print("code at", fed_crash.__file__)
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from fed_crash.config import FederationConfig
from fed_crash.federation.checkpoint import seed_everything
from strategies import make_strategy, OffsiteStrategy
from tests.conftest import LocalGrid
def fed(**kw): return FederationConfig(min_train_nodes=1, min_available_nodes=1, **kw)
def reply(m, w, metrics):
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(w, np.float32))}), "metrics": MetricRecord(metrics)}), reply_to=m)
# 1: noise predictable
seed_everything(0)
s = make_strategy(fed(strategy="fedavg", fraction_train=1.0, dp_clipping_norm=1.0, dp_noise_multiplier=1.0))
g = LocalGrid(2); z = ArrayRecord({"w": Array(np.zeros(20000, np.float32))})
ms = list(s.configure_train(1, z, ConfigRecord(), g))
arr, met = s.aggregate_train(1, [reply(m, np.zeros(20000), {"num-examples": 1, "unit-weight": 1}) for m in ms])
noise = arr["w"].numpy(); np.random.seed(0); guess = np.random.normal(0, 0.5, 20000)
print("1 noise corr with the seed's guess:", round(float(np.corrcoef(noise, guess)[0, 1]), 4))
# 2: epsilon, smoke setting (2 of 2, sigma 1, 2 rounds)
for r in (2,):
    ms = list(s.configure_train(r, z, ConfigRecord(), g))
    arr, met = s.aggregate_train(r, [reply(m, np.zeros(20000), {"num-examples": 1, "unit-weight": 1}) for m in ms])
print("2 epsilon after 2 rounds, 2 of 2 clients, sigma 1, delta 1e-5:", round(s.spent[2].epsilon, 3))
# 3/5: weights through OffsiteStrategy
def offsite(inner, replies_fn, nodes=3):
    o = OffsiteStrategy(inner, settle_s=0); g = LocalGrid(nodes)
    sent = {m.metadata.dst_node_id: m for m in o.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(), g)}
    try:
        arr, _ = o.aggregate_train(1, replies_fn(sent))
        return (arr["w"].numpy().tolist() if arr else None), o.rounds[1].failures
    except Exception as e:
        return f"RAISED {type(e).__name__}: {str(e)[:120]}", None
base = {"num-examples": 4, "train-loss": 2.0}
print("5 weight 1e300:", offsite(make_strategy(fed(strategy="fedavg")), lambda sent: [reply(m, [float(i + 1)] * 2, {**base, "num-examples": 1e300 if i == 2 else 4}) for i, m in enumerate(sent.values())]))
print("3 unit-weight 1e-9 under DP:", offsite(make_strategy(fed(strategy="fedavg", fraction_train=1.0, dp_clipping_norm=100.0, dp_noise_multiplier=1e-9)),
      lambda sent: [reply(m, [float(i + 1)] * 2, {**base, "unit-weight": 1e-9 if i == 2 else 1, "update-norm": 1.0}) for i, m in enumerate(sent.values())]))
print("4 missing train-loss:", offsite(make_strategy(fed(strategy="fedavg")), lambda sent: [reply(m, [1.0] * 2, {"num-examples": 4} if i == 2 else base) for i, m in enumerate(sent.values())]))
# 7: two nodes claim one partition
g = LocalGrid(3); g.contexts[g.nodes[1]].node_config["partition-id"] = 0
o = OffsiteStrategy(make_strategy(fed(strategy="fedavg")), settle_s=0)
sent = list(o.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(), g))
print("7 two claim partition 0: partitions", o.partitions, "sampled", len(sent))
g = LocalGrid(3); g.contexts[g.nodes[2]].node_config["num-partitions"] = 8
o = OffsiteStrategy(make_strategy(fed(strategy="fedavg")), settle_s=0)
sent = list(o.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(), g))
print("7 one says 8 partitions: num_partitions", o.num_partitions, "sampled", len(sent))
