"""Generation engines: plain generation (traces, the base/thinking evaluations) on the hooked
bridge (``bridge``, the default) or through any OpenAI-compatible server (``openai``: vLLM,
SGLang, llama.cpp, ``transformers serve``). The stages that read or write activations always
run on the bridge. See docs/engines.md."""

from __future__ import annotations

from typing import Any

from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources.transformers import setup_tokenizer
from transformers import AutoTokenizer

from mechsteer.core.errors import ConfigError
from mechsteer.core.http import HTTPSettings
from mechsteer.core.models import ModelNotAvailableError, resolve_spec
from mechsteer.core.vocab import keep_own_bos, prepends_bos
from mechsteer.engines.base import (
    ENGINE_KINDS,
    Completion,
    EngineError,
    EngineKind,
    GenerationEngine,
    GenerationRequest,
    GenerationSettings,
    generate_all,
)
from mechsteer.engines.bridge import BridgeEngine
from mechsteer.engines.openai import ENGINE_HTTP_SETTINGS, OpenAIEngine


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a model spec as the bridge holds it (TransformerLens' normalisation, adding
    a BOS exactly when the model's own tokenizer does), without loading the weights: what the
    ``openai`` engine needs."""
    resolved = resolve_spec(spec)
    source = str(resolved.folder) if resolved.folder is not None else spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelNotAvailableError(f"could not load the tokenizer of {spec!r} from {source}: {error}") from error
    own_prepends_bos = prepends_bos(tokenizer)  # before TransformerLens' set-up changes it
    tokenizer = setup_tokenizer(tokenizer)
    keep_own_bos(tokenizer, own_prepends_bos)
    return tokenizer


def make_engine(kind: EngineKind, model: TransformerBridge | None = None, *, tokenizer: Any = None,
                model_name: str | None = None, url: str | None = None, server_model: str | None = None,
                settings: HTTPSettings | None = None, return_token_ids: bool = False) -> GenerationEngine:
    """The engine ``kind`` names: ``bridge`` runs on ``model``; ``openai`` asks the server at
    ``url`` for ``server_model`` and reads prompts with ``tokenizer`` (default: ``model``'s)."""
    if kind == "bridge":
        if model is None:
            raise ConfigError("the bridge engine needs the loaded model")
        return BridgeEngine(model)
    if kind == "openai":
        if not url:
            raise ConfigError("the openai engine needs the server's URL (engine_url / --engine-url), "
                              "e.g. http://127.0.0.1:8000/v1 for `vllm serve`")
        if tokenizer is None:
            if model is None:
                raise ConfigError("the openai engine needs the model's tokenizer (or the loaded model)")
            tokenizer = model.tokenizer
        if model_name is None and model is not None:
            model_name = str(model.cfg.model_name)
        if not server_model:
            raise ConfigError("the openai engine needs the server's model name (engine_model / --engine-model)")
        return OpenAIEngine(url, server_model, tokenizer, model_name=model_name, settings=settings,
                            return_token_ids=return_token_ids)
    raise ConfigError(f"unknown engine {kind!r}; expected one of {list(ENGINE_KINDS)}")


__all__ = ["ENGINE_HTTP_SETTINGS", "ENGINE_KINDS", "BridgeEngine", "Completion", "EngineError", "EngineKind",
           "GenerationEngine", "GenerationRequest", "GenerationSettings", "OpenAIEngine", "generate_all",
           "load_tokenizer", "make_engine"]
