"""Named, overridable prompt templates, and splitting thinking output into its two parts.

A template is either a plain completion prompt (a format string with one ``{question}``
field) or ``chat``: the question as a single user turn through the tokenizer's chat
template, ending with an opened ``<think>`` block.

Built-in templates:

- ``thinking_chat``: for thinking models (R1 distills, QwQ ...). Needs a tokenizer with a
  chat template; a tokenizer without one raises ValueError (no plain fallback, because a
  thinking model prompted without its template is a different experiment).
- ``base_paper``: the paper's base-model prompt, ``BASE_PAPER_TEMPLATE``.
- plug-ins' templates (the organisms' ``organism``), registered when plug-ins load.

Override or add templates with ``register_template(PromptTemplate(...), replace=True)``;
``render_prompt`` also accepts a ``PromptTemplate`` object directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mechsteer.core.errors import ConfigError
from mechsteer.core.plugins import load_plugins
from mechsteer.grading.answers import THINK_CLOSE, THINK_OPEN

BASE_PAPER_TEMPLATE = (
    "Task: Answer the question below. Explain your reasoning step by step.\n\n\n\n"
    "Question:\n{question}\n\nStep by step answer:\n"
)
# A base model that has answered goes on to invent the next task of the same format.
BASE_PAPER_STOP_STRINGS = ("\nQuestion:", "\nTask:")
# Open-Reasoner-Zero's own prompt (playground/zero_setting_base.py in its repository: the
# instruction rendered into the conversation template; Qwen2.5 has no BOS text to prepend).
ORZ_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here "
    "</answer>. And your final answer will be extracted automatically by the \\boxed{} tag.\n"
    "This is the problem:\n{question}\nAssistant: <think>"
)
ORZ_STOP_STRINGS = ("</answer>",)


@dataclass(frozen=True)
class PromptTemplate:
    """A named prompt template.

    ``text`` is a format string containing ``{question}``, or a zero-argument callable
    returning one (resolved at render time, for templates owned by other modules).
    ``chat=True`` means: render through the tokenizer's chat template instead; ``text``
    must then be None.
    """

    name: str
    text: str | Callable[[], str] | None = None
    chat: bool = False
    description: str = ""
    # Where generation under this template stops besides EOS (ORZ: after its answer).
    stop_strings: tuple[str, ...] = ()
    # The prompt opens a thinking block (chat templates always do): the reasoning ends at
    # </think>, and a generation that never closes it gave no answer.
    opens_thinking: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a PromptTemplate needs a non-empty name")
        if self.chat and self.text is not None:
            raise ValueError(f"template {self.name!r}: a chat template takes no text")
        if not self.chat and self.text is None:
            raise ValueError(f"template {self.name!r}: a plain template needs text")
        if isinstance(self.text, str):
            _check_format_string(self.name, self.text)
        if self.chat:
            object.__setattr__(self, "opens_thinking", True)

    def format_string(self) -> str:
        """The plain format string (resolving a lazy one); ValueError for chat templates."""
        if self.chat or self.text is None:
            raise ValueError(f"template {self.name!r} is a chat template; it has no text")
        text = self.text() if callable(self.text) else self.text
        _check_format_string(self.name, text)
        return text


def _check_format_string(name: str, text: str) -> None:
    if not isinstance(text, str) or "{question}" not in text:
        raise ValueError(f"template {name!r} must be a str containing '{{question}}'")


_REGISTRY: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate, *, replace: bool = False) -> None:
    """Add a template to the registry; ``replace=True`` overrides an existing name."""
    if template.name in _REGISTRY and not replace:
        raise ValueError(
            f"template {template.name!r} already exists; pass replace=True to override it"
        )
    _REGISTRY[template.name] = template


def is_inline_template(name: str) -> bool:
    """Whether a template key holds a format string itself (``"User: {question}\\nAssistant:"``)
    instead of a registered name."""
    return "{question}" in name


def inline_template(text: str) -> PromptTemplate:
    """A plain template given as its format string. It opens a thinking block when ``<think>``
    follows the question (as Open-Reasoner-Zero's prompt does); its stop strings come from the
    config beside it (``base_stop_strings``)."""
    return PromptTemplate(name=text, text=text, description="inline format string",
                          opens_thinking=THINK_OPEN in text.split("{question}")[-1])


def get_template(name: str) -> PromptTemplate:
    """The registered template called ``name``, or the inline template ``name`` is (see
    :func:`is_inline_template`)."""
    if is_inline_template(name):
        return inline_template(name)
    if name not in _REGISTRY:
        load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown prompt template {name!r}; registered: {sorted(_REGISTRY)}, or a format string "
            "containing {question}"
        ) from None


def benchmark_template(benchmark: str) -> str | None:
    """The template a plug-in benchmark brings, registered under the benchmark's own name (the
    organisms' ``organism``); None for the built-in benchmarks, which are prompted by model."""
    if benchmark not in _REGISTRY:
        load_plugins()
    return benchmark if benchmark in _REGISTRY else None


def template_names() -> list[str]:
    """Names of all registered templates (plug-ins loaded), sorted."""
    load_plugins()
    return sorted(_REGISTRY)


def render_prompt(template: str | PromptTemplate, question: str, tokenizer: Any = None) -> str:
    """The prompt text for ``question`` under ``template`` (a registered name or a template).

    Chat templates need ``tokenizer`` (a Hugging Face tokenizer with ``apply_chat_template``
    and a ``chat_template``); the result ends with an opened ``<think>`` block (added only if
    the model's generation prompt does not already open one, as R1 distills' does). The text
    already holds the template's special tokens (a BOS, role markers): tokenize it with
    ``add_special_tokens=False``. Plain templates ignore ``tokenizer``.
    """
    if isinstance(template, str):
        template = get_template(template)
    if not isinstance(question, str):
        raise ValueError(f"question must be a str, got {type(question).__name__}")
    if not template.chat:
        # str.replace, not str.format: questions and templates contain literal braces (LaTeX).
        return template.format_string().replace("{question}", question)
    if tokenizer is None:
        raise ValueError(f"template {template.name!r} needs a tokenizer with a chat template")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"template {template.name!r}: tokenizer {type(tokenizer).__name__} has no chat "
            "template; use a thinking model's tokenizer, or a plain template such as 'base_paper'"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str):
        raise ValueError(f"apply_chat_template returned {type(rendered).__name__}, not str")
    # Open the thinking block unless the generation prompt already did (after the question).
    question_at = rendered.rfind(question) if question else -1
    tail = rendered[question_at + len(question) :] if question_at >= 0 else rendered
    if THINK_OPEN in tail and THINK_CLOSE not in tail.split(THINK_OPEN)[-1]:
        return rendered
    return rendered + THINK_OPEN + "\n"


def split_thinking(text: str, *, opened_in_prompt: bool = False) -> tuple[str, str]:
    """Split generated text into (thinking part, answer part), both stripped.

    - ``<think>A</think>B`` -> (A, B); text before ``<think>`` is dropped.
    - ``A</think>B`` (the opening tag was in the prompt, as with R1 distills) -> (A, B).
    - ``<think>A`` without a closing tag (ran out of tokens) -> (A, "").
    - No tags at all -> ("", text), unless ``opened_in_prompt`` is True, in which case the
      whole text is an unfinished thinking block -> (text, "").
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    close = text.find(THINK_CLOSE)
    if close >= 0:
        thinking = text[:close]
        opening = thinking.rfind(THINK_OPEN)
        if opening >= 0:
            thinking = thinking[opening + len(THINK_OPEN) :]
        return thinking.strip(), text[close + len(THINK_CLOSE) :].strip()
    opening = text.find(THINK_OPEN)
    if opening >= 0:
        return text[opening + len(THINK_OPEN) :].strip(), ""
    if opened_in_prompt:
        return text.strip(), ""
    return "", text.strip()


register_template(
    PromptTemplate(
        name="thinking_chat",
        chat=True,
        description="question as one user turn via the tokenizer's chat template, <think> opened",
    )
)
register_template(
    PromptTemplate(
        name="base_paper",
        text=BASE_PAPER_TEMPLATE,
        description="the paper's base-model prompt",
        stop_strings=BASE_PAPER_STOP_STRINGS,
    )
)
register_template(
    PromptTemplate(
        name="orz",
        text=ORZ_TEMPLATE,
        description="Open-Reasoner-Zero's own prompt: <think> opened, the answer in <answer> tags",
        stop_strings=ORZ_STOP_STRINGS,
        opens_thinking=True,
    )
)
