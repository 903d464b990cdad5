"""A deterministic ``/v1/completions`` server that answers with the organism models themselves: each
(model, prompt, settings) is generated greedily on the bridge once, in the server, and replayed ever
after, so two runs asking it the same prompts get the same completions whatever the order they ask in."""

from __future__ import annotations

import threading
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from mechsteer.interventions.generation import generate
from tests.engines.stub import Answer, StubServer, completion

Key = tuple[str, str, int, tuple[str, ...]]


class ModelServer(StubServer):
    def __init__(self, models: dict[str, TransformerBridge]) -> None:
        super().__init__()
        self.models = models
        self.answers: dict[Key, tuple[str, str]] = {}
        self.generation_lock = threading.Lock()  # one forward pass at a time: the models are shared
        self.responder = self.answer

    def prefill(self, model: str, prompts: list[str], max_tokens: int, stop: tuple[str, ...] = ()) -> None:
        """Generate the answers to ``prompts`` in one batch (what a run will ask, faster than one by one)."""
        missing = [prompt for prompt in dict.fromkeys(prompts) if (model, prompt, max_tokens, stop) not in self.answers]
        if not missing:
            return
        output = generate(self.models[model], missing, max_new_tokens=max_tokens, stop_strings=stop)
        for prompt, text, finish in zip(missing, output.texts, output.finish_reasons, strict=True):
            self.answers[model, prompt, max_tokens, stop] = (text, "length" if finish == "length" else "stop")

    def answer(self, payload: dict[str, Any]) -> Answer:
        model, prompt = payload.get("model"), payload.get("prompt")
        if model not in self.models or not isinstance(prompt, str) or payload.get("temperature") != 0.0:
            return Answer(400, body={"error": {"message": f"greedy completions of {sorted(self.models)} only"}})
        max_tokens, stop = int(payload["max_tokens"]), tuple(payload.get("stop") or ())
        with self.generation_lock:
            self.prefill(model, [prompt], max_tokens, stop)
        text, finish = self.answers[model, prompt, max_tokens, stop]
        return Answer(body=completion(text, finish))
