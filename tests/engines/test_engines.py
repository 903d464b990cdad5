"""The generation engines against a scripted /v1/completions server on 127.0.0.1: the prompt the
server receives (one BOS), the record format, stop strings and finish reasons, token ids, the
failure paths (500, hangs, refusals) and resuming after one; the run config's engine keys.
The real-server checks (``transformers serve``) are in test_server.py."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mechsteer.cli import main
from mechsteer.core.errors import ConfigError, ProvenanceError
from mechsteer.core.http import HTTPSettings
from mechsteer.core.resident import ResidentPair
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.data.prompts import render_prompt
from mechsteer.data.traces import TRACES_FILE, generate_traces, read_traces
from mechsteer.engines import (
    EngineError,
    GenerationSettings,
    OpenAIEngine,
    generate_all,
    make_engine,
)
from mechsteer.engines.openai import ENV_ENGINE_API_KEY
from mechsteer.experiment import config as config_module
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.pipeline import plain_generator
from mechsteer.experiment.settings import taxonomy_settings
from tests.engines.stub import Answer, StubServer, completion
from tests.tiny_models import char_tokenizer

SECRET = "sk-engine-SECRET-0a1b2c3d"
QUICK = HTTPSettings(timeout=5.0, max_retries=1, backoff=0.01, max_concurrency=2)


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return char_tokenizer()  # character-level, prepends <bos> (id 1); <eos> is id 2


def engine_for(stub: StubServer, tokenizer: Any, **options: Any) -> OpenAIEngine:
    options = {"settings": QUICK, "server_adds_bos": True, "model_name": "tiny", **options}
    return OpenAIEngine(stub.url, "served-model", tokenizer, **options)


def counted(tokenizer: Any, text: str, **choice: Any) -> Any:
    """A responder answering ``text`` and the prompt's token count as a server adding a BOS reads it."""
    def respond(payload: dict[str, Any]) -> Answer:
        n_prompt = len(tokenizer(payload["prompt"])["input_ids"])
        return Answer(body=completion(text, prompt_tokens=n_prompt, **choice))
    return respond


def organism_problems(n: int) -> list:
    return load_benchmark("organism", "train", n)


# ---- the prompt the server reads ----------------------------------------------------------------


@pytest.mark.parametrize("rendered", ["Q: 2 + 3?\nA:", "<bos>Q: 2 + 3?\nA:"])
@pytest.mark.parametrize("server_adds_bos", [True, False])
def test_the_server_reads_one_bos(stub: StubServer, tokenizer: Any, rendered: str, server_adds_bos: bool) -> None:
    """A plain template (no BOS in the text) or a chat template (BOS in the text): the bridge feeds
    one BOS either way, and so does the server, whether or not its tokenizer adds one itself."""
    engine = engine_for(stub, tokenizer, server_adds_bos=server_adds_bos)
    (result,) = generate_all(engine, [rendered], GenerationSettings(max_new_tokens=4))
    sent = stub.received[0].payload["prompt"]
    assert sent == ("Q: 2 + 3?\nA:" if server_adds_bos else "<bos>Q: 2 + 3?\nA:")
    assert result.prompt_token_ids[0] == tokenizer.bos_token_id
    assert result.prompt_token_ids.count(tokenizer.bos_token_id) == 1


def test_a_server_reading_another_prompt_is_refused(stub: StubServer, tokenizer: Any) -> None:
    stub.responder = lambda payload: Answer(body=completion(" 5", prompt_tokens=3))
    with pytest.raises(EngineError, match="read the prompt as 3 tokens") as error:
        generate_all(engine_for(stub, tokenizer), ["Q: 2 + 3?"], GenerationSettings(max_new_tokens=4))
    assert stub.url in str(error.value)


# ---- records ------------------------------------------------------------------------------------


def test_server_traces_keep_the_record_format(stub: StubServer, tokenizer: Any, tmp_path: Path) -> None:
    stub.responder = counted(tokenizer, " Plan: 2 + 3.\nThe answer is 5.")
    problems = organism_problems(3)
    records = generate_traces(engine_for(stub, tokenizer), problems, tmp_path, max_new_tokens=40, progress=False)
    assert [r.problem_id for r in records] == [p.id for p in problems]
    for record, problem in zip(records, problems, strict=True):
        prompt = render_prompt("organism", problem.question)
        assert record.prompt == prompt and record.text == prompt + record.generation
        assert record.generation == " Plan: 2 + 3.\nThe answer is 5."
        assert record.finish_reason == "eos"  # a plain "stop" without stop strings: the model's own EOS
        prompt_ids = tokenizer(prompt)["input_ids"]
        generated = tokenizer(record.generation, add_special_tokens=False)["input_ids"]
        assert record.token_ids == prompt_ids + generated + [tokenizer.eos_token_id]
        assert record.n_prompt_tokens == len(prompt_ids)
        assert record.model == "tiny"
        assert record.settings["engine"] == "openai" and record.settings["token_ids_source"] == "retokenised"
        assert record.settings["engine_model"] == "served-model"
    payload = stub.received[0].payload
    assert payload["model"] == "served-model" and payload["max_tokens"] == 40 and payload["temperature"] == 0.0
    assert "seed" not in payload and "stop" not in payload and "return_token_ids" not in payload
    assert stub.received[0].path == "/v1/completions"


def test_sampled_requests_carry_a_seed_per_problem(stub: StubServer, tokenizer: Any, tmp_path: Path) -> None:
    stub.responder = counted(tokenizer, " 5")
    problems = organism_problems(4)
    generate_traces(engine_for(stub, tokenizer), problems, tmp_path, max_new_tokens=4, do_sample=True,
                    temperature=0.7, top_p=0.9, seed=100, progress=False)
    by_prompt = {r.payload["prompt"]: r.payload for r in stub.received}
    for index, problem in enumerate(problems):
        payload = by_prompt[render_prompt("organism", problem.question)]
        assert (payload["temperature"], payload["top_p"], payload["seed"]) == (0.7, 0.9, 100 + index)


@pytest.mark.parametrize(
    ("answer", "stop", "text", "reason"),
    [
        # transformers serve keeps the stop string (and whatever its last token held after it)
        (completion(" 2 + 3 = 5.\nQuestion: x", "stop"), ("\nQuestion:",), " 2 + 3 = 5.\nQuestion:", "stop"),
        # vLLM drops it and says which
        (completion(" 2 + 3 = 5.", "stop", stop_reason="\nQuestion:"), ("\nQuestion:",), " 2 + 3 = 5.\nQuestion:",
         "stop"),
        # SGLang says it as matched_stop
        (completion(" 2 + 3 = 5.", "stop", matched_stop="\nQuestion:"), ("\nQuestion:",), " 2 + 3 = 5.\nQuestion:",
         "stop"),
        # stopped without a stop string: the EOS
        (completion(" 2 + 3 = 5.", "stop", stop_reason=None), ("\nQuestion:",), " 2 + 3 = 5.", "eos"),
        (completion(" 2 + 3 = 5 and", "length"), (), " 2 + 3 = 5 and", "length"),
    ],
)
def test_stop_strings_and_finish_reasons(stub: StubServer, tokenizer: Any, answer: dict, stop: tuple[str, ...],
                                         text: str, reason: str) -> None:
    stub.responder = lambda payload: Answer(body=answer)
    (result,) = generate_all(engine_for(stub, tokenizer), ["Q"], GenerationSettings(max_new_tokens=9,
                                                                                    stop_strings=stop))
    assert (result.text, result.finish_reason) == (text, reason)
    assert stub.received[0].payload.get("stop") == (list(stop) or None)
    eos = [tokenizer.eos_token_id] if reason == "eos" else []
    assert result.token_ids == tokenizer(text, add_special_tokens=False)["input_ids"] + eos


def test_an_unknown_finish_reason_is_refused(stub: StubServer, tokenizer: Any) -> None:
    stub.responder = lambda payload: Answer(body=completion(" x", "content_filter"))
    with pytest.raises(EngineError, match="finish_reason='content_filter'"):
        generate_all(engine_for(stub, tokenizer), ["Q"], GenerationSettings(max_new_tokens=2))


def test_an_answer_with_several_choices_is_refused(stub: StubServer, tokenizer: Any, tmp_path: Path) -> None:
    body = completion(" junk")
    body["choices"].append({"index": 1, "text": " 5", "finish_reason": "stop"})
    stub.responder = lambda payload: Answer(body=body)
    with pytest.raises(EngineError, match="returned 2 choices for one prompt"):
        generate_traces(engine_for(stub, tokenizer), organism_problems(1), tmp_path, max_new_tokens=2, progress=False)
    assert not (tmp_path / TRACES_FILE).exists() or (tmp_path / TRACES_FILE).read_text() == ""


@pytest.mark.parametrize("body, complaint", [
    ({**completion(" 5"), "model": "another-model"}, "answered as model 'another-model' where 'served-model' was asked"),
    ({**completion(" 5"), "model": None}, "answered without naming its model"),
    ({**completion(" 5"), "model": "served-model-2@main"}, "answered as model 'served-model-2@main'"),
    ({**completion(" 5"), "error": {"message": "upstream timed out"}}, "HTTP 200 with an error object"),
])
def test_an_answer_of_another_model_or_an_error_object_is_refused(stub: StubServer, tokenizer: Any, tmp_path: Path,
                                                                  body: dict, complaint: str) -> None:
    stub.responder = lambda payload: Answer(body=body)
    with pytest.raises(EngineError, match=complaint) as error:
        generate_traces(engine_for(stub, tokenizer), organism_problems(1), tmp_path, max_new_tokens=2, progress=False)
    assert f"generation server {stub.url}/completions" in str(error.value)
    assert read_traces(tmp_path / TRACES_FILE) == []


def test_transformers_serves_model_at_revision_is_the_model_asked_for(stub: StubServer, tokenizer: Any) -> None:
    stub.responder = lambda payload: Answer(body={**completion(" 5"), "model": payload["model"] + "@main"})
    (result,) = generate_all(engine_for(stub, tokenizer), ["Q: 2 + 3?"], GenerationSettings(max_new_tokens=2))
    assert result.text == " 5"


@pytest.mark.parametrize("sent_back", ["as sent", "as rendered"])
def test_a_completion_echoing_the_prompt_is_refused(stub: StubServer, tokenizer: Any, tmp_path: Path,
                                                    sent_back: str) -> None:
    problem = organism_problems(1)[0]
    rendered = render_prompt("organism", problem.question)
    stub.responder = lambda payload: Answer(body=completion(
        (payload["prompt"] if sent_back == "as sent" else "<bos>" + rendered) + " The answer is 5."))
    with pytest.raises(EngineError, match="starts with the prompt") as error:
        generate_traces(engine_for(stub, tokenizer), [problem], tmp_path, max_new_tokens=2, progress=False)
    assert stub.url in str(error.value)
    assert read_traces(tmp_path / TRACES_FILE) == []


def test_credentials_in_the_url_are_sent_but_never_printed(stub: StubServer, tokenizer: Any) -> None:
    port_url = stub.url.replace("http://", "http://probe:hunter2@")
    stub.responder = lambda payload: Answer(500, body="no luck for probe:hunter2")
    engine = OpenAIEngine(port_url, "served-model", tokenizer, settings=QUICK, server_adds_bos=True)
    with pytest.raises(EngineError) as error:
        generate_all(engine, ["Q"], GenerationSettings(max_new_tokens=2))
    assert stub.received[0].headers["Authorization"].startswith("Basic ")  # httpx sends them as basic auth
    for shown in (str(error.value), repr(engine), engine.url):
        assert "hunter2" not in shown and "probe:" not in shown
    assert f"generation server {stub.url}/completions" in str(error.value)
    with pytest.raises(ConfigError) as refused:
        OpenAIEngine("ftp://probe:hunter2@host/v1", "m", tokenizer)
    assert "hunter2" not in str(refused.value)


def test_the_servers_token_ids_when_asked_for(stub: StubServer, tokenizer: Any) -> None:
    prompt_ids = tokenizer("Q")["input_ids"]
    stub.responder = lambda payload: Answer(body=completion(" ab", token_ids=[70, 71, 2], prompt_token_ids=prompt_ids))
    engine = engine_for(stub, tokenizer, return_token_ids=True)
    (result,) = generate_all(engine, ["Q"], GenerationSettings(max_new_tokens=3))
    assert result.token_ids == [70, 71, 2] and result.token_ids_source == "generated"
    assert stub.received[0].payload["return_token_ids"] is True
    assert engine.record_settings()["token_ids_source"] == "generated"

    stub.responder = lambda payload: Answer(body=completion(" ab", token_ids=[70], prompt_token_ids=[1, 99]))
    with pytest.raises(EngineError, match="other token ids"):
        generate_all(engine, ["Q"], GenerationSettings(max_new_tokens=3))
    stub.responder = lambda payload: Answer(body=completion(" ab"))
    with pytest.raises(EngineError, match="engine_return_token_ids false"):
        generate_all(engine, ["Q"], GenerationSettings(max_new_tokens=3))


# ---- failures -------------------------------------------------------------------------------------


def test_a_server_answering_500_is_a_clear_error(stub: StubServer, tokenizer: Any, tmp_path: Path) -> None:
    stub.responder = lambda payload: Answer(500, body="internal error")
    with pytest.raises(EngineError, match="failed 2 attempts") as error:
        generate_traces(engine_for(stub, tokenizer), organism_problems(2), tmp_path, max_new_tokens=4, progress=False)
    assert f"generation server {stub.url}/completions" in str(error.value)
    assert "HTTP 500: internal error" in str(error.value)
    assert len(stub.received) == 4  # two problems, two attempts each
    assert read_traces(tmp_path / TRACES_FILE) == []


def test_a_hanging_server_is_a_clear_error(stub: StubServer, tokenizer: Any) -> None:
    stub.responder = lambda payload: Answer(delay=3.0)
    settings = HTTPSettings(timeout=0.2, max_retries=1, backoff=0.01, max_concurrency=1)
    with pytest.raises(EngineError, match="timed out after 0.4 s") as error:  # the retry waits twice as long
        generate_all(engine_for(stub, tokenizer, settings=settings), ["Q"], GenerationSettings(max_new_tokens=2))
    assert stub.url in str(error.value) and "failed 2 attempts" in str(error.value)
    assert len(stub.received) == 2


def test_a_refused_request_is_not_retried(stub: StubServer, tokenizer: Any) -> None:
    stub.responder = lambda payload: Answer(422, body='{"detail": "Unexpected fields"}')
    with pytest.raises(EngineError, match="HTTP 422 \\(not retried\\)"):
        generate_all(engine_for(stub, tokenizer), ["Q"], GenerationSettings(max_new_tokens=2))
    assert len(stub.received) == 1


def test_finished_problems_survive_a_failure_and_the_rerun_resumes(stub: StubServer, tokenizer: Any,
                                                                   tmp_path: Path) -> None:
    problems = organism_problems(6)
    doomed = render_prompt("organism", problems[2].question)
    healthy = counted(tokenizer, " The answer is 5.")
    stub.responder = lambda payload: Answer(500, body="down") if payload["prompt"] == doomed else healthy(payload)
    engine = engine_for(stub, tokenizer)
    with pytest.raises(EngineError, match="HTTP 500"):
        generate_traces(engine, problems, tmp_path, max_new_tokens=8, progress=False)
    kept = {r.problem_id for r in read_traces(tmp_path / TRACES_FILE)}
    assert problems[2].id not in kept
    assert kept <= {p.id for p in problems}

    stub.responder = healthy
    before = len(stub.received)
    records = generate_traces(engine, problems, tmp_path, max_new_tokens=8, progress=False)
    assert [r.problem_id for r in records] == [p.id for p in problems]
    lines = (tmp_path / TRACES_FILE).read_text().splitlines()
    assert sorted(json.loads(line)["problem_id"] for line in lines) == sorted(p.id for p in problems)  # no duplicate
    assert len(stub.received) - before == len(problems) - len(kept)  # only the missing ones asked again


def test_bridge_traces_are_not_resumed_through_a_server(stub: StubServer, tokenizer: Any, tmp_path: Path) -> None:
    problems = organism_problems(2)
    (tmp_path / TRACES_FILE).write_text("")
    stub.responder = counted(tokenizer, " 5")
    generate_traces(engine_for(stub, tokenizer), problems[:1], tmp_path, max_new_tokens=2, progress=False)
    line = json.loads((tmp_path / TRACES_FILE).read_text())
    line["settings"] = {k: v for k, v in line["settings"].items() if k not in ("engine", "engine_model")}
    (tmp_path / TRACES_FILE).write_text(json.dumps(line) + "\n")  # as the bridge wrote traces before engines
    with pytest.raises(ProvenanceError, match="made with engine 'bridge', but 'openai'"):
        generate_traces(engine_for(stub, tokenizer), problems, tmp_path, max_new_tokens=2, progress=False)


def test_the_api_key_is_never_logged_or_stored(stub: StubServer, tokenizer: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(ENV_ENGINE_API_KEY, SECRET)
    engine = engine_for(stub, tokenizer)
    stub.responder = counted(tokenizer, " 5")
    generate_traces(engine, organism_problems(2), tmp_path, max_new_tokens=2, progress=False)
    assert all(r.headers["Authorization"] == f"Bearer {SECRET}" for r in stub.received)
    # a server echoing the key in an error is redacted
    stub.responder = lambda payload: Answer(500, body=f"bad key {SECRET}")
    with pytest.raises(EngineError) as error:
        generate_all(engine, ["Q"], GenerationSettings(max_new_tokens=2))
    assert "<redacted>" in str(error.value)
    # a server echoing the key in a completion: the trace records it redacted
    stub.responder = lambda payload: Answer(body=completion(f" the key is {SECRET}. The answer is 5."))
    echoed = tmp_path / "echoed"
    [record] = generate_traces(engine, organism_problems(1), echoed, max_new_tokens=2, progress=False)
    assert "<redacted>" in record.generation
    texts = [repr(engine), str(error.value), caplog.text, (tmp_path / TRACES_FILE).read_text(),
             json.dumps(engine.record_settings()), (echoed / TRACES_FILE).read_text()]
    assert any("mechsteer.core.http" == r.name for r in caplog.records)
    assert all(SECRET not in text for text in texts)


def test_traces_cli_through_a_server(stub: StubServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stub.responder = lambda payload: Answer(body=completion(" Plan: 1 + 1.\nThe answer is 2."))
    out = tmp_path / "traces"
    code = main(["traces", "--model", "organism-thinking", "--benchmark", "organism", "--split", "train",
                 "--n", "3", "--out", str(out), "--max-new-tokens", "16", "--engine", "openai",
                 "--engine-url", stub.url, "--engine-concurrency", "2", "--engine-max-retries", "0",
                 "--engine-timeout", "30"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3
    records = read_traces(out / TRACES_FILE)
    assert {r.model for r in records} == {"organism-thinking"}
    assert {r.payload["model"] for r in stub.received} == {"organism-thinking"}  # --engine-model defaults to --model
    assert all(r.settings["engine"] == "openai" for r in records)
    # the organism tokenizer adds its BOS, as its server would: the text goes without one
    assert not stub.received[0].payload["prompt"].startswith("<bos>")
    assert main(["traces", "--model", "organism-thinking", "--benchmark", "organism", "--split", "train", "--n", "3",
                 "--out", str(out), "--engine", "openai"]) != 0  # no --engine-url
    assert "needs --engine-url" in capsys.readouterr().err


# ---- the run config -------------------------------------------------------------------------------


def test_engine_keys_leave_existing_digests_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    digested: list[dict] = []
    monkeypatch.setattr(config_module, "json_digest", lambda value: digested.append(value) or "digest")
    DEMO_CONFIG.digest()
    assert not [key for key in digested[0] if key.startswith("engine")]  # at their defaults: not digested
    monkeypatch.undo()
    base = DEMO_CONFIG.digest()
    moved = dataclasses.replace(DEMO_CONFIG, engine_url="http://127.0.0.1:9/v1", engine_timeout=30.0,
                                engine_max_concurrency=2, engine_max_retries=0, engine_url_base="http://h:1/v1")
    assert moved.digest() == base  # how the server is reached is not what the run computes
    served = dataclasses.replace(moved, engine="openai")
    assert served.digest() != base
    assert dataclasses.replace(served, engine_model_thinking="other").digest() != served.digest()


def test_engine_openai_needs_a_url() -> None:
    data = {**{f.name: getattr(DEMO_CONFIG, f.name) for f in dataclasses.fields(RunConfig)}, "engine": "openai"}
    with pytest.raises(ConfigError, match="engine_url"):
        RunConfig.from_dict(data)
    with pytest.raises(ConfigError, match="engine"):
        RunConfig.from_dict({**data, "engine": "vllm", "engine_url": "http://x/v1"})
    with pytest.raises(ConfigError, match="engine"):
        make_engine("openai", tokenizer=char_tokenizer(), server_model="m")  # no URL


def test_a_run_asks_the_server_without_loading_the_model() -> None:
    config = dataclasses.replace(DEMO_CONFIG, engine="openai", engine_url="http://127.0.0.1:9/v1",
                                 engine_url_base="http://127.0.0.1:8/v1", engine_model_thinking="served-thinking",
                                 engine_timeout=30.0, engine_max_concurrency=3)
    pair = ResidentPair(config.base_model, config.thinking_model, device="cpu")
    thinking = plain_generator(config, pair, "thinking")
    base = plain_generator(config, pair, "base")
    assert isinstance(thinking, OpenAIEngine) and isinstance(base, OpenAIEngine)
    assert (thinking.url, thinking.server_model, thinking.model_name) == (
        "http://127.0.0.1:9/v1/completions", "served-thinking", DEMO_CONFIG.thinking_model)
    assert (base.url, base.server_model, base.model_name) == (
        "http://127.0.0.1:8/v1/completions", DEMO_CONFIG.base_model, DEMO_CONFIG.base_model)
    assert (thinking.http.settings.timeout, thinking.http.settings.max_concurrency) == (30.0, 3)
    assert pair.loads == []  # only the tokenizers
    bridge = plain_generator(DEMO_CONFIG, pair, "thinking")
    assert not isinstance(bridge, OpenAIEngine) and pair.loads == ["thinking"]


def test_the_judge_keys_reach_the_taxonomy_stage_and_only_max_tokens_is_digested(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    timeout_default = next(f.default for f in dataclasses.fields(RunConfig) if f.name == "judge_timeout")
    assert timeout_default == HTTPSettings().timeout  # the HTTP judge's own default
    digested: list[dict] = []
    monkeypatch.setattr(config_module, "json_digest", lambda value: digested.append(value) or "digest")
    DEMO_CONFIG.digest()
    assert not [key for key in digested[0] if key.startswith("judge_")]  # at their defaults: not digested
    monkeypatch.undo()
    base = DEMO_CONFIG.digest()
    assert dataclasses.replace(DEMO_CONFIG, judge_timeout=600.0).digest() == base  # patience, not answers
    assert dataclasses.replace(DEMO_CONFIG, judge_max_tokens=48).digest() != base  # shorter answers
    data = {f.name: getattr(DEMO_CONFIG, f.name) for f in dataclasses.fields(RunConfig)}
    with pytest.raises(ConfigError, match="judge_max_tokens"):
        RunConfig.from_dict({**data, "judge_max_tokens": 0})
    with pytest.raises(ConfigError, match="judge_timeout"):
        RunConfig.from_dict({**data, "judge_timeout": 0.0})

    # the run's taxonomy stage builds its settings with settings.taxonomy_settings
    config = RunConfig.from_dict({**data, "judge": "http:served-judge", "judge_timeout": 45.0, "judge_max_tokens": 48})
    settings = taxonomy_settings(config, [2])
    assert (settings.judge, settings.layers) == ("http:served-judge", (2,))
    assert (settings.judge_settings.timeout, settings.judge_settings.max_tokens) == (45.0, 48)


def test_ctrl_c_during_hung_requests_exits_at_once(stub: StubServer, tmp_path: Path) -> None:
    """SIGINT while every request hangs: the requests are dropped, none is retried, exit 130 within 5 s."""
    import os
    import signal
    import subprocess
    import sys
    import time

    stub.responder = lambda payload: Answer(delay=300.0)  # never answers in time
    root = Path(__file__).resolve().parents[2]
    # PYTHONFAULTHANDLER: a child that does not exit is sent SIGABRT, which prints every thread's stack
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mechsteer.cli", "traces", "--model", "organism-thinking", "--benchmark", "organism",
         "--split", "train", "--n", "4", "--out", str(tmp_path / "traces"), "--max-new-tokens", "8",
         "--engine", "openai", "--engine-url", stub.url, "--engine-timeout", "120", "--engine-max-retries", "3",
         "--engine-concurrency", "2"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        waited = time.monotonic()
        while len(stub.received) < 2 and process.poll() is None and time.monotonic() - waited < 120:
            time.sleep(0.1)
        assert len(stub.received) == 2, process.communicate(timeout=5)
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            pytest.fail("the command did not exit within 30 s of SIGINT; its threads:\n" + process.communicate()[1][-6000:])
        assert time.monotonic() - interrupted < 5.0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "mechsteer: interrupted" in err and "Traceback" not in err
    assert len(stub.received) == 2  # nothing retried, nothing started after the interruption


def test_server_traces_are_written_in_problem_order_whatever_the_arrival(stub: StubServer, tokenizer: Any,
                                                                         tmp_path: Path) -> None:
    """The later a problem, the sooner the server answers it: the file is still in problem order, the
    same bytes as a second run's, and so is a file resumed after a failure."""
    problems = organism_problems(5)
    order = {render_prompt("organism", p.question): index for index, p in enumerate(problems)}

    def reversed_answers(payload: dict[str, Any]) -> Answer:
        index = order[payload["prompt"]]
        return Answer(body=completion(f" The answer is {index}.", prompt_tokens=len(tokenizer(payload["prompt"])
                                                                                    ["input_ids"])),
                      delay=0.15 * (len(problems) - index))

    stub.responder = reversed_answers
    settings = dataclasses.replace(QUICK, max_concurrency=len(problems))
    files = []
    for run in ("first", "second"):
        generate_traces(engine_for(stub, tokenizer, settings=settings), problems, tmp_path / run, max_new_tokens=8,
                        progress=False)
        files.append((tmp_path / run / TRACES_FILE).read_text())
    assert [json.loads(line)["problem_id"] for line in files[0].splitlines()] == [p.id for p in problems]
    assert files[0] == files[1]
    doomed = render_prompt("organism", problems[1].question)
    stub.responder = lambda payload: Answer(500, body="down") if payload["prompt"] == doomed else reversed_answers(
        payload)
    with pytest.raises(EngineError):
        generate_traces(engine_for(stub, tokenizer, settings=settings), problems, tmp_path / "resumed",
                        max_new_tokens=8, progress=False)
    kept = [json.loads(line)["problem_id"] for line in (tmp_path / "resumed" / TRACES_FILE).read_text().splitlines()]
    assert problems[1].id not in kept and len(kept) == len(problems) - 1  # finished work kept
    stub.responder = reversed_answers
    generate_traces(engine_for(stub, tokenizer, settings=settings), problems, tmp_path / "resumed", max_new_tokens=8,
                    progress=False)
    assert (tmp_path / "resumed" / TRACES_FILE).read_text() == files[0]
