"""The judge over HTTP: any OpenAI-compatible ``/v1/chat/completions`` server (OpenAI, vLLM,
ollama, llama.cpp's ``llama-server``, ``transformers serve``), through the shared client of
:mod:`mechsteer.core.http` (retries, backoff, bounded timeouts, a concurrency cap that counts
abandoned requests), with an on-disk cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from mechsteer.core.http import (
    ENV_OPENAI_API_KEY,
    ENV_OPENAI_URL,
    HTTPRequestError,
    HTTPResponseError,
    HTTPSettings,
    JSONClient,
    endpoint_url,
)
from mechsteer.taxonomy.judge import prompts as judge_prompts
from mechsteer.taxonomy.judge.base import (
    JudgeError,
    JudgeHTTPError,
    JudgeResponseError,
    Messages,
    check_messages,
)

logger = logging.getLogger(__name__)

ENV_URL = "MECHSTEER_JUDGE_URL"
ENV_MODEL = "MECHSTEER_JUDGE_MODEL"
ENV_API_KEY = "MECHSTEER_JUDGE_API_KEY"


def chat_completions_url(base_url: str) -> str:
    """The chat-completions endpoint for a server's base URL (see :func:`~mechsteer.core.http.endpoint_url`)."""
    return endpoint_url(base_url, "chat/completions")


def cache_key(model: str, messages: Messages, max_tokens: int, temperature: float) -> str:
    """sha256 over (prompt version, model, messages, max_tokens, temperature); never the key."""
    payload = json.dumps(
        {
            "prompt_version": judge_prompts.PROMPT_VERSION,
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": float(temperature),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class HTTPJudge:
    """An OpenAI-compatible chat-completions judge over HTTP.

    Configuration comes from the arguments, else the environment:
    ``MECHSTEER_JUDGE_URL`` (else ``OPENAI_BASE_URL``), ``MECHSTEER_JUDGE_MODEL``,
    ``MECHSTEER_JUDGE_API_KEY`` (else ``OPENAI_API_KEY``; optional, local servers need none).
    ``base_url`` may or may not end in ``/v1``; see :func:`chat_completions_url`.

    The request body is ``{model, messages, max_tokens, temperature}``, which OpenAI chat
    models, vLLM, ollama, llama.cpp and ``transformers serve`` all accept (OpenAI's o-series
    reasoning models reject ``max_tokens``/``temperature`` and are not supported).

    ``settings`` (:class:`~mechsteer.core.http.HTTPSettings`) says how patiently the server is
    asked; ``timeout``, ``max_retries``, ``backoff`` and ``max_concurrency`` override its fields.
    After the retries a :class:`JudgeHTTPError` names the URL and the last problem; other 4xx fail
    at once. A 200 that is not a chat completion raises :class:`JudgeResponseError` at once.
    ``max_tokens`` caps every answer's budget (each prompt brings its own, e.g. 256 for titles):
    a slow server answers sooner.

    With ``cache_dir``, each answer is stored as ``<cache_dir>/<hash[:2]>/<hash>.json`` keyed by
    :func:`cache_key`; a cached prompt makes no request. Without ``cache_dir`` nothing is cached.

    The API key is sent only in the Authorization header: it is never logged, cached, put in
    an exception message or shown by ``repr``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        settings: HTTPSettings | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        backoff: float | None = None,
        max_concurrency: int | None = None,
        max_tokens: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        base_url = base_url or os.environ.get(ENV_URL) or os.environ.get(ENV_OPENAI_URL)
        if not base_url:
            raise ValueError(
                f"no judge endpoint: pass base_url or set {ENV_URL} (or {ENV_OPENAI_URL}), "
                "e.g. http://localhost:8000/v1 for vLLM or http://localhost:11434 for ollama"
            )
        model = model or os.environ.get(ENV_MODEL)
        if not model:
            raise ValueError(f"no judge model: pass model or set {ENV_MODEL}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        settings = (settings or HTTPSettings()).with_overrides(
            timeout=timeout, max_retries=max_retries, backoff=backoff, max_concurrency=max_concurrency)
        self.model = model
        self.max_tokens = max_tokens
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        api_key = api_key or os.environ.get(ENV_API_KEY) or os.environ.get(ENV_OPENAI_API_KEY)
        self._http = JSONClient(chat_completions_url(base_url), api_key=api_key, settings=settings,
                                role="judge server")
        self.n_cache_hits = 0
        self._counter_lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._http.url

    @property
    def settings(self) -> HTTPSettings:
        return self._http.settings

    @property
    def max_concurrency(self) -> int:
        return self._http.settings.max_concurrency

    @property
    def n_requests(self) -> int:
        """HTTP requests sent, retries included."""
        return self._http.n_requests

    def __repr__(self) -> str:
        key_state = "set" if self._http._api_key else "none"
        return (
            f"HTTPJudge(url={self.url!r}, model={self.model!r}, api_key=<{key_state}>, "
            f"timeout={self.settings.timeout:g}, max_retries={self.settings.max_retries}, "
            f"max_concurrency={self.max_concurrency}, max_tokens={self.max_tokens}, "
            f"cache_dir={str(self.cache_dir) if self.cache_dir else None!r})"
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HTTPJudge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> str:
        check_messages(messages)
        if self.max_tokens is not None:
            max_tokens = min(max_tokens, self.max_tokens)
        key = cache_key(self.model, messages, max_tokens, temperature)
        cached = self._cache_read(key, messages)
        if cached is not None:
            with self._counter_lock:
                self.n_cache_hits += 1
            return cached
        payload = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        logger.debug("judge request to %s (model %s, max_tokens %d)", self.url, self.model, max_tokens)
        try:
            body = self._http.post(payload)
        except HTTPRequestError as error:
            raise JudgeHTTPError(str(error)) from None
        except HTTPResponseError as error:
            raise JudgeResponseError(str(error)) from None
        text = self._read_completion(body)
        # Only answers of the shape the question asks for are kept: a misbehaving server's junk (or
        # an error message) is asked again next time, not replayed after the server is fixed.
        if judge_prompts.answer_has_shape(messages, text) is not False:
            self._cache_write(key, messages, max_tokens, temperature, text)
        return text

    def _read_completion(self, body: dict[str, Any]) -> str:
        where = f"judge server {self.url}"
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise JudgeResponseError(
                f"{where} returned no 'choices' (a non-empty list expected); keys: {sorted(body)}"
            )
        choice = choices[0]
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise JudgeResponseError(f"{where} returned choices[0] without a 'message' object")
        content = message.get("content")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            texts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
            content = "".join(texts) if texts else None
        if not isinstance(content, str):
            finish = choice.get("finish_reason")
            raise JudgeResponseError(
                f"{where} returned choices[0].message without a text 'content' "
                f"(got {type(content).__name__}, finish_reason={finish!r})"
            )
        return content

    # -- cache --

    def _cache_path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_read(self, key: str, messages: Messages) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        clear = "delete it, or rerun with --clear-judge-cache"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            response = record["response"]
        except (ValueError, KeyError, TypeError) as error:
            raise JudgeError(f"judge cache file {path} is corrupt ({error}); {clear}") from None
        if not isinstance(response, str):
            raise JudgeError(f"judge cache file {path} has a non-text response; {clear}")
        if judge_prompts.answer_has_shape(messages, response) is False:
            # cached before only answers of the right shape were kept: ask again (and overwrite it)
            logger.info("judge cache %s holds an answer of the wrong shape; asking the judge again", path)
            return None
        logger.debug("judge cache hit %s", key[:12])
        return response

    def _cache_write(
        self, key: str, messages: Messages, max_tokens: int, temperature: float, response: str
    ) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "prompt_version": judge_prompts.PROMPT_VERSION,
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "messages": messages,
            "response": response,
        }
        # Write-then-rename: concurrent writers of the same key never leave a torn file.
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(record, stream, ensure_ascii=False, indent=1)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


__all__ = ["ENV_API_KEY", "ENV_MODEL", "ENV_OPENAI_API_KEY", "ENV_OPENAI_URL", "ENV_URL", "HTTPJudge", "cache_key",
           "chat_completions_url"]
