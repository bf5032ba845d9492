"""Flower Message-API strategies for adapter-only federation, chosen by name from run config.

Every strategy here is a ``flwr.serverapp.strategy.Strategy``; the aggregation rules are
Flower's own (``flwr.serverapp.strategy``), configured from :class:`FederationConfig`.
:class:`OffsiteStrategy` wraps any of them with what offsite-tuning needs around aggregation:
the emulator sent once per node, reproducible sampling by partition id, every reply validated
(:mod:`strategies.validate`) and every failure recorded, per-client metrics and bytes, and no
federated evaluation (the server evaluates the plugged-in model itself).

Client-side parts live in :mod:`fed_crash.federation.server`: FedProx's ``proximal-mu`` (sent by
Flower's FedProx in the train config) and the FedBiOT regulariser become one proximal term
on the adapters; with differential privacy on, the client clips its update to the norm the
DP wrapper sends.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from fed_crash.core.artifacts import ArtifactError
from fed_crash.config import ConfigError, FederationConfig

from .dp import UNIT_WEIGHT_KEY, ClientClippingDP
from .offsite import OffsiteStrategy, RoundTraffic

WEIGHT_KEY = "num-examples"  # what clients report and FedAvg-style means weight by


def _sampling(fed: FederationConfig, weighted_by_key: str = WEIGHT_KEY) -> dict[str, Any]:
    """What every strategy shares: node sampling from run config, no federated evaluation."""
    return {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": fed.min_train_nodes,
        "min_evaluate_nodes": 0,
        "min_available_nodes": fed.min_available_nodes,
        "weighted_by_key": weighted_by_key,
    }


def _fedopt(fed: FederationConfig, *, moments: bool = True) -> dict[str, Any]:
    """Server-optimizer settings (Reddi et al. 2021) on the round's mean adapter delta.
    ``eta_l`` is informational in Flower (the clients' own lr is ``train.lr``)."""
    extra = {"beta_1": fed.fedopt_beta1, "beta_2": fed.fedopt_beta2} if moments else {}
    return {"eta": fed.fedopt_eta, "tau": fed.fedopt_tau, **extra}


def _trimmed(fed: FederationConfig, key: str) -> Strategy:
    if not 0.0 <= fed.trimmed_beta < 0.5:
        raise ConfigError(f"run config: 'trimmed-beta' must be in [0, 0.5), got {fed.trimmed_beta}")
    return FedTrimmedAvg(**_sampling(fed, key), beta=fed.trimmed_beta)


# name -> factory(run config, weight key); the options are documented in FederationConfig
STRATEGIES: dict[str, Callable[[FederationConfig, str], Strategy]] = {
    "fedavg": lambda fed, key: FedAvg(**_sampling(fed, key)),
    "fedavgm": lambda fed, key: FedAvgM(**_sampling(fed, key), server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum),
    "fedprox": lambda fed, key: FedProx(**_sampling(fed, key), proximal_mu=fed.proximal_mu),
    "fedadam": lambda fed, key: FedAdam(**_sampling(fed, key), **_fedopt(fed)),
    "fedyogi": lambda fed, key: FedYogi(**_sampling(fed, key), **_fedopt(fed)),
    "fedadagrad": lambda fed, key: FedAdagrad(**_sampling(fed, key), **_fedopt(fed, moments=False)),
    "fedmedian": lambda fed, key: FedMedian(**_sampling(fed, key)),
    "fedtrimmedavg": _trimmed,
    "krum": lambda fed, key: Krum(**_sampling(fed, key), num_malicious_nodes=fed.krum_malicious),
}

# Gaussian noise calibrated to clip / sampled clients protects a plain mean of clipped updates;
# any other aggregation (median, Krum, a server optimizer after the noise) breaks that bound.
DP_STRATEGIES = ("fedavg", "fedprox")


def make_strategy(fed: FederationConfig) -> Strategy:
    """The strategy named by ``fed.strategy``, wrapped for differential privacy when
    ``dp-clipping-norm`` > 0. Bad names and combinations raise :class:`ConfigError`."""
    name = fed.strategy.lower()
    if name not in STRATEGIES:
        raise ConfigError(f"run config: unknown strategy {fed.strategy!r}; available: {sorted(STRATEGIES)}")
    if fed.dp_clipping_norm <= 0:
        return STRATEGIES[name](fed, WEIGHT_KEY)
    if name not in DP_STRATEGIES:
        raise ConfigError(f"run config: differential privacy (dp-clipping-norm > 0) needs an unweighted mean: strategy {' or '.join(DP_STRATEGIES)}, got {fed.strategy!r}")
    if fed.dp_noise_multiplier <= 0 or not 0 < fed.dp_delta < 1:
        raise ConfigError(f"run config: differential privacy needs dp-noise-multiplier > 0 and 0 < dp-delta < 1, got {fed.dp_noise_multiplier} and {fed.dp_delta}")
    # equal weights: each client's clipped update moves the mean by at most clip / sampled clients
    inner = STRATEGIES[name](fed, UNIT_WEIGHT_KEY)
    return ClientClippingDP(inner, noise_multiplier=fed.dp_noise_multiplier, clipping_norm=fed.dp_clipping_norm, delta=fed.dp_delta)


def server_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The server optimizer's state, to checkpoint next to the round's adapters: FedAdam /
    FedYogi / FedAdagrad first and second moments (``m_t/<key>``, ``v_t/<key>``), FedAvgM's
    momentum (``momentum/<key>``); empty for stateless strategies and before round 1."""
    if isinstance(strategy, (OffsiteStrategy, ClientClippingDP)):
        return server_state(strategy.inner if isinstance(strategy, OffsiteStrategy) else strategy.strategy)
    if isinstance(strategy, FedOpt):
        return {f"{name}/{k}": np.asarray(v) for name in ("m_t", "v_t") for k, v in (getattr(strategy, name) or {}).items()}
    if isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None and strategy.current_arrays is not None:
        return {f"momentum/{k}": np.asarray(v) for k, v in zip(strategy.current_arrays.keys(), strategy.momentum_vector, strict=True)}
    return {}


def restore_server_state(strategy: Strategy, state: dict[str, np.ndarray], keys: list[str]) -> None:
    """Put a checkpoint's :func:`server_state` back into a freshly made strategy, to resume a
    run: ``keys`` are the adapter keys in the order the run sends them (FedAvgM keeps its
    momentum as a list in that order). The round-start arrays themselves are set by the
    strategy's next ``configure_train``."""
    if isinstance(strategy, (OffsiteStrategy, ClientClippingDP)):
        return restore_server_state(strategy.inner if isinstance(strategy, OffsiteStrategy) else strategy.strategy, state, keys)
    names = ("m_t", "v_t") if isinstance(strategy, FedOpt) else ("momentum",) if isinstance(strategy, FedAvgM) else ()
    expected = {f"{name}/{k}" for name in names for k in keys} if state else set()
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise ArtifactError(f"server optimizer state does not fit strategy {type(strategy).__name__} and these adapters: "
                            f"{len(odd)} tensor(s) missing or unexpected, e.g. {odd[0]!r}")
    if state and isinstance(strategy, FedOpt):
        strategy.m_t, strategy.v_t = ({k: state[f"{name}/{k}"] for k in keys} for name in names)
    elif state:
        strategy.momentum_vector = [state[f"momentum/{k}"] for k in keys]


__all__ = ["DP_STRATEGIES", "STRATEGIES", "ClientClippingDP", "OffsiteStrategy", "RoundTraffic", "UNIT_WEIGHT_KEY", "make_strategy", "restore_server_state", "server_state"]
