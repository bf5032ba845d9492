"""Central differential privacy with client-side fixed clipping, and the privacy it spends.

Flower's :class:`DifferentialPrivacyClientSideFixedClipping` sends the clipping norm to the
clients (``clipping_norm`` in the train config; on the client, Flower's own ``fixedclipping_mod`` clips
the adapter update, see :func:`fed_crash.federation.client.dp_clipping_mod`) and adds Gaussian noise with standard deviation
``noise_multiplier * clipping_norm / sampled clients`` to the aggregate. Two things are added
here:

* the number of sampled clients is the round's real sample, set when the round is configured
  (Flower's wrapper takes it at construction, but in a simulation the node count is known only
  once nodes connect), and a round whose replies are fewer than that is not released, since the
  noise would be too small for the mean over fewer updates;
* privacy accounting per round: Flower's built-in accountant option only allows the
  no-amplification model, while nodes here are sampled uniformly without replacement, so the
  round is composed as a sampled Gaussian mechanism (sample / connected nodes) in Flower's RDP
  accountant (Google's ``dp-accounting``), and the epsilon spent at ``delta`` is kept per round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fed_crash.federation.checkpoint import StrategyState
from fed_crash.federation.protocol import DP_DELTA, DP_EPSILON, DP_RELEASES

log = logging.getLogger(__name__)


class ClientClippingDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper with the round's real sample size and
    per-round accounting (:attr:`spent`, by round)."""

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float, delta: float) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients=1)  # set per round
        self.delta = delta
        self.spent: dict[int, PrivacySpent] = {}
        self._accountant: RdpAccountant | None = None
        self._events: dict[int, GaussianPrivacyEvent] = {}
        self.releases: list[tuple[int, int, int]] = []  # (round, sampled, population) of every released round: the accountant's state
        # dp-accounting warns through absl for every RDP order it drops while converging
        logging.getLogger("absl").setLevel(logging.ERROR)

    def _accountant_for(self, population: int) -> RdpAccountant:
        if self._accountant is None:
            self._accountant = RdpAccountant(PrivacyConfig(
                target_delta=self.delta, population_size=population,
                neighboring_relation=NeighboringRelation.REPLACE_ONE, sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
            ))
        return self._accountant

    @property
    def weighted_by_key(self) -> str:
        """The wrapped strategy's weight metric (the one its mean reads)."""
        return self.strategy.weighted_by_key

    def state_dict(self) -> StrategyState:
        """The wrapped strategy's state, and the rounds released so far (the accountant's state)."""
        inner = self.strategy.state_dict()
        return StrategyState(inner.tensors, {**inner.meta, "dp_releases": [list(r) for r in self.releases]})

    def load_state_dict(self, state: StrategyState) -> None:
        """Replay the released rounds into a fresh accountant (resume): a resumed run keeps
        counting the privacy spent before it was stopped."""
        meta = dict(state.meta)
        for server_round, sampled, population in meta.pop("dp_releases", []):
            accountant = self._accountant_for(population)
            accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, sampled, accountant.config.population_size))
            self.spent[server_round] = accountant.get_privacy_spent()
            self.releases.append((server_round, sampled, population))
        self.strategy.load_state_dict(StrategyState(state.tensors, meta))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if messages:
            self._accountant_for(len(list(grid.get_node_ids())))
            self.num_sampled_clients = len(messages)
            self._events[server_round] = GaussianPrivacyEvent(self.noise_multiplier, len(messages), self._accountant.config.population_size)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        event = self._events.pop(server_round, None)
        answered = sum(not reply.has_error() for reply in replies)
        if answered != self.num_sampled_clients:
            log.warning("round %d: %d of %d sampled clients answered; no release this round (the noise is calibrated to all of them)",
                        server_round, answered, self.num_sampled_clients)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and event is not None and self._accountant is not None:
            self._accountant.compose(event)
            self.spent[server_round] = self._accountant.get_privacy_spent()
            self.releases.append((server_round, event.sample_size, event.population_size))
            spent = self.spent[server_round]
            metrics = MetricRecord({**(metrics or {}), DP_EPSILON: spent.epsilon, DP_DELTA: spent.delta, DP_RELEASES: spent.num_releases})
        return arrays, metrics
