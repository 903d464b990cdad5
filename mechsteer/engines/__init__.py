"""Generation engines: plain generation (traces, the base/thinking evaluations) on the hooked
bridge (``bridge``, the default), through any OpenAI-compatible server (``openai``: vLLM,
SGLang, llama.cpp, ``transformers serve``), or by a plug-in's engine (the registry:
:mod:`mechsteer.engines.registry`). The stages that read or write activations always run on the
bridge. See docs/engines.md."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from mechsteer.engines.registry import (
    EngineFactory,
    EngineInputs,
    EngineRunsOn,
    EngineSpec,
    engine_names,
    engine_spec,
    register_engine,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a model spec as the bridge holds it (TransformerLens' normalisation, adding
    a BOS exactly when the model's own tokenizer does), without loading the weights: what the
    ``openai`` engine needs."""
    resolved = resolve_spec(spec)
    source = str(resolved.folder) if resolved.folder is not None else spec
    # heavy (seconds): imported when a model or tokenizer loads, so that the command line starts fast
    from transformer_lens.model_bridge.sources.transformers import setup_tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelNotAvailableError(f"could not load the tokenizer of {spec!r} from {source}: {error}") from error
    own_prepends_bos = prepends_bos(tokenizer)  # before TransformerLens' set-up changes it
    tokenizer = setup_tokenizer(tokenizer)
    keep_own_bos(tokenizer, own_prepends_bos)
    return tokenizer


def make_engine(kind: str, model: TransformerBridge | None = None, *, tokenizer: Any = None,
                model_name: str | None = None, url: str | None = None, server_model: str | None = None,
                settings: HTTPSettings | None = None, return_token_ids: bool = False) -> GenerationEngine:
    """The registered engine ``kind`` (:mod:`mechsteer.engines.registry`): ``bridge`` runs on
    ``model``; ``openai`` asks the server at ``url`` for ``server_model`` and reads prompts with
    ``tokenizer`` (default: ``model``'s)."""
    return engine_spec(kind).build(EngineInputs(model=model, tokenizer=tokenizer, model_name=model_name, url=url,
                                                server_model=server_model, http=settings,
                                                return_token_ids=return_token_ids))


__all__ = ["ENGINE_HTTP_SETTINGS", "ENGINE_KINDS", "BridgeEngine", "Completion", "EngineError", "EngineFactory",
           "EngineInputs", "EngineKind", "EngineRunsOn", "EngineSpec", "GenerationEngine", "GenerationRequest",
           "GenerationSettings", "OpenAIEngine", "engine_names", "engine_spec", "generate_all", "load_tokenizer",
           "make_engine", "register_engine"]
