"""Flower Message-API strategies for adapter-only federation, chosen by name from run config.

The aggregation rules are Flower's own (``flwr.serverapp.strategy``), configured from
:class:`FederationConfig`; each is subclassed here only to give it ``state_dict()`` /
``load_state_dict()`` (:mod:`strategies.state`), so a checkpoint saves and restores any of them
the same way. :class:`OffsiteStrategy` wraps any of them with what offsite-tuning needs around
aggregation (the emulator exchange, reproducible sampling, validated replies, per-client
records); :class:`ClientClippingDP` is Flower's client-side fixed-clipping DP wrapper with
per-round accounting.

This package builds on :mod:`fed_crash` (its config, protocol and faults); nothing in
``fed_crash`` imports it.
"""

from __future__ import annotations

from typing import Any, Callable

from flwr.serverapp import strategy as flower

from fed_crash.config import FederationConfig
from fed_crash.federation.protocol import ARRAYS, CONFIG, NUM_EXAMPLES, UNIT_WEIGHT

from .dp import ClientClippingDP
from .offsite import OffsiteStrategy
from fed_crash.federation.checkpoint import StrategyState
from fed_crash.federation.protocol import RoundTraffic

from .state import MomentumState, ServerOptimizerState, Stateless


class FedAvg(Stateless, flower.FedAvg): ...
class FedProx(Stateless, flower.FedProx): ...
class FedMedian(Stateless, flower.FedMedian): ...
class FedTrimmedAvg(Stateless, flower.FedTrimmedAvg): ...
class Krum(Stateless, flower.Krum): ...
class FedAvgM(MomentumState, flower.FedAvgM): ...
class FedAdam(ServerOptimizerState, flower.FedAdam): ...
class FedYogi(ServerOptimizerState, flower.FedYogi): ...
class FedAdagrad(ServerOptimizerState, flower.FedAdagrad): ...


def _sampling(fed: FederationConfig, weighted_by_key: str) -> dict[str, Any]:
    """What every strategy shares: node sampling from run config, the protocol's record keys,
    no federated evaluation."""
    return {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": fed.min_train_nodes,
        "min_evaluate_nodes": 0,
        "min_available_nodes": fed.min_available_nodes,
        "weighted_by_key": weighted_by_key,
        "arrayrecord_key": ARRAYS,
        "configrecord_key": CONFIG,
    }


def _fedopt(fed: FederationConfig, *, moments: bool = True) -> dict[str, Any]:
    """Server-optimizer settings (Reddi et al. 2021) on the round's mean adapter delta.
    ``eta_l`` is informational in Flower (the clients' own lr is ``train.lr``)."""
    extra = {"beta_1": fed.fedopt_beta1, "beta_2": fed.fedopt_beta2} if moments else {}
    return {"eta": fed.fedopt_eta, "tau": fed.fedopt_tau, **extra}


# name -> factory(run config, weight key); the options are documented in FederationConfig
STRATEGIES: dict[str, Callable[[FederationConfig, str], flower.Strategy]] = {
    "fedavg": lambda fed, key: FedAvg(**_sampling(fed, key)),
    "fedavgm": lambda fed, key: FedAvgM(**_sampling(fed, key), server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum),
    "fedprox": lambda fed, key: FedProx(**_sampling(fed, key), proximal_mu=fed.proximal_mu),
    "fedadam": lambda fed, key: FedAdam(**_sampling(fed, key), **_fedopt(fed)),
    "fedyogi": lambda fed, key: FedYogi(**_sampling(fed, key), **_fedopt(fed)),
    "fedadagrad": lambda fed, key: FedAdagrad(**_sampling(fed, key), **_fedopt(fed, moments=False)),
    "fedmedian": lambda fed, key: FedMedian(**_sampling(fed, key)),
    "fedtrimmedavg": lambda fed, key: FedTrimmedAvg(**_sampling(fed, key), beta=fed.trimmed_beta),
    "krum": lambda fed, key: Krum(**_sampling(fed, key), num_malicious_nodes=fed.krum_malicious),
}

def make_strategy(fed: FederationConfig) -> flower.Strategy:
    """The strategy named by ``fed.strategy``, wrapped for differential privacy when
    ``dp-clipping-norm`` > 0. Names and combinations are checked with the rest of the run config
    (:func:`fed_crash.config.parse_run_config`: DP only over ``DP_STRATEGIES``, a plain mean)."""
    name = fed.strategy
    if fed.dp_clipping_norm <= 0:
        return STRATEGIES[name](fed, UNIT_WEIGHT if fed.client_weight == "equal" else NUM_EXAMPLES)
    # equal weights: each client's clipped update moves the mean by at most clip / sampled clients
    inner = STRATEGIES[name](fed, UNIT_WEIGHT)
    return ClientClippingDP(inner, noise_multiplier=fed.dp_noise_multiplier, clipping_norm=fed.dp_clipping_norm, delta=fed.dp_delta)


__all__ = ["STRATEGIES", "ClientClippingDP", "OffsiteStrategy", "RoundTraffic", "StrategyState", "make_strategy"]
