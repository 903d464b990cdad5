"""Faults a probe found (issue 25), each refused in one line before anything runs: a sweep name
that is a path, evaluating on the train split, a layer listed twice, seeds numpy cannot take, a
stage record that is not one, and two runs writing one folder at once."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from mechsteer.core.errors import ArtefactError, ConfigError, ProvenanceError
from mechsteer.core.store import exclusive_folder
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.pipeline import run_pipeline
from mechsteer.experiment.state import RunState, validate_for
from mechsteer.experiment.sweep import SweepSpec
from tests.experiment.conftest import SHORT_RUN

DEMO = {key: value for key, value in dataclasses.asdict(DEMO_CONFIG).items()}


@pytest.mark.parametrize("name", ["../../../x", "/tmp/elsewhere", "a/b", ".hidden", "..", ""])
def test_a_sweep_name_that_is_a_path_is_refused(name):
    with pytest.raises(ConfigError, match="is not a plain name"):
        SweepSpec.from_dict({"name": name, "base": DEMO, "grid": {"seed": [0, 1]}})
    assert SweepSpec.from_dict({"name": "seeds-v1.2_a", "base": DEMO, "grid": {"seed": [0, 1]}}).name == "seeds-v1.2_a"


@pytest.mark.parametrize("change, message", [
    ({"eval_split": "train"}, r"eval_split = 'train' is the train_split"),
    ({"activation_layers": [1, 1]}, r"names a layer twice"),
    ({"seed": -1}, r"seed = -1 must be >= 0"),
    ({"seed": 2**40}, r"seed = 1099511627776 must be <= 4294967295"),
    # counts against the declared sizes of their splits (mechsteer.data.benchmarks.benchmark_size)
    ({"n_tune": 403}, r"n_tune = 403 is more than the 402 problems of organism/validation \(tune_split\); use at most 402"),
    ({"n_eval": 401}, r"n_eval = 401 is more than the 400 problems of organism/test \(eval_split\)"),
    ({"n_train": 2604}, r"n_train = 2604 is more than the 2603 problems of organism/train \(train_split\)"),
    ({"ablation_contexts": 401}, r"ablation_contexts = 401 is more than the 400 problems of organism/test"),
])
def test_values_later_stages_would_choke_on_are_refused_up_front(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({**DEMO, **change})
    with pytest.raises(ConfigError, match=message):
        run_pipeline(dataclasses.replace(DEMO_CONFIG, **change), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ["{}", "[]", '{"stages": [], "config": {}}'])
def test_a_stage_record_that_is_not_one_is_refused_naming_the_file(content, tmp_path):
    (tmp_path / "stages.json").write_text(content)
    with pytest.raises(ConfigError, match=r"stages.json is not a run's stage record"):
        RunState(tmp_path, DEMO_CONFIG)


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with exclusive_folder(out):
        with pytest.raises(ConfigError, match=rf"{out} is in use by another mechsteer run \(PID {os.getpid()}\)"):
            run_pipeline(DEMO_CONFIG, out)
    # another process holding it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"handle = open({str(out / '.lock')!r}, 'a+'); fcntl.flock(handle, fcntl.LOCK_EX)\n"
         "handle.seek(0); handle.truncate(); handle.write(str(os.getpid())); handle.flush()\n"
         "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"PID {holder.pid}\)"):
            with exclusive_folder(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_folder(out):  # free again once the holder is gone
        RunState(out, DEMO_CONFIG)
    assert json.loads((out / "stages.json").read_text())["stages"] == {}


def test_resumed_traces_compare_every_setting_and_problem(tmp_path):
    """A traces folder resumed with another top_p (recorded or defaulted), or for another split, is refused."""
    from mechsteer.core.errors import ArtefactError, ProvenanceError
    from mechsteer.core.models import load_model
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.data.traces import generate_traces

    model = load_model("organism-thinking")
    train = load_benchmark("organism", "train", 2)
    generate_traces(model, train, tmp_path, max_new_tokens=8, progress=False)  # no top_p recorded
    with pytest.raises(ProvenanceError, match="generation setting top_p"):
        generate_traces(model, train, tmp_path, max_new_tokens=8, top_p=0.9, progress=False)
    sampled = tmp_path / "sampled"
    generate_traces(model, train, sampled, max_new_tokens=8, top_p=0.9, progress=False)
    with pytest.raises(ProvenanceError, match="generation setting top_p"):
        generate_traces(model, train, sampled, max_new_tokens=8, progress=False)  # top_p left at its default
    with pytest.raises(ArtefactError, match=r"holds 2 trace\(s\) of problems this run does not ask for"):
        generate_traces(model, load_benchmark("organism", "validation", 2), tmp_path, max_new_tokens=8, progress=False)


def test_a_server_that_drips_its_answer_is_cut_off_at_the_deadline():
    """httpx's read timeout restarts at every byte; the client's deadline covers the whole answer."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mechsteer.core.http import HTTPRequestError, HTTPSettings, JSONClient

    class Drip(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the handler's own name
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"choices": []}' + b" " * 200
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for byte in body:  # one byte every 50 ms: 10 s in all
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = JSONClient(f"http://127.0.0.1:{server.server_port}/v1/completions",
                            settings=HTTPSettings(timeout=1.0, max_retries=0))
        started = time.monotonic()
        with pytest.raises(HTTPRequestError, match=r"timed out after 1 s \(AnswerTooSlow\)"):
            client.post({"prompt": "x"})
        assert time.monotonic() - started < 3.0
    finally:
        server.shutdown()


def test_partial_results_are_resumed_only_under_the_inputs_that_wrote_them(tmp_path):
    """A stage's streamed records survive a crash and are resumed; after stages.json is deleted, or a
    config change accepted since, they are cleared instead of being kept as results of the new run."""
    config = dataclasses.replace(DEMO_CONFIG, device="cpu")
    results = tmp_path / "eval" / "hybrid" / "results.jsonl"
    seen = []

    def crashing_body():
        seen.append(results.read_text() if results.exists() else None)
        results.parent.mkdir(parents=True, exist_ok=True)
        with results.open("a") as handle:
            handle.write('{"problem_id": "p0"}\n')
        raise KeyboardInterrupt  # killed mid-stage

    state = RunState(tmp_path, config)
    state.run("traces_thinking_train", lambda: {}, lambda message: None)
    with pytest.raises(KeyboardInterrupt):
        state.run("eval_hybrid", crashing_body, lambda message: None)
    with pytest.raises(KeyboardInterrupt):  # the same run resumed: the partial records are kept
        RunState(tmp_path, config).run("eval_hybrid", crashing_body, lambda message: None)
    assert seen == [None, '{"problem_id": "p0"}\n']
    changed = dataclasses.replace(config, hybrid_max_new_tokens=64)  # accepted: no finished stage reads it
    with pytest.raises(KeyboardInterrupt):
        RunState(tmp_path, changed).run("eval_hybrid", crashing_body, lambda message: None)
    assert seen[-1] is None  # cleared: written under the other config
    (tmp_path / "stages.json").unlink()
    with pytest.raises(KeyboardInterrupt):
        RunState(tmp_path, changed).run("eval_hybrid", crashing_body, lambda message: None)
    assert seen[-1] is None  # cleared: nothing says what wrote it


BILLION_LAUGHS = "\n".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]"]
    + [f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]" for level in range(1, 9)])


@pytest.mark.parametrize("kind", ["config", "sweep"])
def test_a_yaml_alias_bomb_is_refused_in_one_line(kind, tmp_path):
    """yaml.safe_load shares aliased nodes, so the file loads; whatever walks it then expands 9**9 items."""
    import time

    from mechsteer.experiment.config import read_yaml_mapping

    path = tmp_path / f"{kind}.yaml"
    path.write_text(f"name: bomb\n{BILLION_LAUGHS}\nbase_stop_strings: *l8\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_yaml(path) if kind == "config" else SweepSpec.from_yaml(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "alias *l0 refused" in message
    assert time.monotonic() - started < 2.0
    path.write_text("name: plain\nbase_model: a\n")  # a file without aliases reads as before
    assert read_yaml_mapping(path, kind) == {"name": "plain", "base_model": "a"}


def test_a_lone_surrogate_in_a_question_or_a_trace_is_one_line_naming_the_problem(tmp_path, monkeypatch):
    from mechsteer.core.errors import ArtefactError
    from mechsteer.data import benchmarks
    from mechsteer.data.benchmarks import PluginBenchmark, Problem, load_benchmark
    from mechsteer.data.traces import read_traces

    def load(split):
        return [Problem(f"odd-{index}", "How many \ud800 apples?" if index == 1 else "How many?", "3", None, "odd",
                        {"source": "test"}) for index in range(3)]

    monkeypatch.setitem(benchmarks._PLUGIN_BENCHMARKS, "odd", PluginBenchmark("odd", ("test",), load))
    assert len(load_benchmark("odd", "test", 1)) == 1  # the problems asked for are fine
    with pytest.raises(ArtefactError, match=r"benchmark 'odd'/test, problem 'odd-1': its question holds a lone "
                                            r"surrogate at character 9"):
        load_benchmark("odd", "test", 3)
    model_traces = tmp_path / "traces.jsonl"
    record = {"problem_id": "p-7", "benchmark": "organism", "prompt": "Q: \ud800?", "text": "Q: \ud800? 3",
              "generation": " 3", "reasoning": "3", "answer_part": "3", "reasoning_char_start": 6,
              "reasoning_char_end": 7, "token_ids": [], "n_prompt_tokens": 0, "prediction": "3", "reference": "3",
              "correct": True, "finish_reason": "eos", "model": "m", "settings": {}}
    model_traces.write_text(json.dumps(record) + "\n")  # json escapes it as \ud800: the file is valid UTF-8
    with pytest.raises(ArtefactError, match=r"traces.jsonl, line 1 \(problem 'p-7'\): its prompt holds a lone"):
        read_traces(model_traces)


def test_an_http_judge_is_needed_only_while_the_taxonomy_is_to_be_built(tmp_path, monkeypatch):
    """The judge's address is checked up front for a folder that has the taxonomy still to build, and not
    asked of a folder whose taxonomy is finished (resuming it elsewhere needs no judge)."""
    for name in ("MECHSTEER_JUDGE_URL", "OPENAI_BASE_URL", "MECHSTEER_JUDGE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    config = RunConfig.from_dict({**SHORT_RUN, "judge": "http:m"})
    with pytest.raises(ConfigError, match="judge 'http:m' needs the server's address"):
        validate_for(config, tmp_path / "new")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "stages.json").write_text(json.dumps({"config": {}, "stages": {"taxonomy": {"summary": {}}}}))
    validate_for(config, finished)


def _writes(stage_folder, name: str, text: str):
    def body():
        stage_folder.mkdir(parents=True, exist_ok=True)
        (stage_folder / name).write_text(text)
        return {"wrote": text}
    return body


def test_a_stage_reads_only_the_files_its_upstream_stages_wrote(tmp_path):
    """Each finished stage records its files' digests; a stage that reads a folder whose files changed
    since (another run's folder copied in, an edit) is refused, naming the folder and the files."""
    config = dataclasses.replace(DEMO_CONFIG, device="cpu")
    quiet = lambda message: None  # noqa: E731
    state = RunState(tmp_path, config)
    state.run("taxonomy", _writes(tmp_path / "taxonomy", "taxonomy.json", "mine"), quiet)
    state.run("directions", _writes(tmp_path / "directions", "directions.json", "mine"), quiet)
    (tmp_path / "taxonomy" / "metrics_vs_k.png").write_bytes(b"redrawn by mechsteer report")  # plots don't count
    RunState(tmp_path, config).run("eval_hybrid", _writes(tmp_path / "eval" / "hybrid", "results.jsonl", "1"), quiet)
    (tmp_path / "directions" / "directions.json").write_text("another run's")
    (tmp_path / "directions" / "extra.safetensors").write_bytes(b"")
    with pytest.raises(ProvenanceError, match=r"directions is not what the 'directions' stage wrote \(changed: "
                                              r"directions.json; added: extra.safetensors\)"):
        RunState(tmp_path, config).run("ablations", lambda: {}, quiet)


def test_a_stage_made_again_makes_the_stages_that_read_it_again(tmp_path):
    """Deleting one stage's entry rebuilds it, and every finished stage that read its old files (and
    what read those) is done again: nothing computed from the old files stays in the results."""
    config = dataclasses.replace(DEMO_CONFIG, device="cpu")
    quiet = lambda message: None  # noqa: E731
    state = RunState(tmp_path, config)
    for stage, folder in (("traces_base_train", "traces/base_train"), ("activations", "activations"),
                          ("taxonomy", "taxonomy"), ("directions", "directions"), ("eval_base", "eval/base"),
                          ("eval_hybrid", "eval/hybrid"), ("eval_random_firing", "eval/random_firing")):
        state.run(stage, _writes(tmp_path / folder, "out.json", "old"), quiet)
    record = json.loads((tmp_path / "stages.json").read_text())
    del record["stages"]["taxonomy"]
    (tmp_path / "stages.json").write_text(json.dumps(record))
    state = RunState(tmp_path, config)
    state.run("taxonomy", _writes(tmp_path / "taxonomy", "out.json", "new"), quiet)
    assert [stage for stage in ("traces_base_train", "activations", "eval_base") if state.done(stage)] == \
        ["traces_base_train", "activations", "eval_base"]  # upstream or unrelated: kept
    assert not any(state.done(stage) for stage in ("directions", "eval_hybrid", "eval_random_firing"))


def test_directions_of_another_layer_are_refused_by_the_hybrid(short_run, tmp_path):
    """A folder written before file digests were recorded still has its artefacts checked by what they
    are: directions at another layer than the run steers are refused, naming the key."""
    import shutil

    out, _ = short_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    record = json.loads((copy / "stages.json").read_text())
    for entry in record["stages"].values():
        entry.pop("outputs", None)  # as written before digests existed
    del record["stages"]["eval_hybrid"]
    (copy / "stages.json").write_text(json.dumps(record))
    metadata = json.loads((copy / "directions" / "directions.json").read_text())
    metadata["layer"] += 1
    (copy / "directions" / "directions.json").write_text(json.dumps(metadata))
    with pytest.raises(ProvenanceError, match=r"holds directions at the base model's layer \d, but this run steers "
                                              r"at layer \d \(steer_layer\)"):
        run_pipeline(RunConfig.from_dict(SHORT_RUN), copy, log=lambda message: None)


def test_a_comparison_without_the_hybrids_steering_rate_is_refused(short_run, tmp_path):
    """Random firing is matched to the hybrid's share of tokens steered: a hybrid summary without it
    is refused instead of firing at rate 0."""
    import shutil

    out, _ = short_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    record = json.loads((copy / "stages.json").read_text())
    del record["stages"]["eval_hybrid"]["summary"]["steered_fraction"]
    del record["stages"]["eval_random_firing"]
    (copy / "stages.json").write_text(json.dumps(record))
    with pytest.raises(ArtefactError, match="the eval_hybrid summary records no steered_fraction"):
        run_pipeline(RunConfig.from_dict(SHORT_RUN), copy, log=lambda message: None)
