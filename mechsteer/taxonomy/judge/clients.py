"""The pluggable LLM judge: one protocol, three implementations.

- :class:`HTTPJudge`: any OpenAI-compatible ``/v1/chat/completions`` server (OpenAI, vLLM,
  ollama, llama.cpp's ``llama-server``), with retries, a concurrency limit and an on-disk cache.
- :class:`LocalJudge`: a TransformerLens ``TransformerBridge`` chat model, greedy, for offline use.
- :class:`OracleJudge`: for model organisms, answers the same prompts from ground-truth labels.

All prompts come from :mod:`mechsteer.taxonomy.judge.prompts`; the metrics in
:mod:`mechsteer.taxonomy.judge.metrics` only talk to the :class:`Judge` protocol.
"""

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
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from mechsteer.taxonomy.judge import prompts as judge_prompts
from mechsteer.taxonomy.judge.prompts import (
    format_description_answer,
    parse_prompt,
)

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]

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


@runtime_checkable
class Judge(Protocol):
    """Chat messages in OpenAI format -> the assistant's text."""

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> str: ...


class JudgeError(RuntimeError):
    """The judge could not produce an answer."""


class JudgeHTTPError(JudgeError):
    """The server kept failing (after retries) or refused the request."""


class JudgeResponseError(JudgeError):
    """The server answered 200 but not with a chat completion we can read."""


def complete_many(
    judge: Judge,
    messages_list: Sequence[Messages],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    concurrency: int | None = None,
) -> list[str]:
    """``judge.complete`` on each message list, answers in input order.

    A judge with its own ``complete_many`` (e.g. a batched local model) is delegated to.
    Otherwise requests run on a thread pool of ``concurrency`` workers (default: the judge's
    ``max_concurrency`` attribute, else 1 = sequential). The first error is raised.
    """
    messages_list = list(messages_list)
    own_batch = getattr(judge, "complete_many", None)
    if callable(own_batch):
        answers = own_batch(messages_list, max_tokens=max_tokens, temperature=temperature)
        if len(answers) != len(messages_list):
            raise JudgeError(
                f"{type(judge).__name__}.complete_many returned {len(answers)} answers for "
                f"{len(messages_list)} prompts"
            )
        return list(answers)
    workers = concurrency if concurrency is not None else getattr(judge, "max_concurrency", 1)
    if workers < 1:
        raise ValueError(f"concurrency must be >= 1, got {workers}")

    def one(messages: Messages) -> str:
        return judge.complete(messages, max_tokens=max_tokens, temperature=temperature)

    if workers == 1 or len(messages_list) <= 1:
        return [one(m) for m in messages_list]
    with ThreadPoolExecutor(max_workers=min(workers, len(messages_list))) as pool:
        return list(pool.map(one, messages_list))


# ---- HTTP ---------------------------------------------------------------------------------------

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
        _check_messages(messages)
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


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(f"messages[{index}] must be a dict with str 'role' and 'content'")


# ---- local model --------------------------------------------------------------------------------


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
        _check_messages(messages)
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
        # Imported here: generation pulls in the model stack, which HTTP/oracle users do not need.
        from mechsteer.interventions.generation import generate

        token_ids = [self.render(m) for m in messages_list]
        if not token_ids:
            return []
        result = generate(self.model, token_ids, max_new_tokens=max_tokens, batch_size=self.batch_size)
        return [text.strip() for text in result.texts]


# ---- oracle -------------------------------------------------------------------------------------


class OracleJudge:
    """Answers the judge prompts from ground truth, for model organisms.

    ``sentence_labels`` maps each sentence to its planted behaviour label;
    ``label_descriptions`` maps each label to its description. It reads the prompt built by
    :mod:`mechsteer.taxonomy.judge.prompts` and answers as a perfect judge would:

    - describe_behaviour: title = the majority label of the example sentences (ties: the
      alphabetically first), description = that label's description;
    - consistency: "yes" iff the sentence's label is the category's label;
    - completeness: "10" if the sentence's label is the category's label, else "0";
    - pair_similarity: "10" if both categories are the same label, else "0".

    A category's label is its title if that is a known label, else the label whose description
    equals its description. Unknown sentences or categories raise ValueError.
    """

    max_concurrency = 1

    def __init__(self, sentence_labels: Mapping[str, str], label_descriptions: Mapping[str, str]) -> None:
        missing = sorted(set(sentence_labels.values()) - set(label_descriptions))
        if missing:
            raise ValueError(f"labels without a description: {missing}")
        self.sentence_labels = dict(sentence_labels)
        self.label_descriptions = dict(label_descriptions)
        self._label_by_description = {d: label for label, d in label_descriptions.items()}

    def __repr__(self) -> str:
        return (
            f"OracleJudge({len(self.sentence_labels)} sentences, "
            f"labels={sorted(self.label_descriptions)})"
        )

    def _sentence_label(self, sentence: str) -> str:
        try:
            return self.sentence_labels[sentence]
        except KeyError:
            shown = sentence if len(sentence) <= 80 else sentence[:77] + "..."
            raise ValueError(f"OracleJudge has no ground-truth label for sentence {shown!r}") from None

    def _category_label(self, title: str, description: str) -> str:
        if title in self.label_descriptions:
            return title
        if description in self._label_by_description:
            return self._label_by_description[description]
        raise ValueError(
            f"OracleJudge cannot map category {title!r} to a ground-truth label; "
            f"known labels: {sorted(self.label_descriptions)}"
        )

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> str:
        prompt = parse_prompt(messages)
        if prompt.task == judge_prompts.DESCRIBE_BEHAVIOUR.name:
            sentences = prompt.fields.get("Sentence", ())
            if not sentences:
                raise ValueError("describe_behaviour prompt carries no sentences")
            counts = Counter(self._sentence_label(s) for s in sentences)
            top = max(counts.values())
            label = min(label for label, count in counts.items() if count == top)
            return format_description_answer(label, self.label_descriptions[label])
        if prompt.task in (judge_prompts.CONSISTENCY.name, judge_prompts.COMPLETENESS.name):
            category = self._category_label(prompt.one("Title"), prompt.one("Description"))
            match = self._sentence_label(prompt.one("Sentence")) == category
            if prompt.task == judge_prompts.CONSISTENCY.name:
                return "yes" if match else "no"
            return "10" if match else "0"
        if prompt.task == judge_prompts.PAIR_SIMILARITY.name:
            label_a = self._category_label(prompt.one("Title A"), prompt.one("Description A"))
            label_b = self._category_label(prompt.one("Title B"), prompt.one("Description B"))
            return "10" if label_a == label_b else "0"
        raise ValueError(f"OracleJudge cannot answer task {prompt.task!r}")


# ---- from a command-line spec --------------------------------------------------------------------

JUDGE_SPEC_HELP = (
    "'http' (endpoint, model and key from MECHSTEER_JUDGE_URL / MECHSTEER_JUDGE_MODEL / "
    "MECHSTEER_JUDGE_API_KEY), 'http:<model>' (the model named here), or 'local:<model spec>' "
    "(a chat model loaded with mechsteer.core.models.load_model, e.g. local:smollm2)"
)


def judge_from_spec(spec: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Judge:
    """A judge from a CLI string; see ``JUDGE_SPEC_HELP``. The oracle needs ground-truth labels,
    so it is built directly: ``OracleJudge(sentence_labels, label_descriptions)``."""
    kind, _, argument = spec.partition(":")
    if kind == "http":
        return HTTPJudge(model=argument or None, cache_dir=cache_dir)
    if kind == "local" and argument:
        from mechsteer.core.models import load_model

        return LocalJudge(load_model(argument))
    if kind == "oracle":
        raise ValueError("the oracle judge needs ground-truth labels: build OracleJudge(...) directly")
    raise ValueError(f"unknown judge spec {spec!r}; expected {JUDGE_SPEC_HELP}")
