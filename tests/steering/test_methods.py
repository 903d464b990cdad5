"""The registry of direction methods (mechsteer.steering.methods): a name registered twice is
refused, an unknown one is refused naming the registered ones, a plug-in's method is found through
the entry points on a miss, and every reader (build_directions, DirectionSet, RunConfig, the
directions command) takes it."""

from __future__ import annotations

import argparse
import dataclasses
from unittest.mock import NonCallableMock

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

from mechsteer.cli import directions as directions_cli
from mechsteer.core.errors import ConfigError
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.steering import direction_set as direction_set_module
from mechsteer.steering import methods
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.labels import BehaviourLabels
from mechsteer.steering.methods import (
    DirectionInputs,
    DirectionMethodSpec,
    DirectionSettings,
    direction_method_names,
    direction_method_spec,
    register_direction_method,
)
from mechsteer.steering.stage import build_directions

BUILT_IN = ["mean", "sae", "optimised"]


def model() -> TransformerBridge:
    """A stand-in bridge: the builders here never run it."""
    return NonCallableMock(spec=TransformerBridge)


@pytest.fixture
def registry(monkeypatch):
    """The registries as they are, restored after the test."""
    monkeypatch.setattr(methods.METHODS, "_entries", dict(methods.METHODS._entries))
    monkeypatch.setattr(direction_set_module, "_SET_METHODS", list(direction_set_module._SET_METHODS))


def small_set(method: str) -> DirectionSet:
    return DirectionSet(model_name="m", d_model=4, n_layers=2, layer=1, site="resid_post", method=method,
                        behaviour_ids=[0], titles=["t"], directions=torch.ones(1, 4))


def fixed_builder(seen: list[DirectionInputs]):
    def build(inputs: DirectionInputs) -> DirectionSet:
        seen.append(inputs)
        return small_set("plugged")
    return build


def test_the_built_in_methods_are_registered_with_what_they_need():
    assert set(BUILT_IN) <= set(direction_method_names())
    assert [direction_method_spec(name).needs_thinking for name in BUILT_IN] == [False, True, False]
    assert [direction_method_spec(name).needs_taxonomy for name in BUILT_IN] == [False, True, False]
    assert DirectionSettings("sae", 1).needs_thinking and not DirectionSettings("mean", 1).needs_thinking


def test_a_method_registered_twice_is_refused(registry):
    mean = direction_method_spec("mean")
    with pytest.raises(ValueError, match="direction method 'mean' is already registered; pass replace=True"):
        register_direction_method(dataclasses.replace(mean, description="other"))
    register_direction_method(dataclasses.replace(mean, description="other"), replace=True)
    assert direction_method_spec("mean").description == "other"


def test_an_unknown_method_is_refused_naming_the_registered_ones(registry, install_plugin):
    calls = install_plugin(lambda: None)
    with pytest.raises(ConfigError, match=r"^unknown direction method 'nope'; registered: \['mean', .*'optimised', .*'sae'"):
        direction_method_spec("nope")
    assert calls == ["register"]  # the plug-ins were asked first
    with pytest.raises(ValueError, match=r"method must be one of \(.*'random', 'correction', 'mean', 'sae', 'optimised'.*got 'mean\+nope'"):
        small_set("mean+nope")
    with pytest.raises(ConfigError, match=r"unknown direction_method 'nope'; registered direction methods: \['mean'"):
        RunConfig.from_dict({**dataclasses.asdict(DEMO_CONFIG), "direction_method": "nope"})


def test_a_plug_in_method_is_loaded_on_a_miss_and_read_everywhere(registry, install_plugin):
    seen: list[DirectionInputs] = []
    calls = install_plugin(lambda: register_direction_method(
        DirectionMethodSpec("plugged", fixed_builder(seen), "plugged-in directions")))
    assert small_set("mean+plugged").method == "mean+plugged"  # a set (and a sum) may name it
    assert calls == ["register"]
    assert direction_method_spec("plugged").description == "plugged-in directions"
    config = RunConfig.from_dict({**dataclasses.asdict(DEMO_CONFIG), "direction_method": "plugged"})
    assert config.direction_method == "plugged"
    parser = argparse.ArgumentParser()
    directions_cli.register(parser.add_subparsers())
    args = parser.parse_args(["directions", "--pair", "organism-base,organism-thinking", "--traces", "t",
                              "--out", "o", "--method", "plugged"])
    assert args.method == "plugged"
    assert calls == ["register"]  # once


def test_build_directions_runs_the_registered_builder(registry):
    seen: list[DirectionInputs] = []
    register_direction_method(DirectionMethodSpec("plugged", fixed_builder(seen), "plugged-in directions"))
    labels = BehaviourLabels(lambda sentence: None, [0], ["t"], source="test labels")
    settings = DirectionSettings("plugged", 1)
    base, traces = model(), []  # the builder is given them as they are
    result = build_directions(base, traces, labels, settings, provenance={"traces": "here"})
    assert result.method == "plugged" and len(seen) == 1
    assert (seen[0].base, seen[0].thinking_traces, seen[0].labels, seen[0].settings) == (base, traces, labels, settings)
    assert seen[0].skip_empty  # ground-truth-like labels: no taxonomy
    assert result.provenance == {"labels": "test labels", "settings": dataclasses.asdict(settings), "traces": "here"}


def test_what_a_method_needs_is_refused_before_it_builds(registry):
    seen: list[DirectionInputs] = []
    register_direction_method(DirectionMethodSpec("plugged", fixed_builder(seen), "plugged-in directions",
                                                  needs_thinking=True))
    labels = BehaviourLabels(lambda sentence: None, [0], ["t"])
    with pytest.raises(ConfigError, match="direction method 'plugged' needs the thinking model"):
        build_directions(model(), [], labels, DirectionSettings("plugged", 1))
    with pytest.raises(ConfigError, match="direction method 'sae' needs a taxonomy's labels"):
        build_directions(model(), [], labels, DirectionSettings("sae", 1), thinking=model())
    assert seen == []
