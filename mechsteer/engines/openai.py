"""The ``openai`` engine: plain generation through any OpenAI-compatible server's
``/v1/completions`` (vLLM, SGLang, llama.cpp's ``llama-server``, ``transformers serve``).

The server receives the prompt text the bridge path would tokenize (the rendered template) with
exactly one BOS: the BOS text is sent, or left to the server, so that the server's own
tokenizer (the model folder's, without TransformerLens' ``add_bos_token``) reads the prompt into
the ids the bridge feeds. Each answer's ``usage.prompt_tokens`` (and the prompt ids, where the
server returns them) is checked against those ids, so a server serving another tokenizer, or
adding a second BOS, fails loudly instead of silently answering another prompt.

Requests run in parallel (at most ``max_concurrency`` in flight, retried with backoff, through
the client shared with the judge: :mod:`mechsteer.core.http`), and each completion is yielded as
it arrives. The workers are daemon threads, and an interruption (Ctrl-C) cancels the client: the
process exits at once instead of waiting for hung requests and their retries.

An answer is verified before it becomes a completion: exactly one choice, the model the
response names is the one asked for (``transformers serve`` names it ``<model>@<revision>``),
and the text does not start with the prompt (a server echoing it); anything else is an
:class:`EngineError` naming the URL, and nothing is recorded. Token ids: with ``return_token_ids`` the server's own (vLLM's ``return_token_ids``
extension); otherwise the text re-tokenised with the model's tokenizer, plus the EOS when the
model stopped by itself, as the bridge records it.

Stop strings: a server that keeps the matched stop string in the text (``transformers serve``)
is cut after it like the bridge; one that drops it and says which (vLLM's ``stop_reason``)
gets it back. A server that drops it without saying which (OpenAI's API) cannot be told apart
from an EOS: such a completion is recorded as ``eos`` without the stop string.

The API key comes from the argument, else ``MECHSTEER_ENGINE_API_KEY``, else
``OPENAI_API_KEY``; it is only ever sent in the Authorization header.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mechsteer.core.http import (
    ENV_OPENAI_API_KEY,
    HTTPRequestError,
    HTTPResponseError,
    HTTPSettings,
    JSONClient,
    endpoint_url,
)
from mechsteer.core.vocab import prepends_bos
from mechsteer.engines.base import (
    Completion,
    CompletionGroup,
    EngineError,
    EngineKind,
    GenerationRequest,
    GenerationSettings,
    cut_at_stop,
    prompt_token_ids,
)
from mechsteer.interventions.generation import FinishReason

logger = logging.getLogger(__name__)

ENV_ENGINE_API_KEY = "MECHSTEER_ENGINE_API_KEY"
# Generation waits far longer than a judge's answer: a long trace on a busy server takes minutes.
ENGINE_HTTP_SETTINGS = HTTPSettings(timeout=600.0, max_retries=3, backoff=1.0, max_concurrency=8)


def detect_server_adds_bos(tokenizer: Any) -> bool:
    """Whether a server loading this tokenizer's folder adds a BOS to a completion prompt.

    TransformerLens reloads tokenizers with ``add_bos_token=True``; servers load the folder as it
    is. A tokenizer without a local folder is taken to behave like the one given."""
    if getattr(tokenizer, "bos_token_id", None) is None:
        return False
    # heavy (seconds): imported when a tokenizer loads, so that the command line starts fast
    from transformers import AutoTokenizer

    folder = Path(str(getattr(tokenizer, "name_or_path", "")))
    return prepends_bos(AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file()
                        else tokenizer)


class OpenAIEngine:
    """Generation through ``<url>/v1/completions``; see the module docstring.

    ``tokenizer`` is the model's own (the bridge's ``model.tokenizer``, or one loaded from the
    model's folder); ``model_name`` names the model in trace records (the spec, as with the
    bridge); ``server_model`` is the name the server knows it by (vLLM: the path or hub name it
    was started with). ``server_adds_bos`` None: read from the tokenizer's folder.
    """

    kind: EngineKind = "openai"

    def __init__(self, url: str, server_model: str, tokenizer: Any, *, model_name: str | None = None,
                 api_key: str | None = None, settings: HTTPSettings | None = None,
                 return_token_ids: bool = False, server_adds_bos: bool | None = None) -> None:
        if not server_model:
            raise EngineError("the openai engine needs the server's model name (engine_model / --engine-model)")
        self.server_model = server_model
        self.tokenizer = tokenizer
        self.model_name = model_name or server_model
        self.return_token_ids = return_token_ids
        self.server_adds_bos = detect_server_adds_bos(tokenizer) if server_adds_bos is None else server_adds_bos
        api_key = api_key or os.environ.get(ENV_ENGINE_API_KEY) or os.environ.get(ENV_OPENAI_API_KEY)
        self.http = JSONClient(endpoint_url(url, "completions"), api_key=api_key,
                               settings=settings or ENGINE_HTTP_SETTINGS, role="generation server")

    @property
    def url(self) -> str:
        return self.http.url

    def __repr__(self) -> str:
        return (f"OpenAIEngine(url={self.url!r}, server_model={self.server_model!r}, "
                f"model_name={self.model_name!r}, settings={self.http.settings})")

    def close(self) -> None:
        self.http.close()

    def record_settings(self) -> dict[str, Any]:
        return {"engine": self.kind, "engine_model": self.server_model,
                "token_ids_source": "generated" if self.return_token_ids else "retokenised"}

    # -- one request --

    def server_prompt(self, prompt: str, ids: Sequence[int]) -> str:
        """The text that the server's tokenizer reads into ``ids`` (the bridge's): the BOS is
        left to a server that adds it, and written out for one that does not."""
        bos_id, bos_text = getattr(self.tokenizer, "bos_token_id", None), getattr(self.tokenizer, "bos_token", None)
        if bos_id is None or not bos_text or not ids or ids[0] != bos_id:
            return prompt
        core = prompt.removeprefix(bos_text)
        return core if self.server_adds_bos else bos_text + core

    def payload(self, request: GenerationRequest, ids: Sequence[int], settings: GenerationSettings) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.server_model, "prompt": self.server_prompt(request.prompt, ids),
                                "max_tokens": settings.max_new_tokens,
                                "temperature": settings.temperature if settings.do_sample else 0.0}
        if settings.do_sample:
            if settings.top_p is not None:
                body["top_p"] = settings.top_p
            if request.seed is not None:
                body["seed"] = request.seed
        if settings.stop_strings:
            body["stop"] = list(settings.stop_strings)
        if self.return_token_ids:
            body["return_token_ids"] = True  # vLLM's extension; strict servers refuse it (HTTP 4xx)
        return body

    def complete(self, request: GenerationRequest, settings: GenerationSettings) -> Completion:
        ids = prompt_token_ids(self.tokenizer, request.prompt)
        try:
            body = self.http.post(self.payload(request, ids, settings))
        except (HTTPRequestError, HTTPResponseError) as error:
            raise EngineError(str(error)) from None
        return self.read_completion(body, ids, settings, prompt=request.prompt)

    def read_completion(self, body: dict[str, Any], ids: list[int], settings: GenerationSettings, *,
                        prompt: str = "") -> Completion:
        where = f"generation server {self.url}"
        named = body.get("model")
        if not (named == self.server_model or (isinstance(named, str) and "@" not in self.server_model
                                               and named.partition("@")[0] == self.server_model)):
            as_what = "without naming its model" if named is None else f"as model {self.http.redact(str(named))!r}"
            raise EngineError(f"{where} answered {as_what} where "
                              f"{self.server_model!r} was asked for; nothing was recorded (is engine_model the "
                              "server's name for the model?)")
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EngineError(f"{where} returned no 'choices' (a non-empty list expected); keys: {sorted(body)}")
        if len(choices) != 1:
            # one completion was asked for: which of several is the answer cannot be told
            raise EngineError(f"{where} returned {len(choices)} choices for one prompt; nothing was recorded")
        choice = choices[0]
        text = choice.get("text")
        if not isinstance(text, str):
            raise EngineError(f"{where} returned choices[0] without a text 'text' (not a /v1/completions answer?)")
        bos_text = getattr(self.tokenizer, "bos_token", None) or ""
        starts = (text, text.removeprefix(bos_text)) if bos_text else (text,)  # an echo may show the BOS
        sent = (prompt, self.server_prompt(prompt, ids))
        if any(part.strip() and start.startswith(part) for part in sent for start in starts):
            raise EngineError(f"{where} returned a completion that starts with the prompt (an echo, as with "
                              "echo: true); nothing was recorded")
        text = self.http.redact(text)  # a server that echoes the API key never gets it into a trace
        self._check_prompt(body, choice, ids, where)
        finish = choice.get("finish_reason")
        stop_strings = settings.stop_strings
        text, found_stop = cut_at_stop(text, stop_strings)
        reason: FinishReason
        if found_stop:
            reason = "stop"
        elif finish == "length":
            reason = "length"
        elif finish == "stop":
            matched = choice.get("stop_reason", choice.get("matched_stop"))  # vLLM, SGLang
            if isinstance(matched, str) and matched in stop_strings:
                text, reason = text + matched, "stop"
            else:
                reason = "eos"
        else:
            raise EngineError(f"{where} finished a completion with finish_reason={finish!r} "
                              "(expected 'stop' or 'length')")
        if self.return_token_ids:
            generated = choice.get("token_ids")
            if not isinstance(generated, list):
                raise EngineError(f"{where} returned no choices[0].token_ids although return_token_ids is set "
                                  "(a vLLM extension); set engine_return_token_ids false for this server")
            token_ids = [int(token) for token in generated]
        else:
            token_ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if reason == "eos" and eos is not None:
                token_ids.append(int(eos))
        return Completion(text=text, token_ids=token_ids, prompt_token_ids=list(ids), finish_reason=reason,
                          token_ids_source="generated" if self.return_token_ids else "retokenised")

    def _check_prompt(self, body: dict[str, Any], choice: dict[str, Any], ids: list[int], where: str) -> None:
        served = choice.get("prompt_token_ids", body.get("prompt_token_ids"))
        if isinstance(served, list) and [int(token) for token in served] != ids:
            raise EngineError(f"{where} read the prompt as other token ids than the model's tokenizer "
                              f"(server {served[:8]}..., tokenizer {ids[:8]}...): it serves another tokenizer "
                              "or adds special tokens differently")
        usage = body.get("usage")
        count = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if isinstance(count, int) and count != len(ids):
            raise EngineError(
                f"{where} read the prompt as {count} tokens where the model's tokenizer gives {len(ids)} "
                f"(first ids {ids[:4]}): the server serves another tokenizer, or adds a BOS differently "
                f"(server_adds_bos={self.server_adds_bos}); its completions would continue another prompt")

    # -- many requests --

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings
                 ) -> Iterator[CompletionGroup]:
        """Each completion as soon as it arrives. On a failure, no request starts any more, the
        ones already running are still collected and yielded, then the first error is raised (no
        finished work is lost). Interrupted (Ctrl-C, or the caller stops reading): the client is
        cancelled, so the requests in flight are dropped and none is retried."""
        if not requests:
            return
        lock = threading.Lock()
        stop = threading.Event()
        started = [0]  # requests taken by a worker
        done: queue.SimpleQueue[tuple[int, Completion | Exception]] = queue.SimpleQueue()

        def take() -> int | None:
            with lock:
                if stop.is_set() or started[0] >= len(requests):
                    return None
                started[0] += 1
                return started[0] - 1

        def work() -> None:
            while (index := take()) is not None:
                try:
                    done.put((index, self.complete(requests[index], settings)))
                except Exception as error:  # handed to the caller's thread
                    done.put((index, error))

        # daemon threads: an interrupted run exits without waiting for a hung server
        for number in range(min(self.http.settings.max_concurrency, len(requests))):
            threading.Thread(target=work, name=f"mechsteer-engine-{number}", daemon=True).start()
        failure: Exception | None = None
        received = 0
        try:
            while True:
                with lock:
                    expected = started[0] if stop.is_set() else len(requests)
                if received >= expected:
                    break
                index, result = done.get()
                received += 1
                if isinstance(result, Exception):
                    if failure is None:
                        failure = result
                        with lock:
                            stop.set()  # what has not started, does not; what runs is still collected
                    continue
                yield [(index, result)]
        except BaseException:
            stop.set()
            self.http.cancel()
            raise
        if failure is not None:
            raise failure


def with_settings(settings: HTTPSettings | None = None, **overrides: Any) -> HTTPSettings:
    """The engine's HTTP settings (:data:`ENGINE_HTTP_SETTINGS` unless given) with ``overrides``
    that are not None."""
    return (settings or ENGINE_HTTP_SETTINGS).with_overrides(**overrides)


__all__ = ["ENGINE_HTTP_SETTINGS", "ENV_ENGINE_API_KEY", "OpenAIEngine", "detect_server_adds_bos", "with_settings"]
