"""The judge as a local chat model: a TransformerLens ``TransformerBridge``, greedy, for offline use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mechsteer.interventions.generation import generate
from mechsteer.taxonomy.judge.base import Messages, check_messages


class LocalJudge:
    """A TransformerLens ``TransformerBridge`` chat model (e.g. SmolLM2-135M-Instruct), greedy.

    Messages are rendered with the tokenizer's chat template (generation prompt added) and
    continued greedily with :func:`mechsteer.interventions.generation.generate`. Sampling is not offered:
    ``temperature`` must be 0. Small models follow the answer formats loosely; the metric
    parsers count what they cannot read.
    """

    max_concurrency = 1  # one model, one forward pass at a time

    def __init__(self, model: Any, *, batch_size: int = 8) -> None:
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("LocalJudge needs a TransformerBridge model with a .tokenizer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size

    def __repr__(self) -> str:
        name = getattr(getattr(self.model, "cfg", None), "model_name", type(self.model).__name__)
        return f"LocalJudge(model={name!r})"

    def render(self, messages: Messages) -> list[int]:
        """Token ids of ``messages`` in the chat template, ending with the assistant's turn."""
        check_messages(messages)
        tokenizer = self.model.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("LocalJudge's tokenizer has no chat template; use an instruct/chat model")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already holds any BOS it wants; the tokenizer must not add a second one.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> str:
        return self.complete_many([messages], max_tokens=max_tokens, temperature=temperature)[0]

    def complete_many(
        self, messages_list: Sequence[Messages], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> list[str]:
        if temperature != 0.0:
            raise ValueError(f"LocalJudge decodes greedily; temperature must be 0, got {temperature}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        token_ids = [self.render(m) for m in messages_list]
        if not token_ids:
            return []
        result = generate(self.model, token_ids, max_new_tokens=max_tokens, batch_size=self.batch_size)
        return [text.strip() for text in result.texts]


__all__ = ["LocalJudge"]
