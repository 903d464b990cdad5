"""Generation engines by name: the registry a run's ``engine`` and ``mechsteer traces --engine`` read.

An engine is an :class:`EngineSpec`: its name, what it runs on (``bridge``: the loaded model;
``server``: the weights are served elsewhere, so only the tokenizer loads and ``engine_url`` is
required), and a factory ``build(EngineInputs) -> GenerationEngine``. The built-in ones are
``bridge`` (:class:`~mechsteer.engines.bridge.BridgeEngine`) and ``openai``
(:class:`~mechsteer.engines.openai.OpenAIEngine`); a plug-in adds its own with
:func:`register_engine` (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mechsteer.core.errors import ConfigError
from mechsteer.core.http import HTTPSettings
from mechsteer.core.plugins import Registry
from mechsteer.engines.base import GenerationEngine
from mechsteer.engines.bridge import BridgeEngine
from mechsteer.engines.openai import OpenAIEngine

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# What an engine runs on: the loaded bridge, or a server (only the model's tokenizer loads here).
EngineRunsOn = Literal["bridge", "server"]


@dataclass(frozen=True)
class EngineInputs:
    """What a run (or ``mechsteer traces``) gives an engine's factory, for one model.

    ``model`` is the loaded bridge for an engine that runs on it (else None); ``tokenizer`` is the
    model's own (the bridge's, or loaded from the model's folder without the weights);
    ``model_name`` is what trace records name the model (``cfg.model_name``; None: the factory's
    own default). The server fields (``url``, ``server_model``, ``http``, ``return_token_ids``)
    are the run's ``engine_*`` keys, for an engine that asks a server."""

    model: TransformerBridge | None = None
    tokenizer: Any = None
    model_name: str | None = None
    url: str | None = None
    server_model: str | None = None
    http: HTTPSettings | None = None
    return_token_ids: bool = False

    def require_model(self, engine: str) -> TransformerBridge:
        if self.model is None:
            raise ConfigError(f"the {engine} engine needs the loaded model")
        return self.model


EngineFactory = Callable[[EngineInputs], GenerationEngine]


@dataclass(frozen=True)
class EngineSpec:
    name: str
    runs_on: EngineRunsOn
    build: EngineFactory


ENGINES: Registry[EngineSpec] = Registry("engine")


def register_engine(spec: EngineSpec, *, replace: bool = False) -> None:
    """Make ``engine: spec.name`` in a run config (and ``mechsteer traces --engine``) build with ``spec``."""
    ENGINES.register(spec.name, spec, replace=replace)


def engine_names() -> list[str]:
    return ENGINES.names()


def engine_spec(name: str) -> EngineSpec:
    """The registered engine ``name`` (plug-ins loaded on a miss); ConfigError naming the registered ones."""
    return ENGINES.get(name)


def _build_bridge(inputs: EngineInputs) -> GenerationEngine:
    return BridgeEngine(inputs.require_model("bridge"))


def _build_openai(inputs: EngineInputs) -> GenerationEngine:
    if not inputs.url:
        raise ConfigError("the openai engine needs the server's URL (engine_url / --engine-url), "
                          "e.g. http://127.0.0.1:8000/v1 for `vllm serve`")
    tokenizer, model_name = inputs.tokenizer, inputs.model_name
    if tokenizer is None:
        if inputs.model is None:
            raise ConfigError("the openai engine needs the model's tokenizer (or the loaded model)")
        tokenizer = inputs.model.tokenizer
    if model_name is None and inputs.model is not None:
        model_name = str(inputs.model.cfg.model_name)
    if not inputs.server_model:
        raise ConfigError("the openai engine needs the server's model name (engine_model / --engine-model)")
    return OpenAIEngine(inputs.url, inputs.server_model, tokenizer, model_name=model_name, settings=inputs.http,
                        return_token_ids=inputs.return_token_ids)


register_engine(EngineSpec("bridge", "bridge", _build_bridge))
register_engine(EngineSpec("openai", "server", _build_openai))


__all__ = ["EngineFactory", "EngineInputs", "EngineRunsOn", "EngineSpec", "engine_names", "engine_spec",
           "register_engine"]
