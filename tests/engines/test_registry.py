"""The registry of generation engines (mechsteer.engines.registry): a name registered twice is
refused, an unknown one is refused naming the registered ones, a plug-in's engine is found through
the entry points on a miss, and a run builds it from its config (plain_generator)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from mechsteer.core.errors import ConfigError
from mechsteer.core.resident import ResidentPair
from mechsteer.engines import OpenAIEngine, make_engine, registry
from mechsteer.engines.base import CompletionGroup, GenerationRequest, GenerationSettings
from mechsteer.engines.registry import (
    EngineInputs,
    EngineSpec,
    engine_names,
    engine_spec,
    register_engine,
)
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.pipeline import plain_generator


@pytest.fixture
def engines(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(registry.ENGINES, "_entries", dict(registry.ENGINES._entries))


class RecordedEngine:
    """An engine that keeps what it was built from (it never generates here)."""

    kind = "recorded"

    def __init__(self, inputs: EngineInputs) -> None:
        self.inputs, self.tokenizer = inputs, inputs.tokenizer
        self.model_name = inputs.model_name or ""

    def record_settings(self) -> dict[str, Any]:
        return {"engine": self.kind}

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings
                 ) -> Iterator[CompletionGroup]:
        raise NotImplementedError


def test_the_built_in_engines_are_registered_with_what_they_run_on():
    assert engine_names()[:2] == ["bridge", "openai"]
    assert (engine_spec("bridge").runs_on, engine_spec("openai").runs_on) == ("bridge", "server")


def test_an_engine_registered_twice_is_refused(engines):
    with pytest.raises(ValueError, match="engine 'openai' is already registered; pass replace=True"):
        register_engine(EngineSpec("openai", "server", RecordedEngine))
    register_engine(EngineSpec("openai", "server", RecordedEngine), replace=True)
    assert isinstance(make_engine("openai", url="http://127.0.0.1:9/v1", server_model="m"), RecordedEngine)


def test_an_unknown_engine_is_refused_naming_the_registered_ones(engines, install_plugin):
    calls = install_plugin(lambda: None)
    with pytest.raises(ConfigError, match=r"^unknown engine 'vllm'; registered: \['bridge', .*'openai'"):
        make_engine("vllm")
    assert calls == ["register"]  # the plug-ins were asked first
    with pytest.raises(ConfigError, match=r"unknown engine 'vllm'; registered engines: \['bridge', .*'openai'"):
        RunConfig.from_dict({**dataclasses.asdict(DEMO_CONFIG), "engine": "vllm"})


def test_a_plug_in_server_engine_is_loaded_on_a_miss_and_built_from_the_run(engines, install_plugin):
    calls = install_plugin(lambda: register_engine(EngineSpec("recorded", "server", RecordedEngine)))
    data = {**dataclasses.asdict(DEMO_CONFIG), "engine": "recorded"}
    with pytest.raises(ConfigError, match="engine 'recorded' asks a server and needs engine_url"):
        RunConfig.from_dict(data)  # a server engine, as the registry says
    assert calls == ["register"]
    config = RunConfig.from_dict({**data, "engine_url": "http://127.0.0.1:9/v1", "engine_url_base": "http://h:8/v1",
                                  "engine_model_thinking": "served-thinking", "engine_timeout": 30.0,
                                  "engine_return_token_ids": True})
    pair = ResidentPair(config.base_model, config.thinking_model, device="cpu")
    thinking, base = plain_generator(config, pair, "thinking"), plain_generator(config, pair, "base")
    assert isinstance(thinking, RecordedEngine) and isinstance(base, RecordedEngine)
    assert pair.loads == []  # a server engine gets the tokenizer, never the weights
    assert thinking.inputs.model is None and thinking.inputs.tokenizer is not None
    assert (thinking.inputs.model_name, thinking.inputs.url, thinking.inputs.server_model) == (
        config.thinking_model, "http://127.0.0.1:9/v1", "served-thinking")
    assert (base.inputs.model_name, base.inputs.url, base.inputs.server_model) == (
        config.base_model, "http://h:8/v1", config.base_model)
    assert thinking.inputs.http is not None and thinking.inputs.http.timeout == 30.0
    assert thinking.inputs.return_token_ids
    assert calls == ["register"]  # once


def test_the_bridge_and_openai_engines_are_built_through_the_registry(engines):
    built: list[str] = []

    def counting(spec: EngineSpec) -> EngineSpec:
        def build(inputs: EngineInputs) -> Any:
            built.append(spec.name)
            return spec.build(inputs)
        return dataclasses.replace(spec, build=build)

    for name in ("bridge", "openai"):
        register_engine(counting(engine_spec(name)), replace=True)
    config = dataclasses.replace(DEMO_CONFIG, engine="openai", engine_url="http://127.0.0.1:9/v1")
    pair = ResidentPair(config.base_model, config.thinking_model, device="cpu")
    assert isinstance(plain_generator(config, pair, "base"), OpenAIEngine) and built == ["openai"]
    with pytest.raises(ConfigError, match="the bridge engine needs the loaded model"):
        make_engine("bridge")
    assert built == ["openai", "bridge"]
