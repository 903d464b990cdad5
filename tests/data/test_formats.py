"""The paper's prompt formats: Open-Reasoner-Zero's own template and stop, stop strings for base
runs, sampling settings, and traces cut off before their closing tag."""

import dataclasses

import pytest

from mechsteer.core.models import load_model
from mechsteer.data.benchmarks import Problem
from mechsteer.data.prompts import PromptTemplate, get_template, register_template, render_prompt
from mechsteer.data.traces import generate_traces
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.pipeline import eval_settings, trace_settings
from mechsteer.experiment.settings import run_hybrid_config


def test_orz_template_is_its_own_format_with_its_stop():
    template = get_template("orz")
    assert template.stop_strings == ("</answer>",) and template.opens_thinking and not template.chat
    prompt = render_prompt("orz", "What is $\\frac{1}{2}$ of 4?")
    assert prompt.startswith("A conversation between User and Assistant.")
    assert "This is the problem:\nWhat is $\\frac{1}{2}$ of 4?\nAssistant: <think>" in prompt
    assert prompt.endswith("Assistant: <think>")
    assert get_template("base_paper").stop_strings and not get_template("base_paper").opens_thinking
    assert get_template("thinking_chat").opens_thinking


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    register_template(PromptTemplate(name="test_opens_think", text="Q: {question}\n<think>", opens_thinking=True),
                      replace=True)
    return load_model(str(tiny_model_dirs["llama"]))


def problems(n: int = 3) -> list[Problem]:
    return [Problem(id=f"p{i}", question=f"What is {i} plus {i}?", answer=str(2 * i), solution=None,
                    benchmark="gsm8k") for i in range(n)]


def test_a_trace_cut_off_before_its_closing_tag_has_no_answer(tiny, tmp_path):
    records = generate_traces(tiny, problems(), tmp_path / "cut", template="test_opens_think", max_new_tokens=60,
                              progress=False)
    assert all("</think>" not in r.generation and r.finish_reason == "length" for r in records)
    assert all(r.prediction is None and not r.correct for r in records)
    extracted = generate_traces(tiny, problems(), tmp_path / "extract", template="test_opens_think",
                                max_new_tokens=60, unclosed="extract", progress=False)
    assert [r.generation for r in extracted] == [r.generation for r in records]
    assert any(r.prediction is not None for r in extracted)  # 60 random characters hold a digit


def test_trace_sampling_settings_are_used_and_seeded(tiny, tmp_path):
    kwargs = dict(template="test_opens_think", max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9,
                  seed=4, progress=False)
    first = generate_traces(tiny, problems(), tmp_path / "a", **kwargs)
    second = generate_traces(tiny, problems(), tmp_path / "b", **kwargs)
    greedy = generate_traces(tiny, problems(), tmp_path / "c", template="test_opens_think", max_new_tokens=12,
                             progress=False)
    assert [r.generation for r in first] == [r.generation for r in second]
    assert [r.generation for r in first] != [r.generation for r in greedy]
    assert first[0].settings["top_p"] == 0.9 and "top_p" not in greedy[0].settings


def test_run_config_stage_settings():
    config = RunConfig.from_dict({
        "name": "x", "base_model": "organism-base", "thinking_model": "organism-thinking", "benchmark": "organism",
        "max_new_tokens": 100, "trace_max_new_tokens": 50, "eval_max_new_tokens": 70, "hybrid_max_new_tokens": 90,
        "hybrid_batch_size": 3, "max_candidates_per_chunk": 5, "trace_temperature": 0.6, "trace_top_p": 0.95,
        "windows": [0, 1], "base_stop_strings": ["\nQ:"]})
    traces = trace_settings(config, "base")
    options = traces.generate_options()
    assert (options["max_new_tokens"], options["do_sample"], options["temperature"], options["top_p"]) == \
        (50, True, 0.6, 0.95)
    assert options["stop_strings"] == ("\nQ:",) and "stop_strings" not in trace_settings(config, "thinking").generate_options()
    evaluation = eval_settings(config, "thinking").generate_options()
    assert evaluation["max_new_tokens"] == 70 and "do_sample" not in evaluation  # greedy by default
    hybrid = run_hybrid_config(config, 1, 2)
    assert (hybrid.max_new_tokens, hybrid.batch_size, hybrid.max_candidates_per_chunk) == (90, 3, 5)
    assert hybrid.windows == (0, 1) and hybrid.stop_strings == ("\nQ:",)
    # the demo's own settings are untouched: one length, its batch, its template's (no) stop strings
    demo = run_hybrid_config(DEMO_CONFIG, 1, 2)
    assert (demo.max_new_tokens, demo.batch_size, demo.stop_strings) == (192, 50, ())
    assert trace_settings(DEMO_CONFIG, "base").stop_strings == ()
    gsm8k = dataclasses.replace(DEMO_CONFIG, benchmark="gsm8k", judge="none")
    assert gsm8k.resolved_base_stop_strings == get_template("base_paper").stop_strings
    minimal = {"name": "x", "base_model": "organism-base", "thinking_model": "organism-thinking", "benchmark": "organism"}
    with pytest.raises(ValueError, match="windows"):
        RunConfig.from_dict({**minimal, "windows": [-1]})
    with pytest.raises(ValueError, match="device 'cudaa' is not a device"):
        RunConfig.from_dict({**minimal, "device": "cudaa"})
    with pytest.raises(ValueError, match="dtype"):
        RunConfig.from_dict({**minimal, "dtype": "float13"})
    placed = RunConfig.from_dict({**minimal, "base_device": "cuda:0", "thinking_device": "cuda:1", "device_map": "auto"})
    assert placed.digest() == RunConfig.from_dict(minimal).digest()


def test_math500_configs_train_on_held_out_math_problems():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*math500.yaml")):
        config = RunConfig.from_yaml(path)
        assert (config.resolved_train_benchmark, config.train_split) == ("math", "train"), path.name
        assert config.benchmark == "math500"


def test_experiment_grids_follow_the_reference_code():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "experiments").glob("qwen*.yaml")) + sorted(
            (Path(__file__).resolve().parents[2] / "experiments").glob("llama*.yaml")):
        config = RunConfig.from_yaml(path)
        if "32b" in config.name:
            assert config.coefficients == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0] and config.windows == [0]
        else:
            assert config.coefficients == [round(0.1 * i, 1) for i in range(1, 11)]
            assert config.windows == [0, 1, 15, 50, 100]
        assert config.optimisation == {"batch_size": 8, "max_val_examples": 512}
        if "open-reasoner-zero" in config.name:
            assert config.resolved_thinking_template == "orz"
        if config.name.startswith("qwen2.5-14b"):
            assert 38 in (config.activation_layers or [])
        if config.name.startswith("qwen2.5-0.5b"):
            assert 8 in (config.activation_layers or [])
