"""Central differential privacy with client-side fixed clipping, and the privacy it spends.

Flower's :class:`DifferentialPrivacyClientSideFixedClipping` sends the clipping norm ``C`` to
the clients (``clipping_norm`` in the train config; on the client, Flower's own
``fixedclipping_mod`` clips the adapter update, see
:func:`fed_crash.federation.client.dp_clipping_mod`) and adds Gaussian noise with standard
deviation ``sigma * C / m`` to the unweighted mean of the ``m`` sampled clients' updates. What
this wrapper adds, each because the guarantee does not hold without it (derivation:
``docs/reliability.md``, "Differential privacy: what is guaranteed"):

* **secret randomness.** The noise and the round's sample come from a generator seeded from
  OS entropy that only the server holds (:attr:`rng`; its state goes into the server's
  checkpoint, never into a message). Flower draws its noise from NumPy's global generator,
  which the server seeds with the run's ``seed``, a value every node receives in the run config:
  a node could regenerate the noise and subtract it. ``FED_CRASH_UNSAFE_DP_NOISE_SEED`` (an
  environment variable of the server process, never part of the run config) fixes the seed for
  tests that compare two runs; it voids the guarantee.
* **the server clips again.** A client that skips the clipping mod cannot raise the
  sensitivity: every update is clipped to ``C`` on arrival (a no-op for an honest client).
  Equal weights are enforced by the reply check (``unit-weight`` must be exactly 1,
  :func:`fed_crash.federation.protocol.check_train_reply`).
* **the round's real sample size** ``m`` (known only once nodes connect); a round with fewer
  valid replies than sampled is not released, since its noise is calibrated to ``m``.
* **accounting** (:func:`epsilon_spent`): replace-one client-level DP. Replacing one client's
  update moves the mean by at most ``2C/m``, so the noise is ``sigma/2`` times the
  sensitivity; each round is that Gaussian mechanism on a uniformly random, secret sample of
  ``m`` of the ``n`` connected nodes (amplification by sampling without replacement), composed
  in Google's ``dp-accounting`` RDP accountant.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Sequence

import numpy as np
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

from fed_crash.federation.checkpoint import StrategyState
from fed_crash.federation.protocol import ARRAYS, DP_DELTA, DP_EPSILON, DP_RELEASES, update_norm

log = logging.getLogger(__name__)

UNSAFE_NOISE_SEED = "FED_CRASH_UNSAFE_DP_NOISE_SEED"  # server environment only; voids the guarantee


def epsilon_spent(releases: Sequence[tuple[int, int]], noise_multiplier: float, delta: float) -> float:
    """Epsilon at ``delta`` after the released rounds ``[(sampled m, population n), ...]``:
    replace-one neighbours, each round a Gaussian mechanism with noise multiplier
    ``noise_multiplier / 2`` (std ``sigma C / m`` over sensitivity ``2C / m``) on a sample of
    ``m`` of ``n`` drawn without replacement (no amplification when ``m == n``)."""
    if not releases:
        return 0.0
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    gaussian = dp_event.GaussianDpEvent(noise_multiplier / 2)
    for sampled, population in releases:
        accountant.compose(gaussian if sampled == population else dp_event.SampledWithoutReplacementDpEvent(population, sampled, gaussian))
    return float(accountant.get_epsilon(delta))


def _noise_seed(seed: int | None) -> int | None:
    if seed is None and os.environ.get(UNSAFE_NOISE_SEED):
        seed = int(os.environ[UNSAFE_NOISE_SEED])
    if seed is not None:
        log.warning("differential privacy: the noise seed is fixed (%s): the noise is predictable and the guarantee void", UNSAFE_NOISE_SEED)
    return seed


class ClientClippingDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper with secret noise and sampling, server-side
    re-clipping, the round's real sample size and per-round accounting (module docstring).
    ``noise_seed``: fixed noise for tests (unsafe); ``None`` draws the seed from OS entropy."""

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float, delta: float, noise_seed: int | None = None) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients=1)  # set per round
        self.delta = delta
        self.rng = np.random.default_rng(_noise_seed(noise_seed))
        self.releases: list[tuple[int, int, int]] = []  # (round, sampled, population) of every released round
        self.spent: dict[int, float] = {}  # round -> epsilon at delta after it
        self._sampled: dict[int, tuple[int, int]] = {}  # configured round -> (sampled, population)
        self._sent = ArrayRecord()  # the round's adapters, the reference of the server-side clipping

    @property
    def weighted_by_key(self) -> str:
        """The wrapped strategy's weight metric (the one its mean reads)."""
        return self.strategy.weighted_by_key

    def state_dict(self) -> StrategyState:
        """The wrapped strategy's state, the released rounds (the accountant's state) and the
        secret generator's state (server checkpoint only)."""
        inner = self.strategy.state_dict()
        return StrategyState(inner.tensors, {**inner.meta, "dp_releases": [list(r) for r in self.releases],
                                             "dp_rng": self.rng.bit_generator.state})

    def load_state_dict(self, state: StrategyState) -> None:
        """Resume: the released rounds keep counting, the secret generator continues where it stood."""
        meta = dict(state.meta)
        self.releases = [tuple(r) for r in meta.pop("dp_releases", [])]
        for i, (server_round, _, _) in enumerate(self.releases):
            self.spent[server_round] = epsilon_spent([r[1:] for r in self.releases[: i + 1]], self.noise_multiplier, self.delta)
        if "dp_rng" in meta:
            self.rng.bit_generator.state = meta.pop("dp_rng")
        self.strategy.load_state_dict(StrategyState(state.tensors, meta))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The inner strategy's sample, drawn with Python's ``random`` (as Flower samples)
        seeded from the secret generator: nobody can predict who is in it."""
        state = random.getstate()
        random.seed(int(self.rng.integers(2**63)))
        try:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        finally:
            random.setstate(state)
        if messages:
            self.num_sampled_clients = len(messages)
            self._sampled[server_round] = (len(messages), len(list(grid.get_node_ids())))
            self._sent = arrays
        return messages

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """Gaussian noise of std ``sigma C / m`` from the secret generator (not NumPy's global one)."""
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        return ArrayRecord({key: Array((array.numpy() + self.rng.normal(0.0, std, array.shape)).astype(array.numpy().dtype))
                            for key, array in aggregated_arrays.items()})

    def _clip_on_arrival(self, reply: Message) -> None:
        """Clip the reply's update to the clipping norm with Flower's own function (a no-op for a
        client whose mod clipped it; that function divides by the norm, so a zero update is left
        alone here)."""
        if update_norm(reply.content[ARRAYS], self._sent) <= self.clipping_norm:
            return
        keys = list(self._sent)
        update = [reply.content[ARRAYS][k].numpy().copy() for k in keys]
        compute_clip_model_update(update, [self._sent[k].numpy() for k in keys], self.clipping_norm)
        reply.content[ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, update)})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [reply for reply in replies if not reply.has_error()]
        sampled = self._sampled.pop(server_round, None)
        if sampled is None or len(replies) != sampled[0]:
            log.warning("round %d: %d valid replies of %d sampled clients; no release this round (the noise is calibrated to all of them)",
                        server_round, len(replies), self.num_sampled_clients)
            return None, None
        for reply in replies:
            self._clip_on_arrival(reply)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return None, None
        self.releases.append((server_round, *sampled))
        self.spent[server_round] = epsilon_spent([r[1:] for r in self.releases], self.noise_multiplier, self.delta)
        return arrays, MetricRecord({**(metrics or {}), DP_EPSILON: self.spent[server_round], DP_DELTA: self.delta,
                                     DP_RELEASES: len(self.releases)})
