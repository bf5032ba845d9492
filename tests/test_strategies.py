"""The strategies package on hand-made client updates: every expected value is computed here
from the method's formula, not taken from the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fed_crash.config import ConfigError, FederationConfig, parse_run_config
from fed_crash.federation.client import dp_clipping_mod
from fed_crash.federation import protocol as P
from fed_crash.core.train import proximal_term
from fed_crash.config import STRATEGY_NAMES
from strategies import STRATEGIES, ClientClippingDP, OffsiteStrategy, make_strategy
from tests.conftest import LocalGrid


pytestmark = pytest.mark.usefixtures("server_identity")  # conftest: messages need a process identity


def reply(node: int, w: list[float], examples: int, **metrics: float) -> Message:
    """A train reply as a node sends it: one ArrayRecord, one MetricRecord with num-examples."""
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32))}),
        "metrics": MetricRecord({"num-examples": examples, **metrics}),
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
    config = {P.SERVER_ROUND: 1, P.WEIGHTS_SHA256: "0" * 64, **({P.CLIPPING_NORM: clipping_norm} if clipping_norm is not None else {})}
    message = Message(RecordDict({P.ARRAYS: ArrayRecord(start), P.CONFIG: ConfigRecord(config)}), dst_node_id=1, message_type=P.TRAIN)
    out = dp_clipping_mod(message, None, lambda msg, ctx: P.train_reply(msg, trained, {P.NUM_EXAMPLES: 1}))
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


def test_dp_wrapper_sends_the_norm_averages_unweighted_adds_noise_and_accounts():
    from dp_accounting import dp_event, rdp
    from dp_accounting.privacy_accountant import NeighboringRelation

    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    strategy = make_strategy(fed(strategy="fedavg", fraction_train=0.5, dp_clipping_norm=2.0, dp_noise_multiplier=1.5, dp_delta=1e-4))
    assert isinstance(strategy, ClientClippingDP)
    grid = LocalGrid(4)
    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2000, np.float32))}), ConfigRecord(), grid))
    assert len(messages) == 2 and strategy.num_sampled_clients == 2
    assert messages[0].content["config"]["clipping_norm"] == 2.0
    a, b = np.full(2000, 1.0), np.full(2000, 3.0)
    arrays, _ = strategy.aggregate_train(1, [reply(1, a, 10, **{"unit-weight": 1}), reply(2, b, 30, **{"unit-weight": 1})])
    noise = weights(arrays) - 2.0  # unweighted mean (by examples it would be 2.5)
    assert abs(noise.mean()) < 0.1 and noise.std() == pytest.approx(1.5 * 2.0 / 2, rel=0.1)

    accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_event.SampledWithoutReplacementDpEvent(4, 2, dp_event.GaussianDpEvent(1.5)))
    assert strategy.spent[1].epsilon == pytest.approx(accountant.get_epsilon(1e-4), rel=1e-6)
    assert strategy.spent[1].delta == 1e-4

    # a round where a sampled client did not answer is not released (the noise would be too small)
    strategy.configure_train(2, arrays, ConfigRecord(), grid)
    assert strategy.aggregate_train(2, [reply(1, a, 10, **{"unit-weight": 1})]) == (None, None)
    assert 2 not in strategy.spent


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
