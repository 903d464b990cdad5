"""The judge clients. HTTPJudge is tested against a real chat-completions server on 127.0.0.1
(stdlib ThreadingHTTPServer in a thread), scripted per request; no mocked objects."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mechsteer.core.http import retry_after_seconds as _retry_after_seconds
from mechsteer.taxonomy.judge import prompts as judge_prompts
from mechsteer.taxonomy.judge.base import Judge, JudgeHTTPError, JudgeResponseError, complete_many
from mechsteer.taxonomy.judge.http import (
    ENV_API_KEY,
    ENV_MODEL,
    ENV_OPENAI_API_KEY,
    ENV_OPENAI_URL,
    ENV_URL,
    HTTPJudge,
    cache_key,
    chat_completions_url,
)
from mechsteer.taxonomy.judge.metrics import describe_behaviours, judge_score
from mechsteer.taxonomy.judge.oracle import OracleJudge
from mechsteer.taxonomy.judge.spec import judge_from_spec

SECRET = "sk-test-SECRET-9f8e7d6c5b4a"
MODEL = "judge-model-1"


def completion_body(text: str) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
        }
    )


@dataclass
class Reply:
    """One scripted server reply. ``body=None`` means: a valid completion from the responder."""

    status: int = 200
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    echo_auth: bool = False  # append the received Authorization header to the body


@dataclass
class Received:
    time: float
    path: str
    headers: dict[str, str]
    payload: dict


class ChatServer:
    """A chat-completions server: pops scripted replies, then answers with ``responder``."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.forever: Reply | None = None  # when set, every request gets this reply
        self.responder: Callable[[list[dict[str, str]]], str] = (
            lambda messages: "echo: " + messages[-1]["content"][-40:]
        )
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.received.append(
                        Received(time.monotonic(), self.path, dict(self.headers), payload)
                    )
                    reply = server.forever or (server.script.pop(0) if server.script else Reply())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if reply.delay:
                        time.sleep(reply.delay)
                    # Leave the in-flight count before replying: the client may send its next
                    # request as soon as it has this reply.
                    with server.lock:
                        server.in_flight -= 1
                    body = reply.body
                    if body is None:
                        body = completion_body(server.responder(payload["messages"]))
                    if reply.echo_auth:
                        body += f" (you sent Authorization: {self.headers.get('Authorization')})"
                    data = body.encode("utf-8")
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up, as scripted

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A short poll interval: shutdown() waits up to one interval.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ChatServer]:
    chat_server = ChatServer()
    yield chat_server
    chat_server.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_URL, ENV_MODEL, ENV_API_KEY, ENV_OPENAI_URL, ENV_OPENAI_API_KEY):
        monkeypatch.delenv(name, raising=False)


def make_judge(server: ChatServer, **kwargs: object) -> HTTPJudge:
    options = {"timeout": 2.0, "max_retries": 3, "backoff": 0.01}
    options.update(kwargs)
    return HTTPJudge(server.url + "/v1", MODEL, SECRET, **options)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


# ---- plain success ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/v1/chat/completions"])
def test_request_reaches_chat_completions_with_auth(server: ChatServer, suffix: str) -> None:
    judge = HTTPJudge(server.url + suffix, MODEL, SECRET, backoff=0.01)
    assert isinstance(judge, Judge)
    answer = judge.complete(ask("hello"), max_tokens=17, temperature=0.0)
    assert answer == "echo: hello"
    (request,) = server.received
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    assert request.payload == {
        "model": MODEL,
        "messages": ask("hello"),
        "max_tokens": 17,
        "temperature": 0.0,
    }


def test_no_key_sends_no_authorization(server: ChatServer) -> None:
    judge = HTTPJudge(server.url, MODEL)
    assert judge.complete(ask("hi")) == "echo: hi"
    assert "Authorization" not in server.received[0].headers


@pytest.mark.parametrize(
    ("base_url", "endpoint"),
    [
        ("http://localhost:11434", "http://localhost:11434/v1/chat/completions"),
        ("http://localhost:8000/v1", "http://localhost:8000/v1/chat/completions"),
        ("https://api.openai.com/v1/", "https://api.openai.com/v1/chat/completions"),
        ("http://host:8080/v1/chat/completions", "http://host:8080/v1/chat/completions"),
        (
            "https://generativelanguage.googleapis.com/v1beta/openai/",
            "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions",
        ),
        ("http://proxy/llm", "http://proxy/llm/v1/chat/completions"),
    ],
)
def test_chat_completions_url(base_url: str, endpoint: str) -> None:
    assert chat_completions_url(base_url) == endpoint


def test_bad_base_url() -> None:
    with pytest.raises(ValueError, match="http://"):
        chat_completions_url("localhost:8000")


# ---- configuration from the environment --------------------------------------------------------


def test_missing_endpoint_names_the_variable() -> None:
    with pytest.raises(ValueError, match=ENV_URL):
        HTTPJudge(model=MODEL)


def test_missing_model_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match=ENV_MODEL):
        HTTPJudge()


def test_environment_configuration(server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_OPENAI_URL, server.url + "/v1")
    monkeypatch.setenv(ENV_MODEL, "env-model")
    monkeypatch.setenv(ENV_OPENAI_API_KEY, "openai-key")
    assert HTTPJudge().complete(ask("a")) == "echo: a"
    assert server.received[-1].headers["Authorization"] == "Bearer openai-key"
    assert server.received[-1].payload["model"] == "env-model"
    # The mechsteer variables take precedence over the OpenAI ones.
    monkeypatch.setenv(ENV_URL, server.url)
    monkeypatch.setenv(ENV_API_KEY, "mechsteer-key")
    HTTPJudge().complete(ask("b"))
    assert server.received[-1].headers["Authorization"] == "Bearer mechsteer-key"


def test_judge_from_spec(server: ChatServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=ENV_URL):
        judge_from_spec("http")
    monkeypatch.setenv(ENV_URL, server.url)
    monkeypatch.setenv(ENV_MODEL, "env-model")
    judge = judge_from_spec("http:named-model", cache_dir=tmp_path)
    assert isinstance(judge, HTTPJudge)
    assert (judge.model, judge.cache_dir) == ("named-model", tmp_path)
    assert judge_from_spec("http").model == "env-model"
    for bad in ("openai", "local", "oracle"):
        with pytest.raises(ValueError, match="judge"):
            judge_from_spec(bad)


# ---- retries -----------------------------------------------------------------------------------


def test_429_then_success_honours_retry_after(server: ChatServer) -> None:
    server.script = [Reply(429, body='{"error": "rate limited"}', headers={"Retry-After": "0.3"})]
    judge = make_judge(server, backoff=0.01)
    assert judge.complete(ask("x")) == "echo: x"
    assert server.count == 2
    gap = server.received[1].time - server.received[0].time
    assert gap >= 0.3  # Retry-After, not the 0.01 s backoff
    assert judge.n_requests == 2


def test_500_then_success_backs_off_exponentially(server: ChatServer) -> None:
    server.script = [Reply(500, body="boom"), Reply(503, body="busy")]
    judge = make_judge(server, backoff=0.05)
    assert judge.complete(ask("x")) == "echo: x"
    assert server.count == 3
    first_gap = server.received[1].time - server.received[0].time
    second_gap = server.received[2].time - server.received[1].time
    assert first_gap >= 0.05
    assert second_gap >= 0.10


def test_500_forever_gives_up_after_max_retries(server: ChatServer) -> None:
    server.forever = Reply(500, body="internal error")
    judge = make_judge(server, max_retries=2)
    with pytest.raises(JudgeHTTPError, match="failed 3 attempts") as error:
        judge.complete(ask("x"))
    assert server.count == 3
    assert "HTTP 500" in str(error.value)


def test_408_is_retried(server: ChatServer) -> None:
    server.script = [Reply(408, body="request timeout")]
    assert make_judge(server).complete(ask("x")) == "echo: x"
    assert server.count == 2


def test_client_error_is_not_retried(server: ChatServer) -> None:
    server.forever = Reply(400, body='{"error": "bad model"}')
    with pytest.raises(JudgeHTTPError, match="HTTP 400"):
        make_judge(server).complete(ask("x"))
    assert server.count == 1


def test_excessive_retry_after_fails_fast(server: ChatServer) -> None:
    server.forever = Reply(429, body="slow down", headers={"Retry-After": "100000"})
    with pytest.raises(JudgeHTTPError, match="retry after"):
        make_judge(server).complete(ask("x"))
    assert server.count == 1


def test_timeout_then_success(server: ChatServer) -> None:
    server.script = [Reply(delay=1.0)]
    judge = make_judge(server, timeout=0.25, max_retries=1)
    started = time.monotonic()
    assert judge.complete(ask("x")) == "echo: x"
    assert server.count == 2
    assert time.monotonic() - started < 0.9  # did not wait for the slow reply


def test_timeout_forever_is_a_clear_error(server: ChatServer) -> None:
    server.forever = Reply(delay=1.0)
    judge = make_judge(server, timeout=0.2, max_retries=1)
    with pytest.raises(JudgeHTTPError, match="timed out after 0.4 s") as error:  # the retry waited twice as long
        judge.complete(ask("x"))
    assert server.url in str(error.value)
    assert "failed 2 attempts" in str(error.value)
    assert server.count == 2


def test_a_slow_server_is_not_flooded_by_retries(server: ChatServer) -> None:
    """The failure of issue 16: a sequential server slower than the timeout, two workers. Abandoned
    requests stay counted as in flight, so the server never holds more than max_concurrency."""
    server.forever = Reply(delay=0.6)
    judge = make_judge(server, timeout=0.25, max_retries=2, max_concurrency=2)
    # attempts wait 0.25, 0.5, then 1.0 s: the third is answered
    answers = complete_many(judge, [ask(f"q{i}") for i in range(4)], concurrency=4)
    assert answers == [f"echo: q{i}" for i in range(4)]
    assert judge._http.n_timeouts >= 4
    assert server.max_in_flight <= 2
    assert judge._http.peak_in_flight <= 2


def test_the_retry_after_a_timeout_gets_the_answer(server: ChatServer) -> None:
    """A server that needs 0.5 s: the first attempt (0.3 s) is abandoned, the retry (0.6 s) is answered."""
    server.forever = Reply(delay=0.5)
    judge = make_judge(server, timeout=0.3, max_retries=1, max_concurrency=1)
    assert judge.complete(ask("slow")) == "echo: slow"
    assert server.count == 2
    # the retry waited for the abandoned request's slot: the server never ran two at once
    assert server.max_in_flight == 1


def test_connection_refused_is_retried_then_clear() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = HTTPJudge(f"http://127.0.0.1:{port}", MODEL, SECRET, max_retries=1, backoff=0.01)
    with pytest.raises(JudgeHTTPError, match="connection failed") as error:
        judge.complete(ask("x"))
    assert "failed 2 attempts" in str(error.value)
    assert judge.n_requests == 2


def test_retry_after_forms() -> None:
    assert _retry_after_seconds("3") == 3.0
    assert _retry_after_seconds("0.25") == 0.25
    assert _retry_after_seconds(None) is None
    assert _retry_after_seconds("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after_seconds(later) <= 30


# ---- malformed responses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ("<html>gateway page</html>", "not JSON"),
        ("[1, 2]", "not an object"),
        ('{"error": "oops"}', "HTTP 200 with an error object: oops"),
        ('{"error": {"message": "no healthy upstream"}, "choices": [{"message": {"content": "no"}}]}',
         "HTTP 200 with an error object"),
        ('{"choices": []}', "no 'choices'"),
        ('{"choices": [{"index": 0}]}', "without a 'message'"),
        ('{"choices": [{"message": {"role": "assistant"}}]}', "without a text 'content'"),
        ('{"choices": [{"message": {"content": null}, "finish_reason": "length"}]}', "finish_reason='length'"),
    ],
)
def test_malformed_response_is_a_clear_error(server: ChatServer, body: str, complaint: str) -> None:
    server.forever = Reply(200, body=body)
    with pytest.raises(JudgeResponseError, match=complaint):
        make_judge(server).complete(ask("x"))
    assert server.count == 1  # no retry loop


def test_content_parts_are_joined(server: ChatServer) -> None:
    parts = {"choices": [{"message": {"content": [{"type": "text", "text": "ye"}, {"type": "text", "text": "s"}]}}]}
    server.forever = Reply(200, body=json.dumps(parts))
    assert make_judge(server).complete(ask("x")) == "yes"


# ---- concurrency and cache ---------------------------------------------------------------------


def test_concurrency_limit(server: ChatServer) -> None:
    server.forever = Reply(delay=0.15)
    judge = make_judge(server, max_concurrency=2)
    prompts = [ask(f"q{i}") for i in range(6)]
    answers = complete_many(judge, prompts, concurrency=6)
    assert answers == [f"echo: q{i}" for i in range(6)]  # input order kept
    assert server.max_in_flight == 2


def test_cache_makes_reruns_free(server: ChatServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [ask(f"q{i}") for i in range(3)]
    first = complete_many(make_judge(server, cache_dir=tmp_path), prompts)
    assert server.count == 3

    rerun_judge = make_judge(server, cache_dir=tmp_path)
    assert complete_many(rerun_judge, prompts) == first
    assert server.count == 3  # zero requests on the rerun
    assert (rerun_judge.n_requests, rerun_judge.n_cache_hits) == (0, 3)

    # Anything in the key changes the answer's identity.
    rerun_judge.complete(prompts[0], temperature=0.5)
    rerun_judge.complete(prompts[0], max_tokens=99)
    HTTPJudge(server.url, "other-model", SECRET, cache_dir=tmp_path).complete(prompts[0])
    released_version = judge_prompts.PROMPT_VERSION
    monkeypatch.setattr(judge_prompts, "PROMPT_VERSION", "test-next")
    rerun_judge.complete(prompts[0])
    assert server.count == 7

    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 7
    versions = sorted({json.loads(f.read_text())["prompt_version"] for f in files})
    assert versions == sorted({"test-next", released_version})


def test_cache_file_layout(server: ChatServer, tmp_path: Path) -> None:
    judge = make_judge(server, cache_dir=tmp_path)
    judge.complete(ask("layout"), max_tokens=5)
    key = cache_key(MODEL, ask("layout"), 5, 0.0)
    path = tmp_path / key[:2] / f"{key}.json"
    record = json.loads(path.read_text())
    assert record["prompt_version"] == judge_prompts.PROMPT_VERSION
    assert record["messages"] == ask("layout")
    assert record["response"] == "echo: layout"


# ---- the key never leaks ----------------------------------------------------------------------


def test_key_never_leaks(server: ChatServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    judge = make_judge(server, cache_dir=tmp_path, max_retries=1)
    leaks: list[str] = [repr(judge), str(judge)]

    server.script = [Reply(429, body="slow", headers={"Retry-After": "0"}, echo_auth=True)]
    judge.complete(ask("cached answer"))  # a retry, then a success written to the cache

    server.forever = Reply(500, body="crash", echo_auth=True)
    with pytest.raises(JudgeHTTPError) as retried:
        judge.complete(ask("fails"))
    leaks.append(str(retried.value))
    assert "<redacted>" in str(retried.value)  # the server did echo the key back

    server.forever = Reply(401, body="who are you", echo_auth=True)
    with pytest.raises(JudgeHTTPError) as refused:
        judge.complete(ask("refused"))
    leaks.append(str(refused.value))

    server.forever = Reply(200, body=f"not json {SECRET}")
    with pytest.raises(JudgeResponseError) as malformed:
        judge.complete(ask("malformed"))
    leaks.append(str(malformed.value))

    # The server did receive the key, every time.
    assert server.count == 6  # 429 + retry, 500 twice, 401, malformed
    assert all(r.headers["Authorization"] == f"Bearer {SECRET}" for r in server.received)

    assert any(r.name == "mechsteer.taxonomy.judge.http" and r.levelno == logging.DEBUG for r in caplog.records)
    assert any(r.name.startswith("httpx") for r in caplog.records)  # third-party logs captured too
    leaks.append(caplog.text)
    leaks += [path.read_text() for path in tmp_path.rglob("*") if path.is_file()]
    assert len(leaks) >= 7
    for text in leaks:
        assert SECRET not in text


# ---- the oracle ---------------------------------------------------------------------------------

LABELS = {
    "Let me check: 2 + 2 = 4, correct.": "verify",
    "Wait, that contradicts the earlier step.": "backtrack",
    "First, I will compute the area.": "plan",
}
DESCRIPTIONS = {
    "verify": "Checks a previous result.",
    "backtrack": "Abandons a line of reasoning.",
    "plan": "Lays out the next steps.",
}


def test_oracle_answers_each_task() -> None:
    oracle = OracleJudge(LABELS, DESCRIPTIONS)
    sentences = list(LABELS)
    title = oracle.complete(judge_prompts.describe_behaviour_messages([sentences[0], sentences[0], sentences[1]]))
    assert title == "Title: verify\nDescription: Checks a previous result."
    assert oracle.complete(judge_prompts.consistency_messages("verify", "x", sentences[0])) == "yes"
    assert oracle.complete(judge_prompts.consistency_messages("verify", "x", sentences[1])) == "no"
    # A category is recognised by its description when its title is not a label.
    assert oracle.complete(judge_prompts.completeness_messages("Checking", "Checks a previous result.", sentences[0])) == "10"
    assert oracle.complete(judge_prompts.completeness_messages("plan", "x", sentences[0])) == "0"
    assert oracle.complete(judge_prompts.pair_similarity_messages("plan", "", "plan", "")) == "10"
    assert oracle.complete(judge_prompts.pair_similarity_messages("plan", "", "verify", "")) == "0"


def test_oracle_tie_goes_to_first_label_alphabetically() -> None:
    oracle = OracleJudge(LABELS, DESCRIPTIONS)
    answer = oracle.complete(judge_prompts.describe_behaviour_messages(list(LABELS)))
    assert answer.startswith("Title: backtrack\n")


def test_oracle_rejects_unknowns() -> None:
    oracle = OracleJudge(LABELS, DESCRIPTIONS)
    with pytest.raises(ValueError, match="no ground-truth label for sentence"):
        oracle.complete(judge_prompts.consistency_messages("verify", "x", "An unseen sentence."))
    with pytest.raises(ValueError, match="cannot map category"):
        oracle.complete(judge_prompts.consistency_messages("Mystery", "Unknown.", list(LABELS)[0]))
    with pytest.raises(ValueError, match="not a mechsteer prompt"):
        oracle.complete(ask("free text"))
    with pytest.raises(ValueError, match="labels without a description"):
        OracleJudge({"s": "ghost"}, DESCRIPTIONS)


# ---- metrics over the wire ----------------------------------------------------------------------


def test_metrics_through_http_with_cache(server: ChatServer, tmp_path: Path) -> None:
    """The whole judge protocol over HTTP: a server that answers like the oracle."""
    sentences = [f"{label} sentence {i}" for label in DESCRIPTIONS for i in range(6)]
    labels = {s: s.split()[0] for s in sentences}
    oracle = OracleJudge(labels, DESCRIPTIONS)
    server.responder = oracle.complete
    assignments = [list(DESCRIPTIONS).index(labels[s]) for s in sentences]
    examples = {b: [s for s, a in zip(sentences, assignments, strict=True) if a == b] for b in range(3)}

    def run() -> tuple[dict, float]:
        judge = make_judge(server, cache_dir=tmp_path, max_concurrency=4)
        descriptions = describe_behaviours(judge, examples, n_repeats=2)
        scores = judge_score(judge, descriptions, sentences, assignments, n_in=4, n_out=4, n_per_behaviour=3)
        return {b: d.title for b, d in descriptions.items()}, scores.final

    titles, final = run()
    assert titles == {0: "verify", 1: "backtrack", 2: "plan"}
    assert final == pytest.approx(1.0)
    n_first = server.count
    assert n_first == 3 * 2 + 3 * 8 + 3 * 3 + 3
    assert run() == (titles, final)
    assert server.count == n_first  # the rerun is free
