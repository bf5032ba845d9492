"""Injected faults: what real federations suffer, on demand, reproducibly.

Run config section ``faults.*`` (:class:`fed_crash.config.FaultConfig`) gives a rate per kind:

* ``dropout``: the client goes offline at a round and stays offline for ``dropout-rounds``
  rounds; the server sends it nothing meanwhile (as Flower does for an unreachable node) and
  records it as ``offline``. Injected on the server, since an offline client runs nothing.
* ``crash``: the client raises halfway through its local training; Flower turns that into an
  error reply, which the server records as ``error`` with the client's message.
* ``timeout``: the client stalls for ``round-timeout`` + :data:`STALL_MARGIN_S` seconds before
  training; the server stops waiting at ``round-timeout`` and records ``timeout``.
* ``bad-update``: the client replies with a corrupted update (:func:`corrupt_update`), which
  the server's validation rejects (or, for ``garbage`` without an update-norm bound, a robust
  strategy has to absorb).

``attack`` makes one client (partition ``attacker``) malicious in every round, in one of the ways
its owner could program it (:func:`attack_metrics`, :func:`attack_partition`): a weight it
chooses, metrics that would crash or mislead the server, a skipped DP clipping, a claim to
another partition. ``scripts/reliability.py`` tries each against real runs.

Whether a fault hits is a pure function of ``(faults.seed, kind, partition id, round)``
(:meth:`FaultPlan.draw`), so the server and every client agree without talking, a resumed run
meets the same faults as an uninterrupted one, and tests can predict them. At most one fault
hits a client in a round, checked in the order above.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fed_crash.config import FaultConfig
from fed_crash.errors import FedCrashError

log = logging.getLogger(__name__)

KINDS = ("dropout", "crash", "timeout", "bad-update")
STALL_MARGIN_S = 5.0  # how far past round-timeout a timed-out client stalls


class InjectedFault(FedCrashError):
    """A failure the run config asked for (``faults.*``); the message says which and where."""


@dataclass(frozen=True)
class FaultPlan:
    """Which fault hits which client in which round (see module docstring)."""

    cfg: FaultConfig

    def _rate(self, kind: str) -> float:
        return {"dropout": self.cfg.dropout_rate, "crash": self.cfg.crash_rate, "timeout": self.cfg.timeout_rate,
                "bad-update": self.cfg.bad_update_rate}[kind]

    @property
    def active(self) -> bool:
        return any(self._rate(kind) > 0 for kind in KINDS)

    def draw(self, kind: str, partition: int, server_round: int) -> float:
        """A uniform number in [0, 1) for this (kind, partition, round): sha256 of the seed and
        the three, so draws do not depend on the order anything is asked in."""
        digest = hashlib.sha256(f"{self.cfg.seed}:{kind}:{partition}:{server_round}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def seed_for(self, partition: int, server_round: int) -> int:
        """A seed for what a fault generates (a bad update's noise), fixed like the draws."""
        return int(self.draw("seed", partition, server_round) * 2**62)

    def offline(self, partition: int, server_round: int) -> tuple[int, int] | None:
        """The dropout window ``(first, last)`` round that covers ``server_round``, if any: the
        client drops out at round s with probability ``dropout-rate`` and stays offline through
        round ``s + dropout-rounds - 1``."""
        if self.cfg.dropout_rate <= 0:
            return None
        for start in range(max(1, server_round - self.cfg.dropout_rounds + 1), server_round + 1):
            if self.draw("dropout", partition, start) < self.cfg.dropout_rate:
                return start, start + self.cfg.dropout_rounds - 1
        return None

    def fault(self, partition: int, server_round: int) -> str | None:
        """The fault that hits this client in this round (one of :data:`KINDS`), or None."""
        if self.offline(partition, server_round):
            return "dropout"
        for kind in KINDS[1:]:
            if self.draw(kind, partition, server_round) < self._rate(kind):
                return kind
        return None


def find_seed(cfg: FaultConfig, partitions: int, rounds: int, accept: Callable[[dict[tuple[int, int], str | None]], bool], tries: int = 100_000) -> int:
    """The first ``faults.seed`` whose faults over ``partitions`` clients and ``rounds`` rounds
    (``{(partition, round): fault}``) satisfy ``accept``: to stage a run that shows a given
    mix of faults (the reliability script and tests do)."""
    for seed in range(tries):
        plan = FaultPlan(replace(cfg, seed=seed))
        if accept({(p, r): plan.fault(p, r) for p in range(partitions) for r in range(1, rounds + 1)}):
            return seed
    raise FedCrashError(f"no faults.seed below {tries} gives the requested scenario with these rates")


def telling(table: dict[tuple[int, int], str | None]) -> bool:
    """Faults that make a telling run of 3 clients and 4 rounds: every kind happens, timeouts
    only in round 3 (a run stopped after round 2 is stopped while the server waits them out),
    a round in which every client fails, and some update in rounds 1-2 and in round 4."""
    ok = {r: sum(table[p, r] is None for p in range(3)) for r in range(1, 5)}
    return (set(table.values()) >= set(KINDS) and {r for (_, r), kind in table.items() if kind == "timeout"} == {3}
            and 0 in ok.values() and ok[1] + ok[2] > 0 and ok[4] > 0)


def crash_midway(at_step: int, partition: int, server_round: int) -> Callable[[int], None]:
    """A per-step callback for :func:`fed_crash.core.train.train_adapters` that raises
    :class:`InjectedFault` once ``at_step`` optimizer steps are done: a client crashing
    mid-training (the client passes half its steps)."""

    def on_step(step: int) -> None:
        if step >= at_step:
            raise InjectedFault(f"injected crash (faults.crash-rate): client {partition} crashed after training step {step} in round {server_round}")

    return on_step


def stall(round_timeout: float, partition: int, server_round: int) -> None:
    """Sleep past the server's round timeout: a straggler whose reply comes too late."""
    log.warning("injected timeout (faults.timeout-rate): client %d stalls %.0fs in round %d", partition, round_timeout + STALL_MARGIN_S, server_round)
    time.sleep(round_timeout + STALL_MARGIN_S)


def corrupt_update(kind: str, trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor], *, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A bad reply in place of ``trained`` (the round's honest adapters; ``start`` is what the
    server sent). ``garbage``: ``start`` plus Gaussian noise of std ``scale`` (right keys,
    shapes and dtypes: only its size gives it away); ``nan`` / ``inf``: one value made
    non-finite; ``shape``: one tensor loses a row; ``dtype``: every tensor cast to another
    float type; ``missing-key``: one tensor left out; ``extra-key``: one tensor added."""
    out = {k: v.clone() for k, v in trained.items()}
    first = next(iter(out))
    if kind == "garbage":
        generator = torch.Generator().manual_seed(seed)
        return {k: (start[k].double() + scale * torch.randn(start[k].shape, generator=generator, dtype=torch.float64)).to(start[k].dtype)
                for k in start}
    if kind in ("nan", "inf"):
        out[first].view(-1)[0] = float(kind)
    elif kind == "shape":
        out[first] = out[first][:-1]
    elif kind == "dtype":
        out = {k: v.to(torch.float16 if v.dtype != torch.float16 else torch.float32) for k, v in out.items()}
    elif kind == "missing-key":
        del out[first]
    elif kind == "extra-key":
        out[first + ".extra"] = out[first].clone()
    else:
        raise FedCrashError(f"faults.bad-update: unknown kind {kind!r}")
    return out


def attacking(cfg: FaultConfig, partition: int, *attacks: str) -> bool:
    """Whether this partition is the configured attacker and runs one of ``attacks``."""
    return cfg.attack in attacks and partition == cfg.attacker


def attack_metrics(cfg: FaultConfig, partition: int, metrics: dict) -> dict:
    """The train reply's metrics as the attacker sends them (unchanged for everyone else)."""
    if not attacking(cfg, partition, "weight-huge", "weight-tiny", "extra-metric", "missing-metric", "list-metric"):
        return metrics
    log.warning("attack %s by partition %d", cfg.attack, partition)
    changed = dict(metrics)
    if cfg.attack == "weight-huge":
        changed["num-examples"] = 1e300
    elif cfg.attack == "weight-tiny":
        changed["unit-weight"] = 1e-9
    elif cfg.attack == "extra-metric":
        changed["partition"] = partition + 1
    elif cfg.attack == "missing-metric":
        del changed["train-loss"]
    else:
        changed["train-loss"] = [1.0, 2.0]
    return changed


def attack_partition(cfg: FaultConfig, partition: int, num_partitions: int) -> tuple[int, int]:
    """The (partition id, partitions) the attacker claims to hold (the truth for everyone else)."""
    if attacking(cfg, partition, "claim-partition"):
        return (partition + 1) % num_partitions, num_partitions
    if attacking(cfg, partition, "num-partitions"):
        return partition, num_partitions + 5
    return partition, num_partitions
