"""A scripted ``/v1/completions`` server on 127.0.0.1 (stdlib, in a thread) for the engine's
failure paths: HTTP errors, hangs, odd answers. The real server tests use ``transformers serve``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    """One reply: a status, a body (None: ``responder``'s completion), a delay before it. A
    completion body without a ``model`` names the one the request asked for."""

    status: int = 200
    body: dict[str, Any] | str | None = None
    delay: float = 0.0


def completion(text: str, finish_reason: str = "stop", prompt_tokens: int | None = None,
               **choice: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "text_completion",
                            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, **choice}]}
    if prompt_tokens is not None:
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": 1}
    return body


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    payload: dict[str, Any]


class StubServer:
    def __init__(self) -> None:
        self.responder: Callable[[dict[str, Any]], Answer] = lambda payload: Answer(body=completion(" ok"))
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                with server.lock:
                    server.received.append(Received(self.path, dict(self.headers), payload))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                answer = server.responder(payload)
                try:
                    time.sleep(answer.delay)
                    with server.lock:
                        server.in_flight -= 1
                    body = answer.body if answer.body is not None else completion(" ok")
                    if isinstance(body, dict) and "choices" in body and "model" not in body:
                        body = {**body, "model": payload.get("model")}  # as servers name the model asked for
                    data = (body if isinstance(body, str) else json.dumps(body)).encode()
                    self.send_response(answer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as scripted

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
