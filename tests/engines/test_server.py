"""The generation engine and the HTTP judge against a real OpenAI-compatible server: ``transformers
serve`` (the ``serving`` extra) on 127.0.0.1, started and stopped here. It serves the thinking
organism through ``/v1/completions`` and SmolLM2-135M-Instruct through ``/v1/chat/completions``,
each loaded on its first request.

- greedy traces through the server equal the bridge's, text and token ids (re-tokenised: the
  server returns text only);
- the trace stage resumes after the server is killed mid-run, nothing lost or duplicated;
- ``mechsteer taxonomy --judge http`` with the smallest settings gives a taxonomy with titles that
  SmolLM2 wrote, every request answered once (it used to hit a fixed 30 s timeout and flood the
  server with retries, then to fail on answers that echoed the prompt).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mechsteer.activations import ActivationConfig, extract_activations
from mechsteer.cli import main
from mechsteer.core.http import HTTPSettings
from mechsteer.core.models import load_model, smollm2_dir
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.data.labels import ground_truth_for
from mechsteer.data.traces import TRACES_FILE, generate_traces, read_traces
from mechsteer.engines import EngineError, OpenAIEngine, load_tokenizer
from mechsteer.organisms import weights_dir
from mechsteer.taxonomy.judge.http import ENV_API_KEY, ENV_MODEL, ENV_URL
from mechsteer.taxonomy.judge.prompts import parse_description_answer, parse_prompt
from mechsteer.taxonomy.judge.spec import JUDGE_CACHE_DIR

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 120.0
ORGANISM = "organism-thinking"
MAX_NEW_TOKENS = 288  # the organism traces end (EOS) well before this


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServeProcess:
    """``transformers serve`` in its own process group on a free loopback port."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.port = free_port()
        # One thread, as the test session runs (tests/conftest.py): OpenMP threads spin-waiting on
        # a busy 2-core machine slow small matmuls tenfold.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--device", "cpu", "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(f"transformers serve exited with {self.process.returncode} at start "
                            f"(is the serving extra installed? pip install -e '.[serving]'):\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"transformers serve did not answer /health within {STARTUP_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the whole process group (the server and anything it started); SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        self.process = None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def count(self, endpoint: str) -> int:
        """Requests the server logged as answered at ``endpoint``."""
        return len(re.findall(rf'"POST /v1/{endpoint} HTTP/1.1" 200', self.log_path.read_text(errors="replace")))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    serve = ServeProcess(tmp_path_factory.mktemp("serve") / "server.log")
    serve.start()
    try:
        yield serve
    finally:
        serve.stop()
        assert serve.process is None


@pytest.fixture(scope="module")
def organism_bridge():
    return load_model(ORGANISM)


@pytest.fixture(scope="module")
def problems():
    return load_benchmark("organism", "train", 8)


def organism_engine(server: ServeProcess, **settings: float) -> OpenAIEngine:
    http = HTTPSettings(**{"timeout": 120.0, "max_retries": 2, "backoff": 0.2, "max_concurrency": 2, **settings})
    return OpenAIEngine(server.url, str(weights_dir("thinking")), load_tokenizer(ORGANISM), model_name=ORGANISM,
                        settings=http)


def test_greedy_traces_through_the_server_equal_the_bridges(server: ServeProcess, organism_bridge, problems,
                                                            tmp_path: Path) -> None:
    served = generate_traces(organism_engine(server), problems, tmp_path / "served", max_new_tokens=MAX_NEW_TOKENS,
                             progress=False)
    bridged = generate_traces(organism_bridge, problems, tmp_path / "bridge", max_new_tokens=MAX_NEW_TOKENS,
                              batch_size=len(problems), progress=False)
    assert server.count("completions") == len(problems)
    for mine, theirs in zip(served, bridged, strict=True):
        assert mine.text == theirs.text, mine.problem_id
        # the organism tokenizer splits text one way only, so re-tokenising gives the generated ids
        assert mine.token_ids == theirs.token_ids, mine.problem_id
        assert (mine.finish_reason, mine.prediction, mine.correct) == (theirs.finish_reason, theirs.prediction,
                                                                         theirs.correct)
        assert mine.settings["token_ids_source"] == "retokenised" and theirs.settings["engine"] == "bridge"
    assert all(trace.finish_reason == "eos" for trace in served)


def test_traces_resume_after_the_server_is_killed(server: ServeProcess, organism_bridge, tmp_path: Path) -> None:
    problems = load_benchmark("organism", "train", 10)
    out = tmp_path / "served"
    # one request at a time, so that the kill lands mid-run
    engine = organism_engine(server, max_concurrency=1, max_retries=1, backoff=0.1)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            generate_traces(engine, problems, out, max_new_tokens=MAX_NEW_TOKENS, progress=False)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            failure.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while len(read_traces(out / TRACES_FILE)) < 3 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_url = server.url
    server.stop(signal.SIGKILL)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], EngineError), failure
    assert f"generation server {killed_url}/completions" in str(failure[0])
    kept = [record.problem_id for record in read_traces(out / TRACES_FILE)]
    assert 3 <= len(kept) < len(problems)

    server.start()  # a new server, on another port: the CLI resumes through it
    code = main(["traces", "--model", ORGANISM, "--benchmark", "organism", "--split", "train", "--n",
                 str(len(problems)), "--out", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS), "--engine", "openai",
                 "--engine-url", server.url, "--engine-model", str(weights_dir("thinking")),
                 "--engine-concurrency", "2"])
    assert code == 0
    assert server.count("completions") >= len(problems) - len(kept)
    lines = [json.loads(line) for line in (out / TRACES_FILE).read_text().splitlines()]
    assert sorted(line["problem_id"] for line in lines) == sorted(p.id for p in problems)  # none lost, none twice
    assert [line["problem_id"] for line in lines[: len(kept)]] == kept  # the finished ones were kept as they were
    bridged = generate_traces(organism_bridge, problems, tmp_path / "bridge", max_new_tokens=MAX_NEW_TOKENS,
                              batch_size=len(problems), progress=False)
    by_id = {line["problem_id"]: line for line in lines}
    assert [by_id[trace.problem_id]["text"] for trace in bridged] == [trace.text for trace in bridged]


@pytest.fixture(scope="module")
def activations(organism_bridge, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("judge_run")
    problems = load_benchmark("organism", "train", 24)
    traces = generate_traces(organism_bridge, problems, folder / "traces", max_new_tokens=MAX_NEW_TOKENS,
                             batch_size=len(problems), progress=False)
    labeller = ground_truth_for("organism")
    assert labeller is not None
    extract_activations(organism_bridge, traces, folder / "activations", ActivationConfig(layers=[2], batch_size=24),
                        labeller=labeller.label_reasoning, progress=False)
    return folder / "activations"


def test_the_http_judge_against_smollm2_behind_the_server(server: ServeProcess, activations: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The run that failed in issue 16 (a fixed 30 s timeout: 17 requests sent, 3 answered; then
    every title answer echoed the prompt, "Task: describe_behaviour ...") now gives a taxonomy with
    titles: shown the prompts' worked examples, SmolLM2-135M-Instruct answers each title prompt in
    the Title/Description format and each pair-similarity prompt with a number, and every request
    is answered once (none retried or abandoned)."""
    model = str(smollm2_dir())
    monkeypatch.setenv(ENV_URL, server.url)
    monkeypatch.delenv(ENV_MODEL, raising=False)
    monkeypatch.delenv(ENV_API_KEY, raising=False)
    out = tmp_path / "taxonomy"
    n_behaviours, n_judged = 3, 3
    before = server.count("chat/completions")
    code = main(["taxonomy", "--activations", str(activations), "--layers", "2", "--n-latents", str(n_behaviours),
                 "--judge", f"http:{model}", "--n-examples", "5", "--n-repeats", "1", "--n-judged", str(n_judged),
                 "--judge-concurrency", "2", "--judge-max-tokens", "48", "--judge-timeout", "120",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # per behaviour one title prompt (one repeat), n_judged sentences in and out for consistency and
    # n_judged for completeness; one similarity prompt per pair
    expected = n_behaviours * (1 + 3 * n_judged) + n_behaviours * (n_behaviours - 1) // 2
    assert server.count("chat/completions") - before == expected, captured.err

    taxonomy = json.loads((out / "taxonomy.json").read_text())
    assert taxonomy["provenance"]["judge"] == f"HTTPJudge({model})"
    assert taxonomy["metrics"]["selection_criterion"] == "judge_final"
    behaviours = taxonomy["behaviours"]
    assert len(behaviours) == n_behaviours
    assert json.loads(captured.out.strip().splitlines()[-1])["behaviours"] == [b["title"] for b in behaviours]
    # Each title and description is the model's own answer to its title prompt, as the judge cached it
    # (only answers that parse are cached; an echo of the prompt does not parse).
    answers = {}
    for path in (out / JUDGE_CACHE_DIR).rglob("*.json"):
        record = json.loads(path.read_text())
        prompt = parse_prompt(record["messages"])
        if prompt.task == "describe_behaviour":
            answers[prompt.fields["Sentence"]] = record["response"]
    assert len(answers) == n_behaviours
    described = {parse_description_answer(answer, sentences) for sentences, answer in answers.items()}
    for behaviour in behaviours:
        assert behaviour["title"].strip() and behaviour["description"].strip()
        assert (behaviour["title"], behaviour["description"]) in described
