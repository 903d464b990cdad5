"""The judge over HTTP: any OpenAI-compatible ``/v1/chat/completions`` server (OpenAI, vLLM,
ollama, llama.cpp's ``llama-server``), with retries, a concurrency limit and an on-disk cache."""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

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
ENV_OPENAI_URL = "OPENAI_BASE_URL"
ENV_OPENAI_API_KEY = "OPENAI_API_KEY"

# Retried like the OpenAI SDK does: request timeout, conflict (lock), rate limit; and all 5xx.
RETRYABLE_STATUS = frozenset({408, 409, 429})
# A server asking for a longer Retry-After than this is treated as down, not waited for.
MAX_RETRY_DELAY_S = 120.0
# How much of an error response body goes into an exception message.
ERROR_BODY_CHARS = 300


_VERSION_SEGMENT = re.compile(r"/v\d+[a-z0-9]*(/|$)")


def chat_completions_url(base_url: str) -> str:
    """The chat-completions endpoint for a server's base URL.

    - ends in ``/chat/completions``: used as is;
    - has an API version segment (``/v1``, ``/v1beta/openai``, ...): ``/chat/completions``
      is appended (OpenAI ``https://api.openai.com/v1``, vLLM/ollama/llama.cpp ``.../v1``);
    - otherwise (``http://localhost:11434``): ``/v1/chat/completions`` is appended.
    """
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"judge base_url must start with http:// or https://, got {base_url!r}")
    if url.endswith("/chat/completions"):
        return url
    path = httpx.URL(url).path
    if _VERSION_SEGMENT.search(path):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


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


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds, tolerating decimals, or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class HTTPJudge:
    """An OpenAI-compatible chat-completions judge over HTTP.

    Configuration comes from the arguments, else the environment:
    ``MECHSTEER_JUDGE_URL`` (else ``OPENAI_BASE_URL``), ``MECHSTEER_JUDGE_MODEL``,
    ``MECHSTEER_JUDGE_API_KEY`` (else ``OPENAI_API_KEY``; optional, local servers need none).
    ``base_url`` may or may not end in ``/v1``; see :func:`chat_completions_url`.

    The request body is ``{model, messages, max_tokens, temperature}``, which OpenAI chat
    models, vLLM, ollama and llama.cpp all accept (OpenAI's o-series reasoning models reject
    ``max_tokens``/``temperature`` and are not supported).

    Failures: 429 (and 408, 409), 5xx, timeouts and connection errors are retried
    ``max_retries`` times (so at most ``max_retries + 1`` attempts) with exponential backoff
    ``backoff * 2**attempt``, or the server's ``Retry-After`` if that is longer; then
    :class:`JudgeHTTPError`. Other 4xx fail at once. A 200 that is not a chat completion
    raises :class:`JudgeResponseError` at once (no retry).

    ``max_concurrency`` bounds simultaneous requests across threads (see :func:`complete_many`).
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
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_concurrency: int = 4,
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
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.url = chat_completions_url(base_url)
        self.model = model
        self._api_key = api_key or os.environ.get(ENV_API_KEY) or os.environ.get(ENV_OPENAI_API_KEY)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_concurrency = int(max_concurrency)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout))
        self.n_requests = 0  # HTTP requests sent, retries included
        self.n_cache_hits = 0
        self._counter_lock = threading.Lock()

    def __repr__(self) -> str:
        key_state = "set" if self._api_key else "none"
        return (
            f"HTTPJudge(url={self.url!r}, model={self.model!r}, api_key=<{key_state}>, "
            f"max_retries={self.max_retries}, max_concurrency={self.max_concurrency}, "
            f"cache_dir={str(self.cache_dir) if self.cache_dir else None!r})"
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPJudge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> str:
        check_messages(messages)
        key = cache_key(self.model, messages, max_tokens, temperature)
        cached = self._cache_read(key)
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
        with self._slots:
            body = self._post_with_retries(payload)
        text = self._read_completion(body)
        self._cache_write(key, messages, max_tokens, temperature, text)
        return text

    # -- request loop --

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "<redacted>")
        return text

    def _post_with_retries(self, payload: dict[str, Any]) -> httpx.Response:
        attempts = self.max_retries + 1
        last_problem = ""
        for attempt in range(attempts):
            retry_after: float | None = None
            with self._counter_lock:
                self.n_requests += 1
            logger.debug("judge request to %s (model %s), attempt %d/%d", self.url, self.model, attempt + 1, attempts)
            try:
                response = self._client.post(self.url, json=payload, headers=self._headers())
            except httpx.TimeoutException as error:
                last_problem = f"timed out after {self.timeout:g} s ({type(error).__name__})"
            except httpx.TransportError as error:
                last_problem = f"connection failed ({type(error).__name__}: {self._redact(str(error))})"
            else:
                status = response.status_code
                if status == 200:
                    return response
                snippet = self._redact(response.text[:ERROR_BODY_CHARS])
                if status in RETRYABLE_STATUS or status >= 500:
                    last_problem = f"HTTP {status}: {snippet}"
                    retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
                else:
                    raise JudgeHTTPError(
                        f"judge server {self.url} refused the request with HTTP {status} "
                        f"(not retried): {snippet}"
                    )
            if attempt == attempts - 1:
                break
            delay = self.backoff * (2**attempt)
            if retry_after is not None:
                if retry_after > MAX_RETRY_DELAY_S:
                    raise JudgeHTTPError(
                        f"judge server {self.url} asked to retry after {retry_after:.0f} s "
                        f"(more than {MAX_RETRY_DELAY_S:.0f} s); last problem: {last_problem}"
                    )
                delay = max(delay, retry_after)
            # The body may be long; the reason before the first ':' is enough for the log.
            logger.info("judge request failed (%s); retrying in %.2f s", last_problem.split(":")[0], delay)
            time.sleep(delay)
        raise JudgeHTTPError(
            f"judge server {self.url} failed {attempts} attempts "
            f"(max_retries={self.max_retries}); last problem: {last_problem}"
        )

    def _read_completion(self, response: httpx.Response) -> str:
        where = f"judge server {self.url}"
        try:
            body = response.json()
        except ValueError:
            snippet = self._redact(response.text[:ERROR_BODY_CHARS])
            raise JudgeResponseError(f"{where} returned a response that is not JSON: {snippet!r}") from None
        if not isinstance(body, dict):
            raise JudgeResponseError(f"{where} returned JSON that is not an object: {type(body).__name__}")
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
            texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
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

    def _cache_read(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            response = record["response"]
        except (ValueError, KeyError, TypeError) as error:
            raise JudgeError(f"judge cache file {path} is corrupt ({error}); delete it") from None
        if not isinstance(response, str):
            raise JudgeError(f"judge cache file {path} has a non-text response; delete it")
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
