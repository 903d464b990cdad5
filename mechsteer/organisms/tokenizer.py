"""The organisms' character-level tokenizer (one token per character), built with `tokenizers`.

Offsets are exact character spans, so sentence spans map to token positions directly.
The tokenizer prepends ``<bos>`` to every encoded text; ``<pad>`` differs from ``<eos>``.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from mechsteer.organisms.tasks import ITEMS, NAMES

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)


def charset() -> list[str]:
    """Every character the organisms' documents use (plus digits, letters, punctuation)."""
    chars = set(string.ascii_letters + string.digits + " \n.,:;!?+-=()'\"")
    for word in NAMES + ITEMS:
        chars.update(word)
    return sorted(chars)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer wrapped for `transformers` (save with save_pretrained)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in charset():
        vocab[char] = len(vocab)
    # BPE without merges splits text into single characters and keeps exact offsets.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
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
    )
