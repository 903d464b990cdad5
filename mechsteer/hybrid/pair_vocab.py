"""How the pair's tokens read across the two models: :class:`PairVocab` (base ids as thinking ids,
or token-text classes, as tables on the thinking model's device), and for pairs whose tokenizers
differ, :class:`ThinkingText` (the thinking model's canonical tokenization of the growing text) and
:class:`IncrementalDecoder` (the text of each new base token)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mechsteer.core.models import input_device
from mechsteer.core.tensor_types import Tensor
from mechsteer.core.vocab import cross_tables, shared_id_map

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


class PairVocab:
    """How base token ids read for the thinking model, as tables on the thinking model's device.

    Shared ordinary vocabulary: base id -> thinking id (-1: a special token the thinking model has
    not, dropped). Otherwise: the class of each token's text (tokens agree when their texts are
    equal) and the first thinking token of a base token's text (what the guardrail scores).
    """

    def __init__(self, base: TransformerBridge, thinking: TransformerBridge, shared: bool):
        self.shared = shared
        self.device = input_device(thinking)
        sizes = (int(base.cfg.d_vocab), int(thinking.cfg.d_vocab))
        if shared:
            mapping = shared_id_map(base.tokenizer, thinking.tokenizer, *sizes)
            self.to_thinking = torch.tensor(mapping, dtype=torch.long, device=self.device)
            # thinking id -> base id (-1: a thinking token the base vocabulary lacks)
            self.to_base = torch.full((sizes[1],), -1, dtype=torch.long, device=self.device)
            valid = self.to_thinking >= 0
            base_ids = torch.arange(sizes[0], dtype=torch.long, device=self.device)
            self.to_base[self.to_thinking[valid]] = base_ids[valid]
        else:
            tables = cross_tables(base.tokenizer, thinking.tokenizer, *sizes)
            self.base_class = torch.tensor(tables.base_text_class, dtype=torch.long, device=self.device)
            self.thinking_class = torch.tensor(tables.thinking_text_class, dtype=torch.long, device=self.device)
            self.to_thinking = torch.tensor(tables.base_first_thinking_id, dtype=torch.long, device=self.device)

    def agree(self, base_tokens: Tensor, thinking_tokens: Tensor) -> Tensor:
        """Whether each row's base and thinking greedy tokens are the same token (or text)."""
        base_tokens = base_tokens.to(self.device)
        if self.shared:
            return self.to_thinking[base_tokens] == thinking_tokens
        return self.base_class[base_tokens] == self.thinking_class[thinking_tokens]

    def thinking_ids(self, base_tokens: Tensor) -> Tensor:
        """The thinking id a base token is read (shared) or scored (cross) as; -1 for none."""
        return self.to_thinking[base_tokens.to(self.device)]


class ThinkingText:
    """The thinking model's view of the generated text when its tokenizer differs."""

    def __init__(self, tokenizer, n_rows: int, lookback_tokens: int):
        self.tokenizer = tokenizer
        self.lookback = lookback_tokens
        self.text = [""] * n_rows
        self.ids: list[list[int]] = [[] for _ in range(n_rows)]
        self.starts: list[list[int]] = [[] for _ in range(n_rows)]  # char start of each token

    def extend(self, row: int, piece: str) -> tuple[int, list[int]]:
        """Add ``piece`` to the row's text. Returns (generated tokens kept, new token ids)."""
        self.text[row] += piece
        first = max(0, len(self.ids[row]) - self.lookback)
        char_start = self.starts[row][first] if first < len(self.starts[row]) else len(self.text[row]) - len(piece)
        encoded = self.tokenizer(self.text[row][char_start:], add_special_tokens=False, return_offsets_mapping=True)
        new_ids = list(encoded["input_ids"])
        new_starts = [char_start + start for start, _ in encoded["offset_mapping"]]
        old_ids = self.ids[row][first:]
        same = 0
        while same < min(len(old_ids), len(new_ids)) and old_ids[same] == new_ids[same]:
            same += 1
        kept = first + same
        self.ids[row] = self.ids[row][:kept] + new_ids[same:]
        self.starts[row] = self.starts[row][:kept] + new_starts[same:]
        return kept, new_ids[same:]


class IncrementalDecoder:
    """Text of each newly generated base token, robust to multi-token characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def piece(self, ids: list[int]) -> str:
        window = ids[-6:]
        before = self.tokenizer.decode(window[:-1], skip_special_tokens=True)
        after = self.tokenizer.decode(window, skip_special_tokens=True)
        if after.startswith(before):
            return after[len(before) :]
        full_before = self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)[len(full_before) :]


__all__ = ["IncrementalDecoder", "PairVocab", "ThinkingText"]
