"""The strategies package on hand-made client updates: every expected value is computed here
from the method's formula, not taken from the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from fed_crash.config import ConfigError, FederationConfig, parse_run_config
from fed_crash.federation.client import dp_clipping_mod
from fed_crash.federation import protocol as P
from fed_crash.core.train import proximal_term
from fed_crash.config import STRATEGY_NAMES
from strategies import STRATEGIES, ClientClippingDP, OffsiteStrategy, make_strategy
from strategies.dp import UNSAFE_NOISE_SEED
from tests.conftest import LocalGrid, train_metrics


pytestmark = pytest.mark.usefixtures("server_identity")  # conftest: messages need a process identity


def reply(node: int, w: list[float], examples: int, **metrics: float) -> Message:
    """A train reply as a node sends it: one ArrayRecord, one MetricRecord with num-examples."""
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32))}),
        "metrics": MetricRecord(train_metrics(examples, **metrics)),
    })
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=0.0, ttl=600.0, message_type="train")
    return Message(content=content, metadata=meta)


def weights(arrays: ArrayRecord) -> np.ndarray:
    return arrays["w"].numpy()


def fed(**kw) -> FederationConfig:
    return FederationConfig(min_train_nodes=1, min_available_nodes=1, **kw)


def test_fedavg_is_the_mean_weighted_by_examples():
    a, b = [1.0, 2.0], [5.0, -2.0]
    arrays, metrics = make_strategy(fed(strategy="fedavg")).aggregate_train(1, [reply(1, a, 1), reply(2, b, 3)])
    expected = (1 * np.array(a) + 3 * np.array(b)) / 4
    np.testing.assert_allclose(weights(arrays), expected, rtol=1e-6)


def test_equal_client_weight_is_the_plain_mean():
    """client-weight = "equal": a shard ten times larger does not pull the mean ten times harder
    (what a by-task federation needs to weigh its tasks alike)."""
    a, b = [1.0, 2.0], [5.0, -2.0]
    for name in ("fedavg", "fedprox", "fedavgm"):
        arrays, _ = make_strategy(fed(strategy=name, client_weight="equal", server_momentum=0.0)).aggregate_train(1, [reply(1, a, 1), reply(2, b, 10)])
        np.testing.assert_allclose(weights(arrays), (np.array(a) + np.array(b)) / 2, rtol=1e-6, err_msg=name)


def test_fedmedian_and_trimmed_mean_per_weight():
    clients = [[0.0, 10.0], [1.0, -4.0], [2.0, 3.0], [3.0, 7.0], [100.0, 5.0]]
    median, _ = make_strategy(fed(strategy="fedmedian")).aggregate_train(1, [reply(i, w, 1) for i, w in enumerate(clients)])
    np.testing.assert_allclose(weights(median), [2.0, 5.0])
    # beta 0.2 of 5 clients: the lowest and the highest value of each weight are cut
    trimmed, _ = make_strategy(fed(strategy="fedtrimmedavg", trimmed_beta=0.2)).aggregate_train(1, [reply(i, w, 1) for i, w in enumerate(clients)])
    np.testing.assert_allclose(weights(trimmed), [(1 + 2 + 3) / 3, (3 + 5 + 7) / 3], rtol=1e-6)


def test_krum_picks_the_update_closest_to_its_neighbours():
    # 4 clients, no assumed attackers: each scores the squared distances to its 2 nearest others.
    values = [0.0, 0.1, 0.3, 10.0]
    scores = [sum(sorted((v - u) ** 2 for u in values if u is not v)[:2]) for v in values]
    arrays, _ = make_strategy(fed(strategy="krum")).aggregate_train(1, [reply(i, [v], 1) for i, v in enumerate(values)])
    assert weights(arrays)[0] == pytest.approx(values[int(np.argmin(scores))]) == pytest.approx(0.1)


def test_fedadam_step_through_the_offsite_wrapper_and_its_state():
    """Two rounds of FedAdam on the mean delta, with the wrapper in front (it must leave the
    strategy's round-start arrays right) and the float32 of the adapters kept."""
    cfg = fed(strategy="fedadam", fedopt_eta=0.01, fedopt_beta1=0.9, fedopt_beta2=0.99, fedopt_tau=1e-6)
    strategy = OffsiteStrategy(make_strategy(cfg), min_available_nodes=1, settle_s=0.0)
    grid = LocalGrid(2)
    x = np.array([1.0, -1.0, 0.5])
    m, v = np.zeros(3), np.zeros(3)
    for server_round, (a, b) in enumerate([([1.2, -1.0, 0.4], [1.0, -0.8, 0.2]), ([0.9, -1.1, 0.6], [1.1, -0.9, 0.5])], start=1):
        sent = ArrayRecord({"w": Array(x.astype(np.float32))})
        messages = list(strategy.configure_train(server_round, sent, ConfigRecord(), grid))
        assert len(messages) == 2
        arrays, _ = strategy.aggregate_train(server_round, [reply(1, a, 2), reply(2, b, 2)])
        delta = (np.array(a, dtype=np.float32) + np.array(b, dtype=np.float32)) / 2 - x.astype(np.float32)
        m = 0.9 * m + 0.1 * delta
        v = 0.99 * v + 0.01 * delta**2
        eta = 0.01 * math.sqrt(1 - 0.99 ** (server_round + 1)) / (1 - 0.9 ** (server_round + 1))  # Flower's bias correction
        x = x.astype(np.float32) + eta * m / (np.sqrt(v) + 1e-6)
        assert arrays["w"].dtype == "float32"
        np.testing.assert_allclose(weights(arrays), x, rtol=1e-5, atol=1e-6)
        x = weights(arrays).astype(np.float64)
    state = strategy.state_dict().tensors
    assert set(state) == {"m_t/w", "v_t/w"}
    np.testing.assert_allclose(state["m_t/w"], m, rtol=1e-5)
    np.testing.assert_allclose(state["v_t/w"], v, rtol=1e-5)


def test_fedavgm_momentum_and_its_state():
    strategy = make_strategy(fed(strategy="fedavgm", server_lr=1.0, server_momentum=0.5))
    grid, x0 = LocalGrid(1), np.array([1.0, 2.0], dtype=np.float32)
    strategy.configure_train(1, ArrayRecord({"w": Array(x0)}), ConfigRecord(), grid)
    x1, _ = strategy.aggregate_train(1, [reply(1, [0.0, 2.0], 1)])
    np.testing.assert_allclose(weights(x1), [0.0, 2.0])  # first round: momentum = the pseudo-gradient
    strategy.configure_train(2, x1, ConfigRecord(), grid)
    x2, _ = strategy.aggregate_train(2, [reply(1, [0.0, 1.0], 1)])
    momentum = 0.5 * (x0 - [0.0, 2.0]) + (weights(x1) - [0.0, 1.0])
    np.testing.assert_allclose(weights(x2), weights(x1) - momentum)
    state = strategy.state_dict()
    np.testing.assert_allclose(state.tensors["momentum/w"], momentum)
    assert state.meta == {"momentum_keys": ["w"]}
    fresh = make_strategy(fed(strategy="fedavgm", server_lr=1.0, server_momentum=0.5))  # a resumed run's strategy
    fresh.load_state_dict(state)
    np.testing.assert_allclose(fresh.momentum_vector[0], momentum)


def test_fedprox_sends_mu_and_the_term_adds_mu_times_the_drift_to_the_gradient():
    messages = make_strategy(fed(strategy="fedprox", proximal_mu=0.3)).configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(), LocalGrid(1))
    assert messages[0].content["config"]["proximal-mu"] == pytest.approx(0.3)

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    term = proximal_term([w], 0.3 / 2)  # anchored at the round start
    with torch.no_grad():
        w.add_(torch.tensor([0.4, 0.1, -0.2]))  # local training moved the weights
    base = lambda: (w**3).sum()  # noqa: E731 - any loss
    base().backward()
    plain = w.grad.clone()
    w.grad = None
    (base() + term()).backward()
    # by hand: mu * drift = 0.3 * [0.4, 0.1, -0.2]; the term is 0.15 * (0.16 + 0.01 + 0.04)
    torch.testing.assert_close(w.grad - plain, torch.tensor([0.12, 0.03, -0.06]))
    assert float(term().detach()) == pytest.approx(0.0315)


def _clip_through_the_mod(start: dict, trained: dict, clipping_norm: float | None) -> dict:
    """A train message through the app's DP mod (Flower's fixedclipping_mod when the config asks
    for clipping), the handler replying with ``trained``; the adapters that leave the node."""
    config = {P.SERVER_ROUND: 1, P.EMULATOR_SHA256: "0" * 64, **({P.CLIPPING_NORM: clipping_norm} if clipping_norm is not None else {})}
    message = Message(RecordDict({P.ARRAYS: ArrayRecord(start), P.CONFIG: ConfigRecord(config)}), dst_node_id=1, message_type=P.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={P.PARTITION_ID: 0, P.NUM_PARTITIONS: 1}, state=RecordDict(), run_config={})
    out = dp_clipping_mod(message, context, lambda msg, ctx: P.train_reply(msg, trained, {P.NUM_EXAMPLES: 1}))
    assert not out.has_error(), out.error
    return out.content[P.ARRAYS].to_torch_state_dict()


def test_client_clipping_is_flowers_mod_and_bounds_the_update_norm():
    start = {"a": torch.zeros(2), "b": torch.zeros(1)}
    # by hand: the update [3, 4 | 0] has norm 5; clipped to 0.5 it is scaled by 0.1
    clipped = _clip_through_the_mod(start, {"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(1)}, 0.5)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(clipped["b"], torch.zeros(1))
    exact = _clip_through_the_mod(start, {"a": torch.tensor([0.3, 0.4]), "b": torch.zeros(1)}, 0.5)  # norm exactly the clip
    torch.testing.assert_close(exact["a"], torch.tensor([0.3, 0.4]))
    small = _clip_through_the_mod(start, {"a": torch.tensor([0.03, 0.04]), "b": torch.tensor([0.1])}, 0.5)  # below: unchanged
    torch.testing.assert_close(small["a"], torch.tensor([0.03, 0.04]))
    unclipped = _clip_through_the_mod(start, {"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(1)}, None)  # no DP: untouched
    torch.testing.assert_close(unclipped["a"], torch.tensor([3.0, 4.0]))


def dp_round(strategy, server_round: int, grid, updates: dict[int, np.ndarray] | np.ndarray, size: int = 2000):
    """One DP round: configure on ``grid`` from zero adapters, every sampled node replying with
    its update (one array for all); returns (sampled nodes, released arrays)."""
    messages = list(strategy.configure_train(server_round, ArrayRecord({"w": Array(np.zeros(size, np.float32))}), ConfigRecord(), grid))
    nodes = [m.metadata.dst_node_id for m in messages]
    pick = (lambda n: updates[n]) if isinstance(updates, dict) else (lambda n: updates)
    arrays, _ = strategy.aggregate_train(server_round, [reply(n, pick(n), 10 * n, **{"unit-weight": 1}) for n in nodes])
    return nodes, arrays


def test_dp_wrapper_sends_the_norm_averages_unweighted_clips_again_and_adds_noise(monkeypatch):
    monkeypatch.delenv(UNSAFE_NOISE_SEED, raising=False)
    strategy = make_strategy(fed(strategy="fedavg", fraction_train=0.5, dp_clipping_norm=2.0, dp_noise_multiplier=1.5, dp_delta=1e-4))
    assert isinstance(strategy, ClientClippingDP)
    grid = LocalGrid(4)
    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2000, np.float32))}), ConfigRecord(), grid))
    assert len(messages) == 2 and strategy.num_sampled_clients == 2
    assert messages[0].content["config"]["clipping_norm"] == 2.0
    # updates of norm 0.5 * sqrt(2000) and 1.5 * sqrt(2000), far above the clip 2: the server clips
    # each to norm 2 (a client that skipped the mod gains nothing), i.e. every entry to 2/sqrt(2000)
    replies = [reply(n, np.full(2000, v), 10 * n, **{"unit-weight": 1}) for n, v in zip([m.metadata.dst_node_id for m in messages], (0.5, 1.5))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    noise = weights(arrays) - 2.0 / math.sqrt(2000)  # unweighted mean of the clipped updates
    assert abs(noise.mean()) < 0.1 and noise.std() == pytest.approx(1.5 * 2.0 / 2, rel=0.1)  # sigma C / m
    assert metrics["dp-epsilon"] == strategy.spent[1] and metrics["dp-delta"] == 1e-4 and metrics["dp-releases"] == 1

    tiny = make_strategy(fed(strategy="fedavg", fraction_train=1.0, dp_clipping_norm=1.0, dp_noise_multiplier=1e-9))
    grid = LocalGrid(2)
    nodes, arrays = dp_round(tiny, 1, grid, {1: np.array([3.0, 4.0]), 2: np.array([0.3, 0.4])}, size=2)
    np.testing.assert_allclose(weights(arrays), [(0.6 + 0.3) / 2, (0.8 + 0.4) / 2], rtol=1e-6)  # [3, 4] clipped to [0.6, 0.8]

    # a round where a sampled client did not answer is not released (the noise would be too small)
    strategy.configure_train(2, arrays, ConfigRecord(), LocalGrid(4))
    assert strategy.aggregate_train(2, [reply(1, [0.0] * 2000, 10, **{"unit-weight": 1})]) == (None, None)
    assert 2 not in strategy.spent


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a mu-GDP mechanism at delta (Balle & Wang 2018, Dong et al. 2019):
    the smallest eps with Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) <= delta. No accountant
    may report less for the same mechanism."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if phi(-mid / mu + mu / 2) - math.exp(mid) * phi(-mid / mu - mu / 2) > delta else (lo, mid)
    return hi


def rdp_gaussian_epsilon(noise_over_sensitivity: float, rounds: int, delta: float) -> float:
    """Epsilon at delta from first principles: T rounds of a Gaussian mechanism have RDP
    T * alpha / (2 z^2) at order alpha (Mironov 2017), converted with
    eps = rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1) (Canonne, Kamath &
    Steinke 2020, Prop. 12), minimised over a fine grid of orders."""
    orders = [1 + i / 100 for i in range(1, 100)] + [2 + i / 10 for i in range(0, 2000)]
    return min(rounds * a / (2 * noise_over_sensitivity**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in orders)


@pytest.mark.parametrize("nodes, fraction, sigma, rounds, delta", [(4, 1.0, 2.0, 3, 1e-5), (10, 0.3, 1.2, 5, 1e-6)])
def test_reported_epsilon_matches_an_independent_computation(nodes, fraction, sigma, rounds, delta):
    """Replace-one client-level DP: swapping one client's clipped update moves the mean of m by at
    most 2C/m, and the noise has std sigma C / m, so each round is a Gaussian mechanism with
    noise multiplier sigma/2 (docs/reliability.md). All nodes sampled: no amplification, and the
    reported epsilon must equal the RDP bound computed here from the closed form, and be no lower
    than the exact epsilon of the composed Gaussian (mu = sqrt(T) * 2 / sigma). A secret sample of
    m of n: the accountant composes sampled-without-replacement Gaussians, rebuilt here from
    dp-accounting's events."""
    from dp_accounting import dp_event, rdp
    from dp_accounting.privacy_accountant import NeighboringRelation

    strategy = make_strategy(fed(strategy="fedavg", fraction_train=fraction, dp_clipping_norm=1.0, dp_noise_multiplier=sigma, dp_delta=delta))
    grid = LocalGrid(nodes)
    for server_round in range(1, rounds + 1):
        sampled, _ = dp_round(strategy, server_round, grid, np.zeros(4), size=4)
    reported, m = strategy.spent[rounds], len(sampled)
    assert [r[1:] for r in strategy.releases] == [(m, nodes)] * rounds
    wrong = rdp_gaussian_epsilon(sigma, rounds, delta)  # sigma taken as the noise over the sensitivity
    if m == nodes:
        exact = gaussian_dp_epsilon(math.sqrt(rounds) * 2 / sigma, delta)
        assert reported == pytest.approx(rdp_gaussian_epsilon(sigma / 2, rounds, delta), rel=0.01)
        assert exact <= reported < 1.3 * exact and reported > 2 * wrong
    else:
        accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        accountant.compose(dp_event.SelfComposedDpEvent(dp_event.SampledWithoutReplacementDpEvent(nodes, m, dp_event.GaussianDpEvent(sigma / 2)), rounds))
        assert m == 3 and reported == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
        assert reported < rdp_gaussian_epsilon(sigma / 2, rounds, delta)  # the secret sample amplifies


def test_a_client_holding_the_run_config_cannot_predict_the_dp_noise_or_sample(monkeypatch):
    """Every node receives the run's seed. NumPy's global generator seeded with it (as the server
    seeds its global generators) gave Flower's noise: the guess was the noise itself. Now the
    noise comes from the server's secret generator: the best guess is uncorrelated with it; and
    the sample is not the one the seed predicts."""
    from fed_crash.federation.checkpoint import seed_everything

    monkeypatch.delenv(UNSAFE_NOISE_SEED, raising=False)
    size, seed = 20000, 0
    seed_everything(seed)  # what the server does before round 1
    strategy = make_strategy(fed(strategy="fedavg", fraction_train=1.0, dp_clipping_norm=1.0, dp_noise_multiplier=1.0))
    _, arrays = dp_round(strategy, 1, LocalGrid(2), np.zeros(size), size=size)
    noise = weights(arrays)  # the mean of zero updates: nothing but noise, std 1 * 1 / 2
    np.random.seed(seed)
    guess = np.random.normal(0, 0.5, size).astype(np.float32)
    assert noise.std() == pytest.approx(0.5, rel=0.05) and abs(np.corrcoef(noise, guess)[0, 1]) < 0.05

    # the sample: OffsiteStrategy seeds Python's random with (seed, round), as the attacker can
    grid, cfg = LocalGrid(10), dict(strategy="fedavg", fraction_train=0.5, dp_clipping_norm=1.0)
    predicted = OffsiteStrategy(make_strategy(fed(strategy="fedavg", fraction_train=0.5)), seed=seed)
    private = OffsiteStrategy(make_strategy(fed(**cfg)), seed=seed)
    zeros = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    samples = [[{m.metadata.dst_node_id for m in s.configure_train(r, zeros, ConfigRecord(), grid)} for s in (predicted, private)] for r in range(1, 6)]
    assert all(len(a) == len(b) == 5 for a, b in samples) and any(a != b for a, b in samples)

    # a fixed seed, for tests that compare runs, is a server environment variable (unsafe)
    monkeypatch.setenv(UNSAFE_NOISE_SEED, "7")
    same = [dp_round(make_strategy(fed(**{**cfg, "fraction_train": 1.0})), 1, LocalGrid(2), np.zeros(8), size=8)[1] for _ in range(2)]
    np.testing.assert_array_equal(weights(same[0]), weights(same[1]))


def test_bad_strategy_configs_fail_with_one_clear_line():
    with pytest.raises(ConfigError, match="'strategy' must be one of .*'fedavg'.*, got 'fedsgd'"):
        parse_run_config({"strategy": "fedsgd"})
    with pytest.raises(ConfigError, match="needs an unweighted mean: strategy fedavg or fedprox, got 'fedmedian'"):
        parse_run_config({"strategy": "fedmedian", "dp-clipping-norm": 1.0})
    with pytest.raises(ConfigError, match="dp-noise-multiplier > 0"):
        parse_run_config({"dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.0})
    with pytest.raises(ConfigError, match="trimmed-beta"):
        parse_run_config({"strategy": "fedtrimmedavg", "trimmed-beta": 0.5})
    with pytest.raises(ConfigError, match="need full adapter training"):
        parse_run_config({"strategy": "fedprox", "train.lora-rank": 4})
    assert sorted(STRATEGIES) == sorted(STRATEGY_NAMES) == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian", "fedprox", "fedtrimmedavg", "fedyogi", "krum"]


# --------------------------------------------------------------------------- FedBiOT alignment


@pytest.mark.parametrize("share, edge_fill", [(True, "nearest"), (False, "nearest"), (True, "adapter")])
def test_emulator_weights_invert_assembly(tiny_model, share, edge_fill):
    """What the server writes after changing an emulator is what it would cut from the model."""
    from fed_crash.core.emulator import EmulatorSpec, build_emulator, emulator_state, emulator_weights

    spec = EmulatorSpec(8, 2, 2, kept=(3, 4), share=share, edge_fill=edge_fill)
    expected = emulator_state(tiny_model, spec)
    got = emulator_weights(build_emulator(tiny_model, spec))
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_alignment_pulls_the_emulator_toward_the_full_model_and_trains_only_its_middle(tiny_model, tokenizer):
    from fed_crash.core.data import batches, pad_id, tokenize
    from fed_crash.core.emulator import EmulatorSpec, build_emulator, emulator_weights
    from fed_crash.federation.fedbiot import _top_input, align_emulator, normalised_mse
    from fed_crash.core.models import get_layers
    from tests.conftest import ROWS

    spec = EmulatorSpec(8, 2, 2, kept=(3, 5), share=True)  # shared: positions 2, 4 (and 6, 7) reuse 3 and 5
    emulator = build_emulator(tiny_model, spec)
    examples = tokenize(ROWS[:8], tokenizer, max_length=256)
    batch = next(batches(examples, 8, pad_id(tokenizer)))

    def gap() -> float:
        top = spec.num_layers - spec.top
        emu_top = get_layers(emulator.model)[[src for src, _ in spec.layer_map()].index(top)]
        with torch.no_grad():
            return float(normalised_mse(_top_input(emulator.model, emu_top, batch), _top_input(tiny_model, get_layers(tiny_model)[top], batch),
                                        batch["attention_mask"]))

    before_weights = {k: v.clone() for k, v in emulator_weights(emulator).items()}
    before_adapters, full = emulator.adapter_state(), {k: v.clone() for k, v in tiny_model.state_dict().items()}
    start = gap()
    stats = align_emulator(emulator, tiny_model, examples, pad_id(tokenizer), steps=30, lr=3e-3, batch_size=8)
    assert stats["steps"] == 30 and stats["last_loss"] < stats["first_loss"] == pytest.approx(start, rel=1e-4)
    assert gap() < 0.8 * start
    after = emulator_weights(emulator)
    changed = {k.split(".")[2] for k in after if not torch.equal(after[k], before_weights[k])}
    assert changed == {"3", "5"}  # only the kept middle layers; embeddings, norm unchanged
    assert all(torch.equal(v, before_adapters[k]) for k, v in emulator.adapter_state().items())
    assert all(torch.equal(v, full[k]) for k, v in tiny_model.state_dict().items())
    trainable = {id(p) for p in emulator.trainable_parameters()}
    assert all(p.requires_grad == (id(p) in trainable) for p in emulator.model.parameters())  # as before alignment


def test_normalised_mse_by_hand():
    from fed_crash.federation.fedbiot import normalised_mse

    teacher = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    student = torch.tensor([[[1.0, 1.0], [3.0, 6.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the padded third position does not count
    assert float(normalised_mse(student, teacher, mask)) == pytest.approx((1 + 4) / (1 + 4 + 9 + 16))
