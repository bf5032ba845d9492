"""Server-side strategy state as plain data, for checkpoints: ``state_dict()`` gives
:class:`StrategyState` (tensors for safetensors, the rest for JSON) and ``load_state_dict()``
puts it back into a fresh strategy, the way torch modules do. Flower's strategies keep their
state in attributes; each family here names its own, so no caller has to know which it is."""

from __future__ import annotations

import numpy as np

from fed_crash.core.artifacts import ArtifactError
from fed_crash.federation.checkpoint import StrategyState


class Stateless:
    """Strategies whose aggregate depends only on the round's replies."""

    def state_dict(self) -> StrategyState:
        return StrategyState()

    def load_state_dict(self, state: StrategyState) -> None:
        if state.tensors:
            raise ArtifactError(f"strategy {type(self).__name__} keeps no state, but the checkpoint holds {len(state.tensors)} tensor(s)")


class ServerOptimizerState:
    """FedAdam, FedYogi, FedAdagrad (Flower's FedOpt): first and second moments per adapter key."""

    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None

    def state_dict(self) -> StrategyState:
        return StrategyState({f"{name}/{k}": np.asarray(v) for name in ("m_t", "v_t") for k, v in (getattr(self, name) or {}).items()})

    def load_state_dict(self, state: StrategyState) -> None:
        moments = {name: {k.partition("/")[2]: v for k, v in state.tensors.items() if k.startswith(name + "/")} for name in ("m_t", "v_t")}
        if len(moments["m_t"]) + len(moments["v_t"]) != len(state.tensors) or set(moments["m_t"]) != set(moments["v_t"]):
            raise ArtifactError(f"server optimizer state of {type(self).__name__} needs matching m_t/ and v_t/ tensors, got {sorted(state.tensors)[:3]}")
        if state.tensors:
            self.m_t, self.v_t = moments["m_t"], moments["v_t"]


class MomentumState:
    """FedAvgM: the server momentum, a list in the order of the adapters it was built from."""

    momentum_vector: list[np.ndarray] | None

    def state_dict(self) -> StrategyState:
        if self.momentum_vector is None or self.current_arrays is None:
            return StrategyState()
        keys = list(self.current_arrays.keys())
        return StrategyState({f"momentum/{k}": np.asarray(v) for k, v in zip(keys, self.momentum_vector, strict=True)}, {"momentum_keys": keys})

    def load_state_dict(self, state: StrategyState) -> None:
        if state.tensors:
            self.momentum_vector = [state.tensors[f"momentum/{k}"] for k in state.meta["momentum_keys"]]
