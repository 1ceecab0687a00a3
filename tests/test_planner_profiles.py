"""Profiles: graph.txt and JSON I/O, the published DAPPLE profiles, and every bad-input path."""

import os

import numpy as np
import pytest

from planner.graph_txt import format_graph_txt, load_profile, parse_graph_txt, write_graph_txt
from planner.profile import LayerCost, Profile, ProfileError
from planner.states import antichain_states, hpgo_states, topological_states

DATA = os.path.join(os.path.dirname(__file__), "data", "profiles", "dapple")
PUBLISHED = sorted(f for f in os.listdir(DATA) if f.endswith(".txt"))


def _count_lines(path):
    nodes = edges = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            if line[0] in " \t":
                edges += 1
            else:
                nodes += 1
    return nodes, edges


def test_there_are_thirteen_published_profiles():
    assert len(PUBLISHED) == 13


@pytest.mark.parametrize("name", PUBLISHED)
def test_every_published_profile_loads_with_all_its_nodes_and_edges(name):
    path = os.path.join(DATA, name)
    profile = load_profile(path, batch_size=8)
    nodes, edges = _count_lines(path)
    assert len(profile.layers) == nodes
    assert len(profile.edges) == edges
    assert all(layer.forward_ms >= 0 and layer.activation_bytes >= 0 for layer in profile.layers)
    # every profile yields cut points, and the last state covers every kept layer
    states = hpgo_states(profile)
    assert len(states) >= 1


def test_activation_lists_are_summed_and_descriptions_kept():
    profile = load_profile(os.path.join(DATA, "amoeba-18-pbs-8.txt"), batch_size=8)
    stem = profile.layers[1]
    assert stem.name == "node2" and stem.description == "stem"
    assert stem.activation_bytes == 37850112 + 12616704


def test_edge_lines_may_be_indented_with_spaces_or_tabs():
    text = (
        "a -- A -- forward_compute_time=1, backward_compute_time=2, activation_size=3, parameter_size=4\n"
        "b -- B -- forward_compute_time=1, backward_compute_time=2, activation_size=3, parameter_size=4\n"
        "c -- C -- forward_compute_time=1, backward_compute_time=2, activation_size=3, parameter_size=4\n"
        "\ta -- b\n    b -- c\n"
    )
    profile = parse_graph_txt(text, 2)
    assert profile.edges == ((0, 1), (1, 2))


def test_descriptions_may_contain_anything_but_the_separator():
    text = (
        "n1 -- EmuBidirLSTM(  (bidir): LSTM(1024, 1024, bidirectional=True)) -- forward_compute_time=1.5, "
        "backward_compute_time=2, activation_size=[1; 2.5], parameter_size=4\n"
    )
    layer = parse_graph_txt(text, 1).layers[0]
    assert layer.description == "EmuBidirLSTM(  (bidir): LSTM(1024, 1024, bidirectional=True))"
    assert layer.activation_bytes == 3.5


@pytest.mark.parametrize(
    "name", ["xlnet-36-pbs-1.txt", "gnmt-32-pbs-64.txt", "amoeba-36-pbs-1.txt"]
)
def test_graph_txt_round_trip_gives_an_equal_profile(name, tmp_path):
    profile = load_profile(os.path.join(DATA, name), batch_size=4)
    out = tmp_path / "g.txt"
    write_graph_txt(profile, out)
    again = load_profile(out, batch_size=4)
    assert again == profile


def test_json_round_trip_keeps_descriptions(tmp_path):
    profile = load_profile(os.path.join(DATA, "vgg-19-pbs-32.txt"), batch_size=32)
    path = tmp_path / "p.json"
    profile.save_json(path)
    again = Profile.load(path)
    assert again == profile
    assert again.layers[1].description == "Conv2d_1_1"


def test_profiles_from_our_profiler_write_to_graph_txt_and_back():
    layers = [
        LayerCost("embedding", 1.0, 2.0, 100.0, 10.0),
        LayerCost("layer_0", 1.25, 2.5, 50.0, 0.0),
    ]
    profile = Profile.chain(layers, batch_size=4)
    text = format_graph_txt(profile)
    assert text.splitlines()[0].startswith("embedding -- embedding -- forward_compute_time=1.000")
    again = parse_graph_txt(text, 4)
    assert again.layer_names == ("embedding", "layer_0")
    assert again.edges == profile.edges
    assert [l.forward_ms for l in again.layers] == [1.0, 1.25]


# ---- inputs, getitem sinks and states --------------------------------------------------------------
def test_inputs_cost_nothing_and_getitem_sinks_are_dropped_from_states():
    text = (
        "n1 -- Input0 -- forward_compute_time=50, backward_compute_time=0, activation_size=10, parameter_size=0\n"
        "n2 -- Lstm -- forward_compute_time=1, backward_compute_time=2, activation_size=100, parameter_size=7\n"
        "n3 -- __getitem__(1) -- forward_compute_time=9, backward_compute_time=9, activation_size=5, parameter_size=0\n"
        "n4 -- Head -- forward_compute_time=3, backward_compute_time=4, activation_size=1, parameter_size=1\n"
        "\tn1 -- n2\n\tn2 -- n3\n\tn2 -- n4\n"
    )
    profile = parse_graph_txt(text, 1)
    states = antichain_states(profile)
    assert len(states) == 2  # Lstm, Head
    assert states.compute_s[-1] == pytest.approx((1 + 2 + 3 + 4) / 1000)
    assert states.out_bytes[0] == 100
    # the dropped and zeroed layers still land in a stage
    assert states.stage_layers(profile, [0, 1]) == [["n1", "n2", "n3"], ["n4"]]


def test_xlnet_state_21_ends_at_layer_17_as_in_the_published_planner():
    states = antichain_states(load_profile(os.path.join(DATA, "xlnet-36-pbs-1.txt"), 1))
    assert len(states) == 41
    assert states.labels[21] == "Layer_17"


def test_topological_states_count_bytes_still_needed_after_a_cut():
    # a -> b -> c and a -> c: a cut after b carries a's and b's outputs
    layers = [LayerCost(n, 1, 1, act, 0) for n, act in (("a", 10), ("b", 20), ("c", 1))]
    profile = Profile(tuple(layers), ((0, 1), (1, 2), (0, 2)), 1)
    states = topological_states(profile)
    np.testing.assert_allclose(states.out_bytes[:2], [10, 30])


def test_gnmt32_is_too_branchy_for_antichains_and_falls_back_to_topological_cuts():
    states = hpgo_states(load_profile(os.path.join(DATA, "gnmt-32-pbs-64.txt"), 64))
    assert states.kind == "topological"
    assert "antichain" in states.note


# ---- bad input ---------------------------------------------------------------------------------------
def _write(tmp_path, text, name="bad.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GOOD = "n1 -- A -- forward_compute_time=1, backward_compute_time=2, activation_size=3, parameter_size=4\n"


@pytest.mark.parametrize(
    "text, line, expected",
    [
        (GOOD + "n2 -- B\n", 2, "expected a node line"),
        (
            GOOD
            + "n2 -- B -- forward_compute_time=x, backward_compute_time=2, activation_size=3, parameter_size=4\n",
            2,
            "expected a number for forward_compute_time",
        ),
        (
            GOOD
            + "n2 -- B -- forward_compute_time=1, backward_compute_time=2, activation_size=3\n",
            2,
            "expected 4 metrics",
        ),
        (
            GOOD
            + "n2 -- B -- forward_time=1, backward_compute_time=2, activation_size=3, parameter_size=4\n",
            2,
            "expected 'forward_compute_time=<number>'",
        ),
        (
            GOOD
            + "n2 -- B -- forward_compute_time=1, backward_compute_time=2, activation_size=[3; 4, parameter_size=4\n",
            2,
            "expected",
        ),
        (GOOD + "\tn1 -- n9\n", 2, "names node 'n9'"),
        (GOOD + "\tn1 n9\n", 2, "expected an edge line"),
        (GOOD + GOOD, 2, "defined twice"),
    ],
)
def test_malformed_graph_txt_names_file_line_and_expectation(tmp_path, text, line, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as err:
        load_profile(path, batch_size=1)
    assert f"{path}:{line}" in str(err.value)
    assert expected in str(err.value)


def test_an_empty_graph_txt_is_refused(tmp_path):
    with pytest.raises(ProfileError, match="expected node lines"):
        load_profile(_write(tmp_path, "\n\n"), batch_size=1)


def test_graph_txt_needs_a_profile_batch_size(tmp_path):
    with pytest.raises(ProfileError, match="does not record its batch size"):
        load_profile(_write(tmp_path, GOOD))


def test_a_missing_profile_file_is_named(tmp_path):
    with pytest.raises(ProfileError, match="cannot read profile .*nope.txt"):
        load_profile(tmp_path / "nope.txt", 1)


def test_json_profile_batch_size_must_agree_with_the_one_given(tmp_path):
    path = tmp_path / "p.json"
    Profile.chain([LayerCost("a", 1, 1, 1, 1)], batch_size=4).save_json(path)
    with pytest.raises(ProfileError, match="batch size is 4 in the file but 8 was given"):
        load_profile(path, 8)


def test_malformed_json_profile_names_the_line(tmp_path):
    path = _write(tmp_path, '{"format": "dapple-profile/1",\n "layers": [,]}', "p.json")
    with pytest.raises(ProfileError, match=r"p.json:2: not valid JSON"):
        load_profile(path)


def test_a_cyclic_profile_is_refused_with_the_layers_named():
    layers = [LayerCost(n, 1, 1, 1, 0) for n in "abc"]
    profile = Profile(tuple(layers), ((0, 1), (1, 2), (2, 1)), 1)
    with pytest.raises(ProfileError, match="cycle"):
        topological_states(profile)
