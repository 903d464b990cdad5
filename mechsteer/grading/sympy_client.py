"""The client of the sympy grading worker (the server is ``mechsteer.grading.sympy_worker``).

Whatever runs long in sympy is killed: the parent waits for the child's reply with ``select``
and a deadline, kills the child on timeout and starts a fresh one on the next call. This is
thread-safe (a lock serialises calls), needs no signals (so works off the main thread and
inside pytest), needs no ``__main__`` guard (a plain subprocess, not ``multiprocessing``),
and survives a child crash.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

from mechsteer.grading.latex import AST

logger = logging.getLogger(__name__)

SYMPY_TIMEOUT_S = 3.0
WORKER_START_TIMEOUT_S = 120.0


@lru_cache(maxsize=8192)
def sympy_equal(ast_pred: AST, ast_ref: AST, timeout_s: float) -> bool | None:
    """The worker's verdict on two ASTs (cached): True/False, or None when it could not decide."""
    return SYMPY_WORKER.compare(ast_pred, ast_ref, timeout_s)

WORKER_SCRIPT = Path(__file__).resolve().with_name("sympy_worker.py")


class SympyWorker:
    """A child process running ``sympy_worker.py``, killed and replaced on timeout.

    A plain subprocess (not ``multiprocessing``) so that the caller's ``__main__`` is never
    re-imported and no ``if __name__ == "__main__"`` guard is needed. Requests and replies are
    JSON lines over the child's stdin/stdout; the parent waits with ``select`` (POSIX only).

    ``compare`` returns True/False, or None when the comparison timed out, the child crashed
    or could not start; the caller treats None as "not equivalent".
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self.calls = 0
        self.timeouts = 0
        self.starts = 0

    def _ensure_started(self) -> bool:
        if self._process is not None and self._process.poll() is None:
            return True
        self._stop()
        try:
            # Run as a script, not `-m mechsteer...`: the worker needs sympy alone, and importing the
            # package would load torch and the whole public API into every worker.
            self._process = subprocess.Popen(
                [sys.executable, str(WORKER_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError as error:
            logger.warning("cannot start the sympy grading worker: %s", error)
            self._process = None
            return False
        self.starts += 1
        try:
            ready = self._read_line(time.monotonic() + WORKER_START_TIMEOUT_S)
        except (EOFError, OSError):
            ready = None
        if ready != b"ready":
            logger.warning("the sympy grading worker did not start (got %r)", ready)
            self._stop()
            return False
        return True

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the child, or None at the deadline; EOFError if the child died."""
        assert self._process is not None and self._process.stdout is not None
        descriptor = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([descriptor], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(descriptor, 65536)
            if not chunk:
                raise EOFError("the sympy worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stop(self) -> None:
        process, self._process, self._buffer = self._process, None, b""
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()

    def compare(self, ast_pred: AST, ast_ref: AST, timeout_s: float) -> bool | None:
        with self._lock:
            self.calls += 1
            if not self._ensure_started():
                return None
            assert self._process is not None and self._process.stdin is not None
            request = json.dumps([ast_pred, ast_ref]).encode("utf-8") + b"\n"
            try:
                self._process.stdin.write(request)
                self._process.stdin.flush()
                reply = self._read_line(time.monotonic() + timeout_s)
            except (EOFError, OSError):
                self._stop()
                return None
            if reply is None:
                self.timeouts += 1
                logger.info("sympy comparison timed out after %.1f s; restarting worker", timeout_s)
                self._stop()
                return None
            try:
                result = json.loads(reply)
            except ValueError:
                # The protocol is out of step (should not happen: the child keeps its stdout
                # for replies only); start afresh.
                self._stop()
                return None
            return result if isinstance(result, bool) else None

    def close(self) -> None:
        with self._lock:
            self._stop()


SYMPY_WORKER = SympyWorker()
atexit.register(SYMPY_WORKER.close)
