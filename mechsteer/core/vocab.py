"""How a base model's token ids read in the thinking model's vocabulary.

The paper's pairs share their *ordinary* vocabulary (the BPE tokens and merges) and differ only in
their added tokens: Qwen2.5 has ``<|im_start|>``... where R1-Distill-Qwen has ``<｜User｜>``,
``<think>``... at the same ids, and TransformerLens adds ``<|endoftext|>`` to some tokenizers. Such
a pair can hand token ids over as they are (the *shared-id* path), through :func:`shared_id_map`:
the identity on ordinary tokens, and for an added base token the thinking id of the same text, or
-1 when the thinking vocabulary has none (a special token the re-encoding path drops too, since it
decodes with ``skip_special_tokens``).

Pairs with different ordinary vocabularies go through text: :func:`cross_tables` gives, per base
id, the class of its text (two tokens agree when their texts are equal) and the first thinking
token of that text (the id the guardrail scores).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


def adds_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether to let the tokenizer add its special tokens (a BOS) to ``text``: not when the text
    already starts with the BOS, as a rendered chat template does (R1 distills, Llama 3), which
    would otherwise start with two."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (isinstance(bos, str) and bos and text.startswith(bos))


def prepends_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS in front of plain text (``add_special_tokens=True``)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id is not None and bool(ids) and ids[0] == bos_id


def keep_own_bos(tokenizer: Any, own_prepends_bos: bool) -> None:
    """Make ``tokenizer`` (as TransformerLens set it up) add a BOS exactly when the model's own
    tokenizer does (``own_prepends_bos``, probed with :func:`prepends_bos` before the set-up); in place.

    TransformerLens reloads tokenizers with ``add_bos_token=True``: SmolLM2's would write
    ``<|im_start|>`` in front of every plain prompt, where Hugging Face ``generate``, vLLM and the
    paper's code write none. One rule for every path that tokenizes (generation, activations,
    optimisation, the hybrid, the engines): the model's own."""
    if prepends_bos(tokenizer) == own_prepends_bos:
        return
    tokenizer.add_bos_token = own_prepends_bos
    if prepends_bos(tokenizer) != own_prepends_bos:
        raise ValueError(f"cannot make {type(tokenizer).__name__} {'add' if own_prepends_bos else 'omit'} its BOS "
                         "as the model's own tokenizer does")


def added_tokens(tokenizer: Any) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of the tokenizer's added tokens (special tokens and the like)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {int(index): (token.content, bool(token.special)) for index, token in decoder.items()}


def ordinary_vocab(tokenizer: Any) -> dict[str, int]:
    """The vocabulary without added tokens: what ordinary text is split into."""
    added = {text for text, _ in added_tokens(tokenizer).values()}
    return {token: index for token, index in tokenizer.get_vocab().items() if token not in added}


def _merges(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    model = json.loads(backend.to_str()).get("model") or {}
    return [list(merge) if isinstance(merge, list | tuple) else merge.split(" ") for merge in model.get("merges") or []]


def tokenizers_compatible(base_tokenizer: Any, thinking_tokenizer: Any) -> bool:
    """True when the thinking model can read the base model's token ids (through
    :func:`shared_id_map`): every ordinary token is the same string at the same id, the BPE
    merges are the same (so text splits alike), and every *non-special* added base token exists
    in the thinking vocabulary (special ones that do not are dropped, as the re-encoding path
    drops them). Added and special tokens may otherwise differ, as they do in the paper's pairs."""
    if ordinary_vocab(base_tokenizer) != ordinary_vocab(thinking_tokenizer):
        return False
    if _merges(base_tokenizer) != _merges(thinking_tokenizer):
        return False
    thinking_vocab = thinking_tokenizer.get_vocab()
    return all(special or text in thinking_vocab for text, special in added_tokens(base_tokenizer).values())


def shared_id_map(base_tokenizer: Any, thinking_tokenizer: Any, base_vocab_size: int,
                  thinking_vocab_size: int) -> list[int]:
    """For each base id below ``base_vocab_size`` (the model's, which may exceed the tokenizer's),
    the thinking id it is read as, or -1 for none. Only meaningful for compatible tokenizers."""
    mapping = [index if index < thinking_vocab_size else -1 for index in range(base_vocab_size)]
    thinking_vocab = thinking_tokenizer.get_vocab()
    for index, (text, _) in added_tokens(base_tokenizer).items():
        if index < base_vocab_size:
            target = thinking_vocab.get(text, -1)
            mapping[index] = target if target < thinking_vocab_size else -1
    return mapping


@dataclass(frozen=True)
class CrossTables:
    """Per-id tables for a pair read through text (different ordinary vocabularies)."""

    base_text_class: list[int]  # base id -> id of its text (equal texts, equal classes)
    thinking_text_class: list[int]  # thinking id -> id of its text, or -2 when no base id has it
    base_first_thinking_id: list[int]  # base id -> first thinking token of its text, -1 if empty


def cross_tables(base_tokenizer: Any, thinking_tokenizer: Any, base_vocab_size: int,
                 thinking_vocab_size: int) -> CrossTables:
    """The tables the hybrid reads instead of decoding tokens one by one at every step.

    A token's text is ``decode([id])`` (special tokens kept), as :func:`agree` in the full-recompute
    reference compares them; the first thinking token is that of the text encoded without special
    tokens, as the reference scores a candidate.
    """
    base_texts = base_tokenizer.batch_decode([[index] for index in range(base_vocab_size)])
    thinking_texts = thinking_tokenizer.batch_decode([[index] for index in range(thinking_vocab_size)])
    classes: dict[str, int] = {}
    base_class = [classes.setdefault(text, len(classes)) for text in base_texts]
    thinking_class = [classes.get(text, -2) for text in thinking_texts]
    encoded = thinking_tokenizer(base_texts, add_special_tokens=False)["input_ids"]
    first = [ids[0] if ids and ids[0] < thinking_vocab_size else -1 for ids in encoded]
    return CrossTables(base_class, thinking_class, first)


__all__ = ["CrossTables", "added_tokens", "adds_special_tokens", "keep_own_bos", "prepends_bos", "cross_tables", "ordinary_vocab", "shared_id_map", "tokenizers_compatible"]
