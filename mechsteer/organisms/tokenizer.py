"""The organisms' tokenizer, built with `tokenizers`: every number 0-99 and every word of the
grammar is ONE token, anything else falls back to single characters.

Why not one token per character: copying a number from the question into the plan, or a
result into the next step, is then a single-token copy, and each arithmetic step
"38 + 9 = 47" is one of ~1.6k token-level facts. With characters, the ~1M-parameter
organisms learned the per-step arithmetic but never learned to copy the question's
numbers in a 20-minute CPU budget (see docs/organisms.md).

Text is split (pre-tokenized) into an optional leading space plus a run of letters, an
optional leading space plus a run of digits, an optional leading space plus one other
character, or one whitespace character; each piece is then matched greedily, longest
vocabulary entry first (WordPiece with no continuation prefix), so "123" becomes "12", "3"
and an unknown word becomes its characters. Offsets are exact character spans (sentence
spans map to token positions directly). The tokenizer prepends ``<bos>`` to every encoded
text; ``<pad>`` differs from ``<eos>``; decoding concatenates the tokens.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mechsteer.organisms.tasks import ADD_VERBS, ITEMS, NAMES, SUB_VERBS

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
MAX_NUMBER_TOKEN = 99
PIECE_PATTERN = r" ?[A-Za-z]+| ?\d+| ?[^A-Za-z\d\s]|\s"
# Words of the prompts and the grammar (see grammar.py); the verbs come from tasks.py.
GRAMMAR_WORDS: tuple[str, ...] = (
    "Q", "A", "How", "many", "now", "has", "Plan", "Check", "Wait", "The", "answer", "is", "not",
    "start", "at", "add", "take", "for", "Each", "day", "Day", "days", "after",
)
# Grammar v4's extra words (its conditions, re-reads and the paper's base prompt): appended after every
# other token, so that v1-v3 vocabularies keep their ids.
V4_WORDS: tuple[str, ...] = (
    "Reread", "From", "from", "instead", "Task", "Answer", "the", "question", "below", "Explain", "your",
    "reasoning", "step", "by", "Question", "Step",
)


def charset() -> list[str]:
    """The single characters in the vocabulary: printable ASCII except tabs and form feeds."""
    return sorted(set(string.printable) - set("\t\r\x0b\x0c"))


def vocabulary(extra_words: tuple[str, ...] = ()) -> list[str]:
    """Every non-special token, in id order: characters, numbers, words (bare and with a space), then
    ``extra_words`` (bare and with a space)."""
    pieces: list[str] = list(charset())
    for number in range(MAX_NUMBER_TOKEN + 1):
        pieces += [str(number), f" {number}"]
    for word in (*GRAMMAR_WORDS, *NAMES, *ITEMS, *ADD_VERBS, *SUB_VERBS):
        pieces += [word, f" {word}"]
    pieces += [f" {symbol}" for symbol in "+-=?"]
    for word in extra_words:
        pieces += [word, f" {word}"]
    return list(dict.fromkeys(pieces))  # drops repeats, keeps the first id


def build_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A fresh organism tokenizer wrapped for `transformers` (save with save_pretrained); grammar v4's
    pass ``extra_words=V4_WORDS``."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for piece in vocabulary(extra_words):
        vocab.setdefault(piece, len(vocab))
    core = Tokenizer(
        models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix="", max_input_chars_per_word=100)
    )
    core.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
