"""Prompt templates and splitting thinking output."""

from __future__ import annotations

import sys
import types

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from mechsteer.data import prompts
from mechsteer.data.prompts import (
    BASE_PAPER_TEMPLATE,
    PromptTemplate,
    get_template,
    register_template,
    render_prompt,
    split_thinking,
    template_names,
)
from tests.typecheck import refused

# Simplified copies of real chat templates: R1 distills open <think> in the generation
# prompt; ChatML (Qwen2.5, QwQ) does not.
R1_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "<\uff5cUser\uff5c>{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<\uff5cAssistant\uff5c><think>\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", chat_template=chat_template
    )


QUESTION = "Compute $\\frac{1}{2} + {x}$."


def test_base_paper_template_is_the_papers_prompt_verbatim():
    expected = (
        "Task: Answer the question below. Explain your reasoning step by step.\n\n\n\n"
        "Question:\nCompute $\\frac{1}{2} + {x}$.\n\nStep by step answer:\n"
    )
    assert render_prompt("base_paper", QUESTION) == expected
    assert BASE_PAPER_TEMPLATE.replace("{question}", QUESTION) == expected


def test_thinking_chat_with_a_generation_prompt_that_opens_think():
    tokenizer = make_tokenizer(R1_CHAT_TEMPLATE)
    prompt = render_prompt("thinking_chat", QUESTION, tokenizer)
    assert prompt == f"<s><\uff5cUser\uff5c>{QUESTION}<\uff5cAssistant\uff5c><think>\n"
    assert prompt.count("<think>") == 1


def test_thinking_chat_opens_think_when_the_template_does_not():
    tokenizer = make_tokenizer(CHATML_TEMPLATE)
    prompt = render_prompt("thinking_chat", QUESTION, tokenizer)
    assert prompt == f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_thinking_chat_needs_a_chat_template():
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt("thinking_chat", QUESTION, make_tokenizer(None))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt("thinking_chat", QUESTION)


def test_registry_lookup_override_and_errors():
    assert {"thinking_chat", "base_paper", "organism"} <= set(template_names())
    assert get_template("base_paper").text == BASE_PAPER_TEMPLATE
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("no_such_template")
    custom = PromptTemplate(name="base_paper", text="Q: {question}\nA:")
    with pytest.raises(ValueError, match="already exists"):
        register_template(custom)
    original = get_template("base_paper")
    register_template(custom, replace=True)
    try:
        assert render_prompt("base_paper", "2+2?") == "Q: 2+2?\nA:"
    finally:
        register_template(original, replace=True)
    assert render_prompt("base_paper", "2+2?").startswith("Task: Answer")
    # A template object can be used directly without registering it.
    assert render_prompt(PromptTemplate(name="inline", text="<{question}>"), "q") == "<q>"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "t", "text": "no placeholder"}, "question"),
        ({"name": "t"}, "needs text"),
        ({"name": "t", "text": "{question}", "chat": True}, "takes no text"),
        ({"name": "", "text": "{question}"}, "non-empty name"),
    ],
)
def test_invalid_templates_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(**kwargs)


def test_organism_template_is_read_lazily_from_the_organisms_stage(monkeypatch):
    # A stand-in module proves the template is looked up at render time, not import time.
    grammar = types.ModuleType("mechsteer.organisms.grammar")
    grammar.PROMPT_TEMPLATE = "Problem: {question}\nWork:\n"
    monkeypatch.setitem(sys.modules, "mechsteer.organisms.grammar", grammar)
    assert render_prompt("organism", "1 plus 2") == "Problem: 1 plus 2\nWork:\n"
    grammar.PROMPT_TEMPLATE = "no placeholder"
    with pytest.raises(ValueError, match="question"):
        render_prompt("organism", "1 plus 2")


def test_the_chat_template_is_not_a_format_string():
    with pytest.raises(ValueError, match="chat template"):
        get_template("thinking_chat").format_string()
    assert prompts.THINK_OPEN == "<think>" and prompts.THINK_CLOSE == "</think>"


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("<think>\nLet me see.\n</think>\n\nThe answer is 4.", {}, ("Let me see.", "The answer is 4.")),
        # R1 distills: the opening tag was part of the prompt.
        ("Let me see.\n</think>\nSo \\boxed{4}.", {}, ("Let me see.", "So \\boxed{4}.")),
        # Ran out of tokens inside the thinking block.
        ("<think>\nStill thinking", {}, ("Still thinking", "")),
        ("Still thinking", {"opened_in_prompt": True}, ("Still thinking", "")),
        # No thinking at all.
        ("Just the answer: 4", {}, ("", "Just the answer: 4")),
        ("preamble <think>a</think>b</think>c", {}, ("a", "b</think>c")),
        ("<think></think>", {}, ("", "")),
    ],
)
def test_split_thinking(text, kwargs, expected):
    assert split_thinking(text, **kwargs) == expected


def test_split_thinking_rejects_non_strings():
    with refused("str", parameter="text"):
        split_thinking(None)  # type: ignore[arg-type]
