"""Emulator specs: OFT's uniform choice, CRaSh clustering, sharing, validation, tied weights."""

import pytest
import torch

from fed_crash.core.emulator import EmulatorSpec, SpecError, adapter_state, assemble, build_emulator, emulator_state
from fed_crash.selection import cluster_adjacent, make_spec, uniform_indices
from fed_crash.core.models import get_layers, layer_path


@pytest.mark.parametrize("n,k", [(26, 10), (26, 14), (26, 18), (4, 2), (9, 3), (5, 5)])
def test_uniform_indices_follow_the_oft_formula(n, k):
    assert uniform_indices(n, k) == [round(i * (n - 1) / (k - 1)) for i in range(k)]


def test_default_spec_for_a_30_layer_model_is_2_10_2():
    spec = make_spec("uniform", 30)
    assert spec.adapters == (0, 1, 28, 29)
    assert spec.kept == (2, 5, 8, 10, 13, 16, 19, 21, 24, 27)  # 2 + [0,3,6,8,11,14,17,19,22,25]
    assert len(spec.layer_map()) == 30  # sharing keeps the depth
    assert len(make_spec("uniform", 30, share=False).layer_map()) == 14
    assert make_spec("uniform", 30, keep_ratio=0.5).kept.__len__() == 13


def adjacent_similarity(values):
    """An L x L matrix whose adjacent entries are ``values`` (the only ones clustering reads)."""
    n = len(values) + 1
    sim = torch.eye(n)
    for i, v in enumerate(values):
        sim[i, i + 1] = sim[i + 1, i] = v
    return sim


def test_clustering_on_a_constructed_matrix():
    # 12 layers, adapters 0,1 and 10,11; middle 2..9. Lowest adjacent CKA inside the middle at
    # 4|5 (0.1) and 7|8 (0.2): three clusters [2,3,4] [5,6,7] [8,9].
    adj = [0.9, 0.0, 0.95, 0.97, 0.1, 0.96, 0.94, 0.2, 0.99, 0.0, 0.9]
    sim = adjacent_similarity(adj)
    assert cluster_adjacent(sim, range(2, 10), 3) == [[2, 3, 4], [5, 6, 7], [8, 9]]
    spec = make_spec("crash", 12, keep=3, similarity=sim)
    assert spec.clusters == ((2, 3, 4), (5, 6, 7), (8, 9))
    assert spec.kept == (3, 6, 9)  # cluster[len // 2]
    # adjacent-only merging == cutting at the k-1 lowest adjacent values
    assert cluster_adjacent(sim, range(2, 10), 8) == [[i] for i in range(2, 10)]
    assert cluster_adjacent(sim, range(2, 10), 1) == [list(range(2, 10))]


def test_clustering_merges_by_boundary_layers_not_averages():
    # Boundary rule: after [2,3] merges, its link to 4 is sim[3,4], not an average with sim[2,4].
    sim = adjacent_similarity([0, 0, 0.9, 0.5, 0, 0])
    sim[2, 4] = sim[4, 2] = 0.0
    assert cluster_adjacent(sim, [2, 3, 4], 2) == [[2, 3], [4]]
    assert cluster_adjacent(sim, [2, 3, 4], 1) == [[2, 3, 4]]


def test_sharing_map_nearest_kept_layer_ties_go_right():
    spec = EmulatorSpec(12, 2, 2, kept=(3, 6, 9))
    assert spec.removed == (2, 4, 5, 7, 8)
    assert spec.sharing_map() == {2: 3, 4: 3, 5: 6, 7: 6, 8: 9}
    spec = EmulatorSpec(12, 2, 2, kept=(3, 5, 9))
    assert spec.sharing_map()[4] == 5  # 4 is between 3 and 5: tie goes right
    assert spec.sharing_map()[7] == 9  # 7 is 2 from 5 and 2 from 9: tie goes right


def test_sharing_off_and_adapter_edge_fill():
    assert set(EmulatorSpec(12, 2, 2, kept=(4, 6), share=False).sharing_map().values()) == {None}
    spec = EmulatorSpec(12, 2, 2, kept=(4, 6), edge_fill="adapter")
    fill = spec.sharing_map()
    assert fill[2] == 1 and fill[3] == 1  # before the first kept: frozen copy of bottom adapter 1
    assert fill[7] == 10 and fill[9] == 10  # after the last kept: copy of top adapter 10
    assert fill[5] == 6
    roles = dict(spec.layer_map()[i] for i in (2, 9))
    assert roles == {1: "frozen_copy", 10: "frozen_copy"}
    assert spec.slots()[-2:] == [(1, "frozen_copy"), (10, "frozen_copy")]


@pytest.mark.parametrize("kwargs,match", [
    ({"bottom": 15, "top": 15}, r"bottom 15 \+ top 15 = 30 >= 30"),
    ({"keep": 27}, "cannot keep 27 layers: the middle span has 26"),
    ({"keep_ratio": 1.5}, "keep_ratio must be in"),
    ({"bottom": -1}, "must be >= 0"),
])
def test_impossible_specs_are_rejected_with_the_numbers(kwargs, match):
    with pytest.raises(SpecError, match=match):
        make_spec("uniform", 30, **kwargs)


def test_spec_validation_names_bad_layers():
    with pytest.raises(SpecError, match=r"kept layers \[1\] are outside the middle span 2..9"):
        EmulatorSpec(12, 2, 2, kept=(1, 4))
    with pytest.raises(SpecError, match="needs a layer similarity"):
        make_spec("crash", 12)
    with pytest.raises(SpecError, match="unknown emulator method"):
        make_spec("random", 12)


def test_shared_positions_are_the_same_module(tiny_model):
    spec = EmulatorSpec(8, 2, 2, kept=(3,))
    emulator = build_emulator(tiny_model, spec)
    layers = get_layers(emulator.model)
    assert len(layers) == 8
    assert all(layers[pos] is layers[3] for pos in (2, 4, 5))  # tied: one module, stored once
    assert layers[0] is not layers[1]
    distinct = {id(m) for m in layers}
    assert len(distinct) == 5  # 4 adapters + 1 kept
    # only the adapters train
    trainable = {n.split(".")[2] for n, p in emulator.model.named_parameters() if p.requires_grad}
    assert trainable == {"0", "1", "6", "7"}


def test_emulator_equal_to_the_full_model_gives_the_same_logits(tiny_model):
    spec = EmulatorSpec(8, 2, 2, kept=(2, 3, 4, 5))
    emulator = build_emulator(tiny_model, spec)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(emulator.model(ids).logits, tiny_model(ids).logits, atol=1e-5)


def test_assemble_adopts_frozen_tensors_and_copies_the_adapters(tiny_model):
    """A client's emulator holds its weights once (the loaded tensors themselves), while the
    adapters it trains never alias the caller's; the server's build_emulator shares nothing."""
    spec = EmulatorSpec(8, 2, 2, kept=(3, 5))
    state = {**emulator_state(tiny_model, spec), **adapter_state(tiny_model, spec)}
    state = {k: v.clone() for k, v in state.items()}
    emulator = assemble(tiny_model.config, state, spec)
    own = {t.data_ptr() for t in emulator.model.state_dict().values()}
    kept = [k for k in state if k.startswith(f"{layer_path(tiny_model)}.3.")]
    assert kept and all(state[k].data_ptr() in own for k in kept)
    assert not {state[k].data_ptr() for k in adapter_state(tiny_model, spec)} & own
    built = build_emulator(tiny_model, spec)
    assert not {t.data_ptr() for t in built.model.state_dict().values()} & {t.data_ptr() for t in tiny_model.state_dict().values()}
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(emulator.model(ids).logits, built.model(ids).logits)


def test_spec_round_trips_through_a_dict():
    spec = make_spec("crash", 12, keep=3, similarity=adjacent_similarity([0.5] * 11))
    assert EmulatorSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="unknown emulator spec fields"):
        EmulatorSpec.from_dict({**spec.to_dict(), "colour": 1})


def test_the_full_method_is_the_ceiling_and_only_it_may_send_every_layer(tiny_model):
    """``full`` keeps every middle layer (the adapters train on the model itself) and is the one
    spec check_cut lets through without a removed layer; any other method keeping them all is refused."""
    from fed_crash.core.artifacts import PrivacyError, check_cut

    spec = make_spec("full", 8, bottom=2, top=2)
    assert spec.kept == (2, 3, 4, 5) and spec.removed == () and spec.method == "full"
    check_cut(spec)
    with pytest.raises(PrivacyError, match="keeps all 4 middle layers"):
        check_cut(make_spec("uniform", 8, bottom=2, top=2, keep=4))
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(build_emulator(tiny_model, spec).model(ids).logits, tiny_model(ids).logits)
