"""One HTTP client for OpenAI-compatible servers, shared by the judge (``/v1/chat/completions``)
and the generation engine (``/v1/completions``).

What it guarantees, whatever the endpoint:

- **a bounded wait**: every attempt has a deadline for the whole answer, connection included
  (``timeout`` seconds, however slowly the server sends it; a retry after a timeout
  waits ``timeout_growth`` times longer, up to ``max_timeout``: a slow server is given more time,
  not more requests);
- **retries with backoff** on 429 (and 408, 409), 5xx, timeouts and connection errors:
  ``backoff * 2**attempt`` seconds, or the server's ``Retry-After`` if longer; after
  ``max_retries`` retries an :class:`HTTPRequestError` naming the URL and the last problem;
  other 4xx fail at once;
- **no flooding**: at most ``max_concurrency`` requests in flight, and a request abandoned after
  a timeout still counts as in flight for as long as its retry may wait (not every server stops
  working on a request when its client hangs up: vLLM does, ``transformers serve`` does not),
  so retries do not pile up on a server that is merely slow;
- **the API key stays in the Authorization header**: never logged, never stored, never in an
  exception message or a ``repr`` (a server echoing it back is redacted); credentials written
  into the URL (``http://user:password@host``) are sent, and never printed;
- **an error is no answer**: a 200 that is not a JSON object, or one carrying an ``error``
  object (a proxy's upstream failure), raises :class:`HTTPResponseError`;
- **cancellable**: :meth:`JSONClient.cancel` (Ctrl-C) makes every request waiting for a retry or
  a slot give up at once instead of retrying.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from mechsteer.core.errors import ConfigError, MechsteerError

logger = logging.getLogger(__name__)

ENV_OPENAI_URL = "OPENAI_BASE_URL"
ENV_OPENAI_API_KEY = "OPENAI_API_KEY"

# Retried like the OpenAI SDK does: request timeout, conflict (lock), rate limit; and all 5xx.
RETRYABLE_STATUS = frozenset({408, 409, 429})
# A server asking for a longer Retry-After than this is treated as down, not waited for.
MAX_RETRY_DELAY_S = 120.0
# How much of an error response body goes into an exception message.
ERROR_BODY_CHARS = 300
# Connecting never needs long on a reachable server; the rest of the budget is for the answer.
CONNECT_TIMEOUT_S = 10.0

_VERSION_SEGMENT = re.compile(r"/v\d+[a-z0-9]*(/|$)")


class HTTPRequestError(MechsteerError):
    """The server kept failing (after the retries) or refused the request."""


class HTTPResponseError(MechsteerError):
    """The server answered 200, but not with a JSON object."""


class RequestCancelled(HTTPRequestError):
    """The client was cancelled (:meth:`JSONClient.cancel`) while the request waited or ran."""


class AnswerTooSlow(Exception):
    """An attempt's answer did not arrive whole within its timeout (retried as a timeout)."""


def without_credentials(url: str) -> str:
    """``url`` as it may be printed: without a ``user:password@`` part."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return re.sub(r"//[^/@]*@", "//", url)
    return str(parsed.copy_with(username=None, password=None)) if parsed.userinfo else url


def endpoint_url(base_url: str, endpoint: str) -> str:
    """The URL of ``endpoint`` (``"chat/completions"``, ``"completions"``) for a server's base URL.

    - already ends in ``/<endpoint>``: used as is;
    - has an API version segment (``/v1``, ``/v1beta/openai``, ...): ``/<endpoint>`` is appended
      (OpenAI ``https://api.openai.com/v1``, vLLM/SGLang/ollama/llama.cpp ``.../v1``);
    - otherwise (``http://localhost:8000``): ``/v1/<endpoint>`` is appended.
    """
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"a server URL must start with http:// or https://, got {without_credentials(base_url)!r}")
    if url.endswith("/" + endpoint):
        return url
    if _VERSION_SEGMENT.search(httpx.URL(url).path):
        return f"{url}/{endpoint}"
    return f"{url}/v1/{endpoint}"


def retry_after_seconds(value: str | None) -> float | None:
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


@dataclass(frozen=True)
class HTTPSettings:
    """How patiently and how hard a server is asked (see the module docstring)."""

    timeout: float = 120.0  # seconds one attempt may wait for its answer
    max_retries: int = 3  # so at most max_retries + 1 attempts per request
    backoff: float = 1.0  # seconds before the first retry; doubles with each retry
    max_concurrency: int = 4  # requests in flight at once, abandoned ones included
    timeout_growth: float = 2.0  # each retry after a timeout waits this many times longer ...
    max_timeout: float | None = None  # ... up to this many seconds (default: 4 x timeout)

    def __post_init__(self) -> None:
        problems = []
        if not self.timeout > 0:
            problems.append(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.max_retries < 0:
            problems.append(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff < 0:
            problems.append(f"backoff must be >= 0 seconds, got {self.backoff}")
        if self.max_concurrency < 1:
            problems.append(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.timeout_growth < 1:
            problems.append(f"timeout_growth must be >= 1, got {self.timeout_growth}")
        if self.max_timeout is not None and self.max_timeout < self.timeout:
            problems.append(f"max_timeout ({self.max_timeout}) must be >= timeout ({self.timeout})")
        if problems:
            raise ConfigError("; ".join(problems))

    def with_overrides(self, **overrides: Any) -> HTTPSettings:
        """These settings with the fields of ``overrides`` that are not None replaced."""
        changes: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
        return dataclasses.replace(self, **changes)

    def attempt_timeout(self, n_timeouts: int) -> float:
        """The timeout of an attempt after ``n_timeouts`` timed-out attempts of the same request."""
        ceiling = self.max_timeout if self.max_timeout is not None else 4 * self.timeout
        return min(self.timeout * self.timeout_growth**n_timeouts, ceiling)


class InFlightLimit:
    """At most ``limit`` requests in flight, counting each abandoned one until its hold expires."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active = 0
        self._abandoned_until: list[float] = []  # monotonic expiry times
        self._condition = threading.Condition()
        self.peak = 0  # the most requests (abandoned included) ever counted at once

    def _count(self, now: float) -> int:
        self._abandoned_until = [until for until in self._abandoned_until if until > now]
        return self._active + len(self._abandoned_until)

    def acquire(self) -> None:
        with self._condition:
            while True:
                now = time.monotonic()
                if self._count(now) < self.limit:
                    break
                # Wake when the earliest abandoned request stops counting, or when a slot frees.
                wait = min(self._abandoned_until, default=now + 60.0) - now
                self._condition.wait(timeout=max(wait, 0.001))
            self._active += 1
            self.peak = max(self.peak, self._count(now))

    def release(self, abandoned_for: float = 0.0) -> None:
        """Free a slot; ``abandoned_for`` > 0: the server may still be busy with it that long."""
        with self._condition:
            self._active -= 1
            if abandoned_for > 0:
                self._abandoned_until.append(time.monotonic() + abandoned_for)
            self._condition.notify_all()

    @contextmanager
    def slot(self) -> Iterator[list[float]]:
        """A slot for one attempt; put a duration into the yielded list to mark it abandoned."""
        self.acquire()
        abandoned: list[float] = []
        try:
            yield abandoned
        finally:
            self.release(sum(abandoned))


class JSONClient:
    """POSTs JSON to one URL and returns the JSON object answered; see the module docstring.

    ``role`` names the server in messages ("judge server", "generation server"). Thread-safe: the
    judge and the engine call :meth:`post` from worker threads.
    """

    def __init__(self, url: str, *, api_key: str | None = None, settings: HTTPSettings | None = None,
                 role: str = "server") -> None:
        self._request_url = url
        self.url = without_credentials(url)  # what messages name; requests go to the URL as given
        self.role = role
        self.settings = settings or HTTPSettings()
        self._api_key = api_key or None
        userinfo = httpx.URL(url).userinfo.decode("utf-8", "replace")
        # what a server or an error message may echo back: the key, the URL's credentials
        self._secrets = [secret for secret in (self._api_key, userinfo, userinfo.partition(":")[2]) if secret]
        self._cancelled = threading.Event()
        self._limit = InFlightLimit(self.settings.max_concurrency)
        self._client = httpx.Client()
        self._counter_lock = threading.Lock()
        self.n_requests = 0  # HTTP requests sent, retries included
        self.n_timeouts = 0

    @property
    def peak_in_flight(self) -> int:
        return self._limit.peak

    def __repr__(self) -> str:
        key_state = "set" if self._api_key else "none"
        return f"JSONClient(url={self.url!r}, role={self.role!r}, api_key=<{key_state}>, settings={self.settings})"

    def close(self) -> None:
        self._client.close()

    def cancel(self) -> None:
        """Give up every request of this client: none is retried or started again, and the
        connections in flight are closed (Ctrl-C must not wait for a hung server)."""
        self._cancelled.set()
        self._client.close()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __enter__(self) -> JSONClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def redact(self, text: str) -> str:
        """``text`` with the API key and the URL's credentials replaced (for anything a server echoes back)."""
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The JSON object the server answers to ``payload``, after retries (see the module docstring)."""
        response = self._post_with_retries(payload)
        try:
            body = response.json()
        except ValueError:
            snippet = self.redact(response.text[:ERROR_BODY_CHARS])
            raise HTTPResponseError(f"{self.role} {self.url} returned a response that is not JSON: {snippet!r}") from None
        if not isinstance(body, dict):
            raise HTTPResponseError(f"{self.role} {self.url} returned JSON that is not an object: {type(body).__name__}")
        if body.get("error") is not None:  # a proxy's upstream failure, sent as a 200
            snippet = self.redact(str(body["error"])[:ERROR_BODY_CHARS])
            raise HTTPResponseError(f"{self.role} {self.url} answered HTTP 200 with an error object: {snippet}")
        return body

    def _post_within(self, payload: dict[str, Any], timeout: float) -> httpx.Response:
        """One attempt, whole answer within ``timeout`` seconds: httpx's read timeout restarts at
        every byte, so a server that drips its answer is cut off by this deadline instead."""
        deadline = time.monotonic() + timeout
        with self._client.stream("POST", self._request_url, json=payload, headers=self._headers(),
                                 timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))) as streamed:
            chunks = []
            for chunk in streamed.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise AnswerTooSlow(f"the answer was still arriving after {timeout:g} s")
            # the body as read (already decoded): a plain response around it
            headers = {key: value for key, value in streamed.headers.items() if key.lower() != "content-encoding"}
            return httpx.Response(streamed.status_code, headers=headers, content=b"".join(chunks),
                                  request=streamed.request)

    def _post_with_retries(self, payload: dict[str, Any]) -> httpx.Response:
        settings = self.settings
        attempts = settings.max_retries + 1
        last_problem = ""
        n_timeouts = 0
        for attempt in range(attempts):
            if self.cancelled:
                raise RequestCancelled(f"{self.role} {self.url}: request cancelled")
            retry_after: float | None = None
            timeout = settings.attempt_timeout(n_timeouts)
            with self._counter_lock:
                self.n_requests += 1
            logger.debug("request to %s, attempt %d/%d (timeout %.0f s)", self.url, attempt + 1, attempts, timeout)
            with self._limit.slot() as abandoned:
                try:
                    response = self._post_within(payload, timeout)
                except (httpx.TimeoutException, AnswerTooSlow) as error:
                    last_problem = f"timed out after {timeout:g} s ({type(error).__name__})"
                    n_timeouts += 1
                    with self._counter_lock:
                        self.n_timeouts += 1
                    # The server may still be working on it: it keeps a slot for as long as the
                    # retry may wait (a sequential server answers the retry after finishing it).
                    abandoned.append(settings.attempt_timeout(n_timeouts))
                    response = None
                except (httpx.TransportError, RuntimeError) as error:
                    if self.cancelled:  # the client was closed under the request
                        raise RequestCancelled(f"{self.role} {self.url}: request cancelled") from None
                    if not isinstance(error, httpx.TransportError):
                        raise
                    last_problem = f"connection failed ({type(error).__name__}: {self.redact(str(error))})"
                    response = None
            if response is not None:
                status = response.status_code
                if status == 200:
                    return response
                snippet = self.redact(response.text[:ERROR_BODY_CHARS])
                if status not in RETRYABLE_STATUS and status < 500:
                    raise HTTPRequestError(
                        f"{self.role} {self.url} refused the request with HTTP {status} (not retried): {snippet}")
                last_problem = f"HTTP {status}: {snippet}"
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == attempts - 1:
                break
            delay = settings.backoff * (2**attempt)
            if retry_after is not None:
                if retry_after > MAX_RETRY_DELAY_S:
                    raise HTTPRequestError(
                        f"{self.role} {self.url} asked to retry after {retry_after:.0f} s "
                        f"(more than {MAX_RETRY_DELAY_S:.0f} s); last problem: {last_problem}")
                delay = max(delay, retry_after)
            # The body may be long; the reason before the first ':' is enough for the log.
            logger.info("%s request failed (%s); retrying in %.2f s", self.role, last_problem.split(":")[0], delay)
            if self._cancelled.wait(delay):
                raise RequestCancelled(f"{self.role} {self.url}: request cancelled")
        raise HTTPRequestError(
            f"{self.role} {self.url} failed {attempts} attempts (max_retries={settings.max_retries}); "
            f"last problem: {last_problem}")


__all__ = ["ENV_OPENAI_API_KEY", "ENV_OPENAI_URL", "HTTPRequestError", "HTTPResponseError", "HTTPSettings",
           "InFlightLimit", "JSONClient", "RequestCancelled", "endpoint_url", "retry_after_seconds",
           "without_credentials"]
