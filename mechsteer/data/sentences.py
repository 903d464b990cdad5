"""Split reasoning text into sentences with exact character spans, then token spans.

Sentence boundaries (the paper's rule, made exact):

* A sentence ends at a newline (the newline is not part of either sentence), or after a
  run of terminators ``.``, ``!``, ``?``, ``;`` plus any closing quotes/brackets
  directly after them, provided the run is followed by whitespace or the end of the
  text. Requiring whitespace keeps ``3.14``, ``x.y`` and ``a;b`` whole.
* Protected (never a boundary):
  - decimals such as ``3.14`` (a ``.`` between two digits);
  - dotted single-letter abbreviations (``e.g.``, ``i.e.``, ``U.S.``, ``a.m.``) and a
    short list of common ones (``etc.``, ``vs.``, ``cf.``, ``approx.``, ``Fig.``, ``Dr.``,
    ...). ``etc.`` is only protected when the next word starts in lower case, because it
    often ends a sentence. A lone letter such as ``x.`` *does* end a sentence: in maths
    traces a variable at the end of a sentence is far more common than an initial.
  - factorials: a ``!`` (or ``!!``) right after a digit, ``)`` or a one-letter word
    (``5!``, ``(n-1)!``, ``k!``);
  - everything inside ``\\boxed{...}`` with balanced braces, newlines included. An
    unclosed ``\\boxed{`` (a truncated trace) is protected to the end of its line.
* Each segment is stripped of surrounding whitespace, so a span covers the sentence text
  exactly. Whitespace-only segments are not sentences. Segments with fewer than
  ``min_words`` whitespace-separated words are kept in :func:`segment_sentences`'s output
  with ``kept=False`` and a ``drop_reason``, so the decision is recorded;
  :func:`split_sentences` returns only the kept ones.

Token spans (:func:`attach_token_spans`) come from a tokenizer's offset mapping, never
from a string search, so repeated sentences get their own spans. The token span of a
sentence is the half-open range of every token whose character range overlaps the
sentence's character range. Consequences, by design:

* a token that straddles a boundary belongs to every sentence it overlaps: a BPE token
  ``" The"`` whose space lies in the gap belongs to the sentence starting with ``The``;
  a token ``".The"`` merging one sentence's full stop with the next word belongs to both
  sentences, so neighbouring spans may share that token;
* tokens lying wholly in the gap between sentences (a lone newline token) belong to no
  sentence, and tokens with an empty character range (special tokens) belong to none.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TERMINATORS = frozenset(".!?;")
# Closing quotes/brackets that stay with the sentence they close, e.g. `(see above.)`.
CLOSERS = frozenset("\"')]\u201d\u2019")
# Common abbreviations (lower case, without the final dot) whose dot never ends a sentence.
ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "vs", "cf", "approx", "fig", "eq", "eqs", "mr", "mrs", "ms", "dr", "prof",
     "al", "resp", "viz", "w.r.t"}
)
# Abbreviations protected only when the next word continues in lower case.
WEAK_ABBREVIATIONS = frozenset({"etc"})
_DOTTED_LETTERS = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")
_BOXED_OPEN = "\\boxed{"

DROP_TOO_FEW_WORDS = "too_few_words"


@dataclass(frozen=True)
class Sentence:
    """One segment of a text: a sentence, or a fragment dropped for being too short.

    ``char_start``/``char_end`` index the text that was split (``text[char_start:char_end]
    == self.text``); ``tok_start``/``tok_end`` are a half-open token range once
    :func:`attach_token_spans` has run.
    """

    text: str
    char_start: int
    char_end: int
    kept: bool = True
    drop_reason: str | None = None
    tok_start: int | None = None
    tok_end: int | None = None

    @property
    def n_words(self) -> int:
        return len(self.text.split())

    def shifted(self, char_offset: int) -> Sentence:
        """The same sentence with its character span moved by ``char_offset``."""
        return dataclasses.replace(
            self, char_start=self.char_start + char_offset, char_end=self.char_end + char_offset
        )


def _boxed_protection(text: str) -> list[tuple[int, int]]:
    """Half-open ranges covered by ``\\boxed{...}``, braces balanced, ``\\{``/``\\}`` ignored."""
    ranges: list[tuple[int, int]] = []
    search_from = 0
    while (start := text.find(_BOXED_OPEN, search_from)) != -1:
        depth = 0
        position = start + len(_BOXED_OPEN) - 1
        end = None
        while position < len(text):
            char = text[position]
            if char == "\\":
                position += 2  # an escaped character never opens or closes a group
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    end = position + 1
                    break
            position += 1
        if end is None:
            newline = text.find("\n", start)
            end = len(text) if newline == -1 else newline
        ranges.append((start, end))
        search_from = end
    return ranges


def _word_before(text: str, position: int) -> str:
    """The run of non-space characters ending just before ``position``, opening brackets cut."""
    start = position
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:position].lstrip("([{\"'\u201c\u2018")


def _next_nonspace(text: str, position: int) -> str:
    while position < len(text) and text[position].isspace():
        position += 1
    return text[position] if position < len(text) else ""


def _is_single_letter_word_end(text: str, position: int) -> bool:
    """Whether ``text[position - 1]`` is a letter forming a one-letter word."""
    return (
        position >= 1
        and text[position - 1].isalpha()
        and (position == 1 or not text[position - 2].isalnum())
    )


def _starts_boundary(text: str, position: int) -> bool:
    """Whether the terminator at ``position`` can end a sentence (before the whitespace rule)."""
    char = text[position]
    if char == ".":
        if 0 < position < len(text) - 1 and text[position - 1].isdigit() and text[position + 1].isdigit():
            return False
        word = _word_before(text, position).lower()
        if word in ABBREVIATIONS or _DOTTED_LETTERS.fullmatch(word):
            return False
        if word in WEAK_ABBREVIATIONS and _next_nonspace(text, position + 1).islower():
            return False
        return True
    if char == "!":
        run_start = position
        while run_start > 0 and text[run_start - 1] == "!":
            run_start -= 1
        if run_start > 0 and (
            text[run_start - 1].isdigit()
            or text[run_start - 1] == ")"
            or _is_single_letter_word_end(text, run_start)
        ):
            return False  # a factorial such as 5!, (n-1)! or k!
        return True
    return True  # `?` and `;`


def _raw_segments(text: str) -> list[tuple[int, int]]:
    """Half-open ranges between boundaries, before whitespace stripping."""
    protected = bytearray(len(text))
    for start, end in _boxed_protection(text):
        protected[start:end] = b"\x01" * (end - start)
    segments: list[tuple[int, int]] = []
    segment_start = 0
    position = 0
    while position < len(text):
        char = text[position]
        if protected[position]:
            position += 1
            continue
        if char == "\n":
            segments.append((segment_start, position))
            segment_start = position + 1
            position += 1
            continue
        if char in TERMINATORS and _starts_boundary(text, position):
            end = position + 1
            while end < len(text) and text[end] in TERMINATORS and not protected[end]:
                end += 1
            while end < len(text) and text[end] in CLOSERS and not protected[end]:
                end += 1
            if end == len(text) or text[end].isspace():
                segments.append((segment_start, end))
                segment_start = end
                position = end
                continue
        position += 1
    segments.append((segment_start, len(text)))
    return segments


def segment_sentences(text: str, *, min_words: int = 3) -> list[Sentence]:
    """All segments of ``text`` in order, short fragments included with ``kept=False``."""
    if min_words < 0:
        raise ValueError(f"min_words must be >= 0, got {min_words}")
    segments: list[Sentence] = []
    for start, end in _raw_segments(text):
        raw = text[start:end]
        stripped = raw.strip()
        if not stripped:
            continue
        char_start = start + (len(raw) - len(raw.lstrip()))
        char_end = char_start + len(stripped)
        n_words = len(stripped.split())
        if n_words >= min_words:
            segments.append(Sentence(stripped, char_start, char_end))
        else:
            segments.append(
                Sentence(stripped, char_start, char_end, kept=False, drop_reason=DROP_TOO_FEW_WORDS)
            )
    return segments


def split_sentences(text: str, *, min_words: int = 3) -> list[Sentence]:
    """The kept sentences of ``text``; see :func:`segment_sentences` for the dropped ones."""
    return [sentence for sentence in segment_sentences(text, min_words=min_words) if sentence.kept]


def _offset_array(offset_mapping: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """The offsets as an (n_tokens, 2) int64 array, validated."""
    if isinstance(offset_mapping, np.ndarray):
        offsets = offset_mapping
    else:
        if hasattr(offset_mapping, "tolist"):  # a torch tensor
            offset_mapping = offset_mapping.tolist()
        for index, pair in enumerate(offset_mapping):
            if len(pair) != 2:
                raise ValueError(
                    f"offset_mapping[{index}] must be a (char_start, char_end) pair, got {pair!r}"
                )
        offsets = np.asarray(offset_mapping, dtype=np.int64).reshape(-1, 2)
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise ValueError(f"offset_mapping must have shape (n_tokens, 2), got {offsets.shape}")
    backwards = np.nonzero(offsets[:, 1] < offsets[:, 0])[0]
    if len(backwards):
        index = int(backwards[0])
        raise ValueError(f"offset_mapping[{index}] = {offsets[index].tolist()} ends before it starts")
    return offsets.astype(np.int64, copy=False)


def token_span(
    char_start: int, char_end: int, offset_mapping: Sequence[Sequence[int]] | np.ndarray
) -> tuple[int, int]:
    """Half-open range of the tokens whose character range overlaps ``[char_start, char_end)``.

    Raises ValueError if no token overlaps or the overlapping tokens are not contiguous
    (which a tokenizer's offsets of one text never produce).
    """
    if char_end <= char_start:
        raise ValueError(f"empty character span [{char_start}, {char_end})")
    offsets = _offset_array(offset_mapping)
    starts, ends = offsets[:, 0], offsets[:, 1]
    overlapping = np.nonzero((starts < ends) & (starts < char_end) & (ends > char_start))[0].tolist()
    if not overlapping:
        raise ValueError(
            f"no token overlaps characters [{char_start}, {char_end}); "
            "was the offset mapping computed on the full text, with the right char_offset?"
        )
    if overlapping[-1] - overlapping[0] + 1 != len(overlapping):
        raise ValueError(
            f"tokens overlapping characters [{char_start}, {char_end}) are not contiguous: "
            f"{overlapping}"
        )
    return overlapping[0], overlapping[-1] + 1


def attach_token_spans(
    sentences: Sequence[Sentence],
    offset_mapping: Sequence[Sequence[int]] | np.ndarray,
    *,
    char_offset: int = 0,
) -> list[Sentence]:
    """Sentences with ``tok_start``/``tok_end`` set from a tokenizer's offset mapping.

    ``offset_mapping`` is the per-token ``(char_start, char_end)`` list of the full text
    (e.g. from a fast tokenizer with ``return_offsets_mapping=True``). The sentences were
    split from a substring of it that starts at ``char_offset`` (the thinking part inside
    prompt + generation); the returned sentences carry character spans in the full text.
    """
    offsets = _offset_array(offset_mapping)
    attached: list[Sentence] = []
    for sentence in sentences:
        shifted = sentence.shifted(char_offset)
        tok_start, tok_end = token_span(shifted.char_start, shifted.char_end, offsets)
        attached.append(dataclasses.replace(shifted, tok_start=tok_start, tok_end=tok_end))
    return attached


__all__ = [
    "DROP_TOO_FEW_WORDS",
    "Sentence",
    "attach_token_spans",
    "segment_sentences",
    "split_sentences",
    "token_span",
]
