"""A run through a server is as reproducible as a bridge run (issue 25): two runs of one config against a
deterministic server (tests.engines.model_server: the organism models' own greedy completions) write the
same report.json, timings aside, and a run SIGKILLed while its traces stream in resumes to the same."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from mechsteer.core.models import load_model
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.data.prompts import render_prompt
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.pipeline import run_pipeline
from tests.engines.model_server import ModelServer
from tests.engines.stub import Answer
from tests.experiment.test_pipeline import REPO, comparable

SERVED = dict(name="served", base_model="organism-base", thinking_model="organism-thinking", benchmark="organism",
              n_train=30, n_eval=20, max_new_tokens=288, batch_size=25, n_latents=[4], normalise=[True],
              judge="oracle", threads=1, direction_method="mean", coefficients=[2.0], ablations=False,
              controls=[], baselines=[], engine="openai", engine_max_retries=0)


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def server():
    server = ModelServer({name: load_model(name, device="cpu") for name in (SERVED["base_model"],
                                                                             SERVED["thinking_model"])})
    config = RunConfig.from_dict({**SERVED, "engine_url": server.url})
    problems = [*load_benchmark(config.benchmark, config.train_split, config.n_train),
                *load_benchmark(config.benchmark, config.eval_split, config.n_eval)]
    for model, template in ((config.base_model, config.resolved_base_template),
                            (config.thinking_model, config.resolved_thinking_template)):
        # what the runs will ask, generated in one batch up front (one by one in the server is slower)
        server.prefill(model, [render_prompt(template, problem.question) for problem in problems], config.max_new_tokens)
    yield server
    server.close()


@pytest.fixture(scope="module")
def served_run(server, tmp_path_factory):
    """(config, report) of one uninterrupted run through the server."""
    config = RunConfig.from_dict({**SERVED, "engine_url": server.url})
    return config, run_pipeline(config, tmp_path_factory.mktemp("served") / "run", log=quiet)


def test_two_runs_through_a_deterministic_server_report_the_same(server, served_run, tmp_path):
    config, report = served_run
    answers = len(server.answers)
    assert comparable(run_pipeline(config, tmp_path / "again", log=quiet)) == comparable(report)
    assert len(server.answers) == answers  # every prompt was one the first run asked


KILLED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from mechsteer.experiment.config import RunConfig
    from mechsteer.experiment.pipeline import run_pipeline
    run_pipeline(RunConfig.from_dict({config!r}), {out!r}, log=lambda message: None)
""")


def test_a_served_run_killed_mid_traces_resumes_to_the_same_report(server, served_run, tmp_path):
    config, report = served_run
    answered, release = [], threading.Event()

    def answer_some_then_hang(payload: dict[str, Any]) -> Answer:
        answered.append(1)
        if len(answered) > 10:  # the first traces are written; the rest wait for the kill
            release.wait(120)
        return server.answer(payload)

    out = tmp_path / "killed"
    server.responder = answer_some_then_hang
    process = subprocess.Popen([sys.executable, "-c", KILLED.format(repo=str(REPO), config={**SERVED,
                                "engine_url": server.url}, out=str(out))], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        waited = time.monotonic()
        while len(answered) <= 12 and process.poll() is None and time.monotonic() - waited < 120:
            time.sleep(0.05)
        time.sleep(0.5)  # the answered ones reach the file
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=30)
    finally:
        release.set()
        server.responder = server.answer
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    assert not json.loads((out / "stages.json").read_text())["stages"]  # killed in its first stage, the thinking
    # model's train traces
    written = (out / "traces" / "thinking_train" / "traces.jsonl").read_text().splitlines()
    assert 0 < len(written) < config.n_train
    assert comparable(run_pipeline(config, out, log=quiet)) == comparable(report)
