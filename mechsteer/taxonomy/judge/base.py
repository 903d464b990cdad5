"""The judge protocol every taxonomy metric talks to, its errors, and batched completion.

A judge takes chat messages in OpenAI format and returns the assistant's text. Three
implementations: :class:`~mechsteer.taxonomy.judge.http.HTTPJudge` (any OpenAI-compatible
server), :class:`~mechsteer.taxonomy.judge.local.LocalJudge` (a local chat model) and
:class:`~mechsteer.taxonomy.judge.oracle.OracleJudge` (ground truth, for model organisms);
:func:`~mechsteer.taxonomy.judge.spec.judge_from_spec` builds one from a command-line string.

All prompts come from :mod:`mechsteer.taxonomy.judge.prompts`; the metrics in
:mod:`mechsteer.taxonomy.judge.metrics` only talk to the :class:`Judge` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from mechsteer.core.errors import MechsteerError

Messages = list[dict[str, str]]


@runtime_checkable
class Judge(Protocol):
    """Chat messages in OpenAI format -> the assistant's text."""

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> str: ...


class JudgeError(MechsteerError, RuntimeError):
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


def check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(f"messages[{index}] must be a dict with str 'role' and 'content'")


__all__ = ["Judge", "JudgeError", "JudgeHTTPError", "JudgeResponseError", "Messages", "check_messages",
           "complete_many"]
