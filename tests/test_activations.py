"""Traces -> sentences -> pooled activations on tiny models: exact spans, pooling, resumption."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from mechsteer.activations import (
    ActivationConfig,
    Manifest,
    extract_activations,
    iter_shards,
    load_sentence_vectors,
    read_sentences,
    trace_sentences,
)
from mechsteer.data.benchmarks import Problem
from mechsteer.data.traces import TraceRecord, generate_traces, load_traces

SENTENCE_POOL = [
    "First we add the two numbers.",
    "Check: the sum is right.",
    "Wait, that is not what we want!",
    "So the total is 3.14 units.",
    "Then we subtract five from it.",
]


def synthetic_trace(index: int, n_sentences: int = 6) -> TraceRecord:
    """A trace whose reasoning repeats sentences (the str.find trap) after a prompt."""
    prompt = f"Q: problem {index}?\nA:\n"
    sentences = [SENTENCE_POOL[(index + k) % 3] for k in range(n_sentences)]  # repeats on purpose
    reasoning = "\n".join(sentences)
    generation = reasoning + "\nThe answer is 7."
    return TraceRecord(
        problem_id=f"p{index}", benchmark="gsm8k", prompt=prompt, text=prompt + generation,
        generation=generation, reasoning=reasoning, answer_part="The answer is 7.",
        reasoning_char_start=len(prompt), reasoning_char_end=len(prompt) + len(reasoning),
        token_ids=[], n_prompt_tokens=0, prediction="7", reference="7", correct=True,
        finish_reason="eos", model="synthetic",
    )


def test_trace_sentences_have_exact_spans_for_repeats(tiny_models):
    model = tiny_models["llama"]
    record = synthetic_trace(0)
    ids, sentences = trace_sentences(record, 0, model.tokenizer)
    assert len(sentences) == 6
    starts = [s.char_start for s in sentences]
    assert len(set(starts)) == 6  # repeated sentences keep their own spans
    for sentence in sentences:
        assert record.text[sentence.char_start : sentence.char_end] == sentence.text
        # char-level tokenizer with <bos>: token i covers character i - 1
        assert (sentence.tok_start, sentence.tok_end) == (sentence.char_start + 1, sentence.char_end + 1)
        assert model.tokenizer.decode(ids[sentence.tok_start : sentence.tok_end]) == sentence.text


@pytest.mark.parametrize("previous", [True, False])
def test_pooled_activations_equal_a_direct_computation(tiny_models, tmp_path, previous):
    model = tiny_models["qwen2"]
    traces = [synthetic_trace(i, n_sentences=3 + i % 3) for i in range(5)]
    config = ActivationConfig(layers=[0, 2], batch_size=2, shard_size=4, include_previous_token=previous)
    manifest = extract_activations(model, traces, tmp_path, config, progress=False)
    assert manifest.complete and len(manifest.shards) >= 2
    sentences = read_sentences(tmp_path)
    assert len(sentences) == manifest.n_sentences == sum(3 + i % 3 for i in range(5))
    for layer in (0, 2):
        raw = torch.cat([vectors for _, vectors in iter_shards(tmp_path, layer)])
        for row, sentence in enumerate(sentences):
            ids, _ = trace_sentences(traces[sentence.trace_index], sentence.trace_index, model.tokenizer)
            _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[f"blocks.{layer}.hook_resid_post"])
            start = sentence.tok_start - 1 if previous else sentence.tok_start
            expected = cache[f"blocks.{layer}.hook_resid_post"][0, start : sentence.tok_end].mean(0)
            assert (raw[row] - expected).abs().max() < 1e-5
        centred = load_sentence_vectors(tmp_path, layer, normalise=True)
        assert torch.allclose(centred.norm(dim=-1), torch.ones(len(sentences)), atol=1e-5)
        unnormalised = load_sentence_vectors(tmp_path, layer, normalise=False)
        assert unnormalised.mean(0).abs().max() < 1e-4  # centred on the run's own mean


def test_rerun_of_a_complete_run_is_a_no_op(tiny_models, tmp_path):
    model = tiny_models["llama"]
    traces = [synthetic_trace(i) for i in range(3)]
    config = ActivationConfig(layers=[1], batch_size=2, shard_size=3)
    first = extract_activations(model, traces, tmp_path, config, progress=False)
    again = extract_activations(model, traces, tmp_path, config, progress=False)
    assert again.shards == first.shards
    with pytest.raises(ValueError, match="different config"):
        extract_activations(model, traces, tmp_path, ActivationConfig(layers=[2], batch_size=2, shard_size=3), progress=False)


KILLER = textwrap.dedent(
    """
    import os, signal, sys, json
    sys.path.insert(0, {repo!r})
    import mechsteer.activations as activations
    from mechsteer.core.models import load_model
    from mechsteer.data.traces import load_traces
    real_write = activations._write_shard
    calls = []
    def dying_write(out, manifest, vectors, sentences, *rest):
        calls.append(1)
        if len(calls) == 2:
            # die mid-shard: the shard file and half its sentence lines are written,
            # the manifest is not
            with (out / activations.SENTENCES).open("a") as handle:
                handle.write(json.dumps({{"torn": True}}) + "\\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(out, manifest, vectors, sentences, *rest)
    activations._write_shard = dying_write
    model = load_model({model!r})
    traces = load_traces({traces!r})
    config = activations.ActivationConfig(layers=[0, 2], batch_size=2, shard_size=3)
    activations.extract_activations(model, traces, {out!r}, config, progress=False)
    """
)


def test_killed_run_resumes_to_a_bitwise_identical_result(tiny_models, tiny_model_dirs, tmp_path):
    import os

    model = tiny_models["llama"]
    traces = [synthetic_trace(i, n_sentences=2 + i % 4) for i in range(9)]
    traces_dir = tmp_path / "traces"
    traces_dir.mkdir()
    with (traces_dir / "traces.jsonl").open("w") as handle:
        for record in traces:
            from dataclasses import asdict

            handle.write(json.dumps(asdict(record)) + "\n")
    config = ActivationConfig(layers=[0, 2], batch_size=2, shard_size=3)
    clean = tmp_path / "clean"
    extract_activations(model, load_traces(traces_dir), clean, config, progress=False)

    resumed = tmp_path / "resumed"
    script = KILLER.format(repo=os.getcwd(), model=str(tiny_model_dirs["llama"]), traces=str(traces_dir), out=str(resumed))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    interrupted = Manifest.load(resumed)
    assert not interrupted.complete and len(interrupted.shards) == 1
    extract_activations(model, load_traces(traces_dir), resumed, config, progress=False)

    assert (clean / "sentences.jsonl").read_text() == (resumed / "sentences.jsonl").read_text()
    clean_manifest, resumed_manifest = Manifest.load(clean), Manifest.load(resumed)
    assert clean_manifest.shards == resumed_manifest.shards
    for shard in clean_manifest.shards:
        a, b = load_file(str(clean / shard.file)), load_file(str(resumed / shard.file))
        for key in a:
            assert torch.equal(a[key], b[key]), f"{shard.file}:{key} differs"
    assert torch.equal(load_file(str(clean / "centring_mean.safetensors"))["layer_2"],
                       load_file(str(resumed / "centring_mean.safetensors"))["layer_2"])


def test_traces_stream_and_resume_without_duplicates(tiny_models, tmp_path):
    model = tiny_models["gpt2"]
    problems = [Problem(f"q{i}", f"What is {i} plus {i}?", str(2 * i), None, "gsm8k") for i in range(5)]
    first = generate_traces(model, problems[:3], tmp_path, template="base_paper", max_new_tokens=6,
                            batch_size=2, progress=False)
    assert [r.problem_id for r in first] == ["q0", "q1", "q2"]
    # a torn line from a kill mid-write is dropped, then everything resumes
    with (tmp_path / "traces.jsonl").open("a") as handle:
        handle.write('{"problem_id": "q3", "trunc')
    full = generate_traces(model, problems, tmp_path, template="base_paper", max_new_tokens=6,
                           batch_size=2, progress=False)
    ids = [r.problem_id for r in load_traces(tmp_path)]
    assert ids == ["q0", "q1", "q2", "q3", "q4"]
    assert [r.problem_id for r in full] == ids
    fresh = generate_traces(model, problems, tmp_path / "fresh", template="base_paper",
                            max_new_tokens=6, batch_size=2, progress=False)
    assert [r.generation for r in fresh] == [r.generation for r in full]
    record = full[0]
    assert record.text == record.prompt + record.generation
    assert record.text[record.reasoning_char_start : record.reasoning_char_end] == record.reasoning
    assert record.token_ids[: record.n_prompt_tokens] == model.tokenizer(record.prompt).input_ids


@pytest.mark.slow
def test_smollm2_gsm8k_traces_through_the_whole_stage(tmp_path):
    """The real model: 3 GSM8K problems, 64 new tokens each, traces -> sentences -> activations."""
    from mechsteer.core.models import load_model
    from mechsteer.data.benchmarks import load_benchmark

    model = load_model("smollm2")
    problems = load_benchmark("gsm8k", "test", 3)
    traces = generate_traces(model, problems, tmp_path / "traces", max_new_tokens=64, batch_size=3, progress=False)
    assert [t.problem_id for t in traces] == [p.id for p in problems]
    assert all(t.settings["template"] == "thinking_chat" for t in traces)  # SmolLM2 has a chat template
    assert all(len(t.token_ids) - t.n_prompt_tokens <= 64 for t in traces)
    config = ActivationConfig(layers=[10, 20], batch_size=3, shard_size=8)
    manifest = extract_activations(model, traces, tmp_path / "acts", config, progress=False)
    sentences = read_sentences(tmp_path / "acts")
    assert manifest.complete and manifest.n_sentences == len(sentences) > 0
    for sentence in sentences:
        record = traces[sentence.trace_index]
        assert record.text[sentence.char_start : sentence.char_end] == sentence.text
        assert record.reasoning_char_start <= sentence.char_start < sentence.char_end <= record.reasoning_char_end
    # spot-check pooling on the real model against a direct forward pass
    first = sentences[0]
    ids, _ = trace_sentences(traces[first.trace_index], first.trace_index, model.tokenizer)
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=["blocks.10.hook_resid_post"])
    expected = cache["blocks.10.hook_resid_post"][0, first.tok_start - 1 : first.tok_end].mean(0)
    pooled = torch.cat([v for _, v in iter_shards(tmp_path / "acts", 10)])[0]
    assert (pooled - expected).abs().max() < 1e-4
    assert load_sentence_vectors(tmp_path / "acts", 20).shape == (len(sentences), model.cfg.d_model)


@pytest.mark.slow
def test_organism_traces_keep_every_ground_truth_label(tmp_path):
    """200 thinking-organism traces through the whole stage: every pooled sentence carries the
    label the organism grammar gives its exact span."""
    from mechsteer.core.models import load_model
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.data.labels import ground_truth_for
    from mechsteer.organisms.grammar import BEHAVIOURS, parse_trace

    model = load_model("organism-thinking")
    problems = load_benchmark("organism", "test", 200)
    traces = generate_traces(model, problems, tmp_path / "traces", max_new_tokens=288, batch_size=100,
                             progress=False)
    manifest = extract_activations(model, traces, tmp_path / "acts", ActivationConfig(layers=[1, 2], batch_size=50),
                                   labeller=ground_truth_for("organism").label_reasoning, progress=False)
    sentences = read_sentences(tmp_path / "acts")
    assert manifest.complete and len(sentences) == manifest.n_sentences > 200
    seen = set()
    for sentence in sentences:
        record = traces[sentence.trace_index]
        offset = record.reasoning_char_start
        truth = {(s.char_start + offset, s.char_end + offset): s.behaviour for s in parse_trace(record.reasoning)}
        assert sentence.label == truth[(sentence.char_start, sentence.char_end)]
        seen.add(sentence.label)
    assert set(BEHAVIOURS) <= seen  # the thinking organism uses every planted behaviour
