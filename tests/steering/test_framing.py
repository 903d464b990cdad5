"""Labels made on the thinking model's traces reach the same sentences under the base model's
prompt; the one tokenisation rule (the model's own BOS); inline templates; checks that come
before the expensive work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mechsteer.activations import trace_sentences
from mechsteer.causal.sufficiency import SteeringContext, require_contexts, sufficiency
from mechsteer.core.errors import ConfigError, ProvenanceError
from mechsteer.core.models import load_model
from mechsteer.data.prompts import get_template, render_prompt
from mechsteer.data.traces import TraceRecord
from mechsteer.engines import load_tokenizer
from mechsteer.experiment.config import RunConfig
from mechsteer.interventions.generation import tokenize_prompts
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.framing import frame_for_base
from mechsteer.steering.labels import aligned_labeller, labelled_counts
from mechsteer.steering.mean import build_mean_directions
from mechsteer.steering.optimise import build_optimised_directions
from tests.tiny_models import save_chat_pair, save_real_pair

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
REASONING = ("First I add the apples together.\nThree plus four is seven apples.\n"
             "Let me check that once more. Yes, the answer is seven.")


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    base, thinking = save_chat_pair(tmp_path_factory.mktemp("framing_pair"), thinking_prompt="r1")
    return load_model(str(base)), load_model(str(thinking))


def thinking_trace(thinking, problem_id: str = "gsm8k/train/0", reasoning: str = REASONING) -> TraceRecord:
    prompt = render_prompt("thinking_chat", QUESTION, thinking.tokenizer)
    generation = reasoning + "\n</think>\nThe answer is 7."
    return TraceRecord(
        problem_id=problem_id, benchmark="gsm8k", prompt=prompt, text=prompt + generation, generation=generation,
        reasoning=reasoning, answer_part="The answer is 7.", reasoning_char_start=len(prompt),
        reasoning_char_end=len(prompt) + len(reasoning), token_ids=[], n_prompt_tokens=0, prediction="7",
        reference="7", correct=True, finish_reason="eos", model="thinking", settings={"template": "thinking_chat"})


def test_the_same_labelled_sentences_come_out_of_the_thinking_and_the_base_frame(chat_pair):
    base, thinking = chat_pair
    raw = [thinking_trace(thinking)]
    _, pooled = trace_sentences(raw[0], 0, thinking.tokenizer)  # as the activations stage pools them
    labeller = aligned_labeller(pooled, [index % 2 for index in range(len(pooled))])
    framed = frame_for_base(raw, {raw[0].problem_id: QUESTION}, base.tokenizer)
    assert framed[0].prompt == render_prompt("base_paper", QUESTION) and framed[0].reasoning == raw[0].reasoning
    _, in_thinking = trace_sentences(raw[0], 0, thinking.tokenizer)
    _, in_base = trace_sentences(framed[0], 0, base.tokenizer)
    assert len(in_base) == len(in_thinking) == 4
    # every offset moved, yet sentence by sentence the text, the place in the reasoning and the label agree
    assert all(b.char_start != t.char_start for b, t in zip(in_base, in_thinking, strict=True))
    for b, t in zip(in_base, in_thinking, strict=True):
        assert (b.text, b.reasoning_span(), labeller(b)) == (t.text, t.reasoning_span(), labeller(t))
    assert [labeller(sentence) for sentence in in_base] == [0, 1, 0, 1]


def test_a_custom_base_template_frames_the_directions_traces(chat_pair):
    base, thinking = chat_pair
    raw = [thinking_trace(thinking)]
    framed = frame_for_base(raw, {raw[0].problem_id: QUESTION}, base.tokenizer, "User: {question}\nAssistant:")
    assert framed[0].text == f"User: {QUESTION}\nAssistant:" + REASONING


def test_a_re_framed_sentence_whose_text_changed_is_refused(chat_pair):
    _, thinking = chat_pair
    original = thinking_trace(thinking)
    _, pooled = trace_sentences(original, 0, thinking.tokenizer)
    labeller = aligned_labeller(pooled, [0] * len(pooled))
    changed = thinking_trace(thinking, reasoning=REASONING.replace("apples together", "pears together."))
    _, sentences = trace_sentences(changed, 0, thinking.tokenizer)
    with pytest.raises(ProvenanceError, match=r"trace 0 \('gsm8k/train/0'\).*labelled one"):
        labeller(sentences[0])


def test_sentences_of_an_older_activation_folder_are_placed_by_their_traces(chat_pair):
    _, thinking = chat_pair
    trace = thinking_trace(thinking)
    _, pooled = trace_sentences(trace, 0, thinking.tokenizer)
    old = [dataclasses.replace(sentence, reasoning_char_start=None) for sentence in pooled]
    with pytest.raises(Exception, match="pool the activations again"):
        aligned_labeller(old, [0] * len(old))
    labeller = aligned_labeller(old, [1] * len(old), reasoning_starts=[trace.reasoning_char_start])
    assert [labeller(sentence) for sentence in pooled] == [1] * len(pooled)


def test_inline_templates_render_and_pass_validation():
    template = get_template("User: {question}\nAssistant:")
    assert not template.opens_thinking
    assert render_prompt("User: {question}\nAssistant:", "2+2?") == "User: 2+2?\nAssistant:"
    assert get_template("Q: {question}\nA: <think>").opens_thinking
    config = RunConfig.from_dict(dict(name="x", base_model="organism-base", thinking_model="organism-thinking",
                                      benchmark="organism", base_template="User: {question}\nAssistant:",
                                      base_stop_strings=["\nUser:"]))
    assert config.resolved_base_stop_strings == ("\nUser:",)
    with pytest.raises(ConfigError, match="format string containing"):
        RunConfig.from_dict(dict(name="x", base_model="organism-base", thinking_model="organism-thinking",
                                 benchmark="organism", base_template="no_such_template"))


# --------------------------------------------------------------------------------------------
# One tokenisation rule: the model's own tokenizer's BOS


@pytest.mark.parametrize("arch, bos", [("llama", "<|begin_of_text|>"), ("qwen2", None)])
def test_base_prompts_get_the_bos_their_own_tokenizer_gives(arch, bos, tmp_path):
    base_dir, _ = save_real_pair(tmp_path, arch)
    model = load_model(str(base_dir))
    ids = tokenize_prompts(model, [render_prompt("base_paper", QUESTION)])[0]
    tokens = model.tokenizer.convert_ids_to_tokens(ids)
    if bos is None:  # Qwen2.5: no BOS at all
        assert tokens[0] == "T" and model.tokenizer.bos_token not in tokens
    else:  # Llama 3: exactly one <|begin_of_text|>, in front
        assert tokens[0] == bos and tokens.count(bos) == 1


@pytest.mark.slow
def test_smollm2_base_prompt_starts_with_the_prompts_own_first_token():
    from transformers import AutoTokenizer

    from mechsteer.core.models import smollm2_dir

    model = load_model("smollm2")
    own = AutoTokenizer.from_pretrained(smollm2_dir())
    prompt = render_prompt("base_paper", QUESTION)
    ids = tokenize_prompts(model, [prompt])[0]
    assert ids == own(prompt)["input_ids"] and ids[0] != model.tokenizer.bos_token_id
    assert load_tokenizer("smollm2")(prompt)["input_ids"] == ids  # the engines' tokenizer: the same rule
    chat = render_prompt("thinking_chat", QUESTION, model.tokenizer)
    chat_ids = tokenize_prompts(model, [chat])[0]
    assert chat_ids == own(chat)["input_ids"] and chat_ids.count(model.tokenizer.bos_token_id) >= 1


# --------------------------------------------------------------------------------------------
# Checks before the expensive work


def test_directions_refuse_a_behaviour_without_labelled_sentences_before_any_forward(chat_pair, monkeypatch):
    base, thinking = chat_pair
    raw = [thinking_trace(thinking)]
    framed = frame_for_base(raw, {raw[0].problem_id: QUESTION}, base.tokenizer)

    def labeller(sentence):
        return 0  # every sentence is behaviour 0; behaviour 1 has none

    assert labelled_counts(framed, base.tokenizer, labeller, [0, 1]) == {0: 4, 1: 0}
    calls = []
    monkeypatch.setattr(type(base), "forward", lambda *args, **kwargs: calls.append(1))
    with pytest.raises(ConfigError, match=r"behaviour 1 \('second'\) has 0.*n_train"):
        build_mean_directions(base, framed, labeller, [0, 1], ["first", "second"], 1)
    with pytest.raises(ConfigError, match=r"at least 2 .*behaviour 1 \('second'\) has 0"):
        build_optimised_directions(base, framed, labeller, [0, 1], ["first", "second"], 1)
    assert calls == []


def test_sufficiency_contexts_are_checked_before_anything_generates(chat_pair):
    base, _ = chat_pair
    directions = DirectionSet(model_name=base.cfg.model_name, d_model=base.cfg.d_model, n_layers=base.cfg.n_layers,
                              layer=1, site="resid_post", method="mean", behaviour_ids=[0, 1], titles=["a", "b"],
                              directions=torch.ones(2, base.cfg.d_model), bias=None, provenance={})
    only_zero = [SteeringContext("text", 0, 0, 0), SteeringContext("more", 0, 0, 1)]
    with pytest.raises(ConfigError, match=r"no context for behaviour\(s\) 0 \('a'\).*ablations off"):
        require_contexts(only_zero, directions)
    require_contexts([*only_zero, SteeringContext("x", 1, 0, 2)], directions)

    def labeller(contexts, continuations):
        raise AssertionError("nothing may be generated or labelled before the check")

    with pytest.raises(ConfigError, match="no context"):
        sufficiency(base, directions, only_zero, labeller)


def test_no_stage_helper_reads_the_files_it_was_not_given(tmp_path: Path):
    """frame_for_base needs the questions of traces it re-frames: refused with the trace named."""
    record = dataclasses.replace(thinking_trace_stub(), settings={"template": "thinking_chat"})
    with pytest.raises(ValueError, match="gsm8k/train/0.*pass its question"):
        frame_for_base([record], {}, None)


def thinking_trace_stub() -> TraceRecord:
    return TraceRecord(problem_id="gsm8k/train/0", benchmark="gsm8k", prompt="p", text="p r", generation=" r",
                       reasoning="r", answer_part="", reasoning_char_start=2, reasoning_char_end=3, token_ids=[],
                       n_prompt_tokens=0, prediction=None, reference="", correct=False, finish_reason="eos",
                       model="m")
