"""The generation-engine interface: plain generation (no hooks) from prompt texts, by the bridge
or by an OpenAI-compatible server, with one request and one result type for both.

An engine takes :class:`GenerationRequest` s (a rendered prompt and its seed) and
:class:`GenerationSettings` (greedy or sampled, stop strings, max tokens) and yields
:class:`Completion` s as they finish, in groups: the bridge one group per batch, a server one per
request; the trace stage writes each group to disk as it comes, so a run killed mid-way keeps
every finished problem.

A completion always carries token ids: the ones the model generated where the engine knows them
(the bridge; a server that returns them), else the text re-tokenised with the model's own
tokenizer; ``token_ids_source`` says which.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from mechsteer.core.errors import MechsteerError
from mechsteer.core.vocab import adds_special_tokens
from mechsteer.interventions.generation import FinishReason

# The built-in engines' names (a plug-in's engine takes any name: mechsteer.engines.registry).
EngineKind = Literal["bridge", "openai"]
ENGINE_KINDS: tuple[EngineKind, ...] = get_args(EngineKind)
# "generated": the ids the model produced; "retokenised": the returned text encoded again.
TokenIdsSource = Literal["generated", "retokenised"]


class EngineError(MechsteerError):
    """A generation engine could not produce a completion (server down, refused, unreadable)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How every prompt of a call is continued."""

    max_new_tokens: int
    do_sample: bool = False  # greedy when False
    temperature: float = 1.0  # used only when sampling
    top_p: float | None = None
    stop_strings: tuple[str, ...] = ()  # the text is cut after the first one (kept, as the bridge does)
    batch_size: int = 8  # prompts per forward batch on the bridge; servers batch by themselves

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling; got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # the rendered template, exactly as the bridge would tokenize it
    seed: int | None = None  # sampling seed (the bridge seeds a batch with its first prompt's)


@dataclass
class Completion:
    text: str  # the continuation, cut after the first stop string
    token_ids: list[int]  # generated ids (with the EOS when the model stopped by itself)
    prompt_token_ids: list[int]  # the prompt as the model read it (one BOS)
    finish_reason: FinishReason
    token_ids_source: TokenIdsSource


# One group of finished completions: (index of the request, its completion).
CompletionGroup = list[tuple[int, Completion]]


@runtime_checkable
class GenerationEngine(Protocol):
    """Prompts in, completions out; see the module docstring."""

    @property
    def kind(self) -> str: ...  # its registered name (read-only here, so that an engine may narrow it)

    model_name: str  # the model spec (what trace records name), not the server's model name
    tokenizer: Any  # the model's own tokenizer: templates, prompt ids, re-tokenisation

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings
                 ) -> Iterator[CompletionGroup]:
        """Completions of ``requests``, yielded in groups as they finish (any order)."""
        ...

    def record_settings(self) -> dict[str, Any]:
        """What a trace record notes about the engine (never a key; no URL: it may change on resume)."""
        ...


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids as the bridge feeds them: the tokenizer's special tokens, unless the text
    already starts with the BOS (a rendered chat template), so one BOS either way."""
    return list(tokenizer(prompt, add_special_tokens=adds_special_tokens(tokenizer, prompt))["input_ids"])


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut after its first stop string (kept, as the bridge keeps it); True if one was found."""
    cuts = [text.find(stop) + len(stop) for stop in stop_strings if stop and stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def generate_all(engine: GenerationEngine, prompts: Sequence[str], settings: GenerationSettings, *,
                 seed: int | None = None) -> list[Completion]:
    """Completions of ``prompts`` in prompt order (prompt i sampled with ``seed + i``)."""
    requests = [GenerationRequest(prompt, None if seed is None else seed + index)
                for index, prompt in enumerate(prompts)]
    results: dict[int, Completion] = {}
    for group in engine.generate(requests, settings):
        results.update(group)
    return [results[index] for index in range(len(requests))]


__all__ = ["ENGINE_KINDS", "Completion", "CompletionGroup", "EngineError", "EngineKind", "GenerationEngine",
           "GenerationRequest", "GenerationSettings", "TokenIdsSource", "cut_at_stop", "generate_all",
           "prompt_token_ids"]
