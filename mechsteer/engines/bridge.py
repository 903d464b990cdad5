"""The default engine: :func:`mechsteer.interventions.generation.generate` on the hooked model
itself (the TransformerLens bridge), in batches of ``settings.batch_size`` prompts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mechsteer.engines.base import (
    Completion,
    CompletionGroup,
    EngineKind,
    GenerationRequest,
    GenerationSettings,
)
from mechsteer.interventions.generation import generate

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


class BridgeEngine:
    """Generation on a loaded bridge; a batch is sampled from one generator seeded with its first
    request's seed (so a resumed run, whose batches start where the finished ones ended, samples
    what a fresh run would)."""

    kind: EngineKind = "bridge"

    def __init__(self, model: TransformerBridge) -> None:
        self.model = model
        self.model_name = str(model.cfg.model_name)
        self.tokenizer = model.tokenizer

    def __repr__(self) -> str:
        return f"BridgeEngine(model={self.model_name!r})"

    def record_settings(self) -> dict[str, Any]:
        return {"engine": self.kind, "token_ids_source": "generated"}

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings
                 ) -> Iterator[CompletionGroup]:
        for start in range(0, len(requests), settings.batch_size):
            batch = requests[start : start + settings.batch_size]
            output = generate(
                self.model, [request.prompt for request in batch], max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample, temperature=settings.temperature, top_p=settings.top_p,
                seed=batch[0].seed, stop_strings=settings.stop_strings,
            )
            yield [
                (start + row, Completion(text=output.texts[row], token_ids=output.token_ids[row],
                                         prompt_token_ids=output.prompt_token_ids[row],
                                         finish_reason=output.finish_reasons[row], token_ids_source="generated"))
                for row in range(len(batch))
            ]


__all__ = ["BridgeEngine"]
