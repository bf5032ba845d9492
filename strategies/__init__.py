"""Flower Message-API strategies for adapter-only federation, chosen by name from run config.

Every strategy here is a ``flwr.serverapp.strategy.Strategy``. :class:`OffsiteStrategy` wraps
any of them with what offsite-tuning needs around aggregation: the emulator sent once per node,
per-client metrics and bytes recorded, and no federated evaluation (the server evaluates the
plugged-in model itself).
"""

from __future__ import annotations

from typing import Callable

from flwr.serverapp.strategy import FedAvg, Strategy

from fed_crash.config import ConfigError, FederationConfig

from .offsite import OffsiteStrategy, RoundTraffic


def _fedavg(fed: FederationConfig) -> Strategy:
    """FedAvg weighted by each client's number of training examples."""
    return FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=fed.min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=fed.min_available_nodes,
        weighted_by_key="num-examples",
    )


STRATEGIES: dict[str, Callable[[FederationConfig], Strategy]] = {"fedavg": _fedavg}


def make_strategy(fed: FederationConfig) -> Strategy:
    try:
        factory = STRATEGIES[fed.strategy.lower()]
    except KeyError:
        raise ConfigError(f"run config: unknown strategy {fed.strategy!r}; available: {sorted(STRATEGIES)}") from None
    return factory(fed)


__all__ = ["STRATEGIES", "OffsiteStrategy", "RoundTraffic", "make_strategy"]
