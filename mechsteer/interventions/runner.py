"""One model run incrementally over a padded batch with its KV cache: :class:`CachedRunner`.

Rows live in one padded layout: ``tokens``/``attention_mask`` of shape (batch, length) on the
model's input device, with padding (mask 0) wherever rows differ in length: at the left of the
prompts, and inside the sequence where rows received different numbers of tokens in one call
(ragged appends, rewinds, finished rows). Pads are never attended to, and position ids count
real tokens only, so every row computes exactly what it would alone.

The mask is mirrored on the host (``host_mask``): every change to it is known there already
(which rows got a token, how many), so the bookkeeping of rewinds and forks reads the mirror and
never waits for the device. Only token values stay device-only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mechsteer.core.models import HOST, input_device
from mechsteer.core.tensor_types import Bool, Float, Int, Tensor, typechecked
from mechsteer.interventions.hooks import PositionFrame

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def pad_token_id(model: TransformerBridge) -> int:
    tokenizer = model.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def left_pad_host(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists on the host into (tokens, real-token mask as bool)."""
    longest = max(len(ids) for ids in token_ids)
    tokens = torch.full((len(token_ids), longest), pad_id, dtype=torch.long, device=HOST)
    mask = torch.zeros((len(token_ids), longest), dtype=torch.bool, device=HOST)
    for row, ids in enumerate(token_ids):
        if ids:
            tokens[row, longest - len(ids) :] = torch.tensor(list(ids), dtype=torch.long, device=HOST)
            mask[row, longest - len(ids) :] = True
    return tokens, mask


@typechecked
def left_pad(
    token_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Left-pad token lists into (tokens, attention_mask, n_pad) on ``device``."""
    tokens, mask = left_pad_host(token_ids, pad_id)
    n_pad = mask.shape[1] - mask.sum(dim=1)
    return tokens.to(device), mask.long().to(device), n_pad.to(device)


@typechecked
def position_ids_for(attention_mask: Int[Tensor, "batch total"], n_new: int) -> Int[Tensor, "batch n_new"]:
    """Positions of the last ``n_new`` tokens, counting real tokens only (pads get 0)."""
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return positions[:, -n_new:]


class CachedRunner:
    """Runs one model incrementally over a padded batch, keeping its KV cache (module docstring).

    ``frame`` tells steering hooks the absolute position of each token of the current call. The
    plain generator uses one; the hybrid generator two, and forks of the base model's.
    """

    def __init__(self, model: TransformerBridge, token_ids: Sequence[Sequence[int]]):
        self.model = model
        self.pad_id = pad_token_id(model)
        self.device = input_device(model)
        tokens, mask = left_pad_host(token_ids, self.pad_id)
        self.tokens = tokens.to(self.device)
        self.attention_mask = mask.long().to(self.device)
        self.host_mask = mask
        self.frame = PositionFrame()
        self.cache = None
        self.n_fed = 0  # padded positions already in the cache
        self._real_column: tuple[tuple[bool, ...], Tensor] | None = None  # the last append's mask column
        self.host_mirror_exact = True

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_pending(self) -> int:
        return int(self.tokens.shape[1]) - self.n_fed

    def n_real(self) -> list[int]:
        self._check_mirror()
        return self.host_mask.sum(dim=1).tolist()

    def forward(self, *, last_only: bool = False) -> Float[Tensor, "batch pos vocab"]:
        """Feed the pending tokens; return their logits (``last_only``: the last position's only,
        so that no full-vocabulary logits are computed for the others) and extend the cache."""
        n_new = self.n_pending
        if n_new <= 0:
            raise ValueError("no pending tokens to feed")
        mask = self.attention_mask
        positions = position_ids_for(mask, n_new)
        self.frame.positions = torch.where(mask[:, -n_new:].bool(), positions, -1)
        extra = {"logits_to_keep": 1} if last_only else {}
        logits, self.cache = self.model(
            self.tokens[:, self.n_fed :],
            return_type="logits_and_cache",
            past_key_values=self.cache,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **extra,
        )
        self.n_fed = int(self.tokens.shape[1])
        return logits

    def append(self, new_tokens: Int[Tensor, " batch"], real: Sequence[bool] | None = None,
               valid: Bool[Tensor, " batch"] | None = None) -> None:
        """Queue one token per row for the next forward (``real[row]`` False: a masked filler).

        ``valid`` (on the device) masks further rows whose token the host does not know yet;
        the host mirror then over-counts those rows, and the host-side bookkeeping (rewind,
        forks, n_real) refuses to run on it.
        """
        column = new_tokens[:, None].to(self.device)
        flags = tuple(bool(flag) for flag in real) if real is not None else (True,) * self.batch_size
        host_column = torch.tensor(flags, dtype=torch.bool, device=HOST)[:, None]
        if self._real_column is None or self._real_column[0] != flags:
            # rows finish rarely: the device copy of the mask column is made only when it changes
            self._real_column = (flags, host_column.long().to(self.device))
        mask_column = self._real_column[1]
        if valid is not None:
            mask_column = mask_column * valid[:, None].to(self.device).long()
            self.host_mirror_exact = False
        self.tokens = torch.cat([self.tokens, column], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, mask_column], dim=1)
        self.host_mask = torch.cat([self.host_mask, host_column], dim=1)

    def drop_last_column(self) -> None:
        """Undo the last one-token :meth:`append` (and its forward, if fed): the column leaves the
        queue or the cache, as if it had never been appended."""
        if self.tokens.shape[1] == 0:
            raise ValueError("no column to drop")
        self.tokens = self.tokens[:, :-1]
        self.attention_mask = self.attention_mask[:, :-1]
        self.host_mask = self.host_mask[:, :-1]
        if self.n_fed > self.tokens.shape[1]:
            self.n_fed = int(self.tokens.shape[1])
            if self.n_fed == 0:
                self.cache = None
            elif self.cache is not None:
                self.cache.crop(-(self.cache.get_seq_length() - self.n_fed))  # transformers 5.x: drop the last n

    def unfeed_last_column(self) -> None:
        """Make the last fed column pending again (out of the cache, still queued): the next forward
        recomputes it, e.g. under a different steering, together with whatever is appended."""
        if self.n_pending != 0 or self.n_fed == 0:
            raise ValueError("unfeed_last_column needs a fed last column and nothing pending")
        self.n_fed -= 1
        if self.n_fed == 0:
            self.cache = None
        elif self.cache is not None:
            self.cache.crop(-(self.cache.get_seq_length() - self.n_fed))  # transformers 5.x: drop the last n

    def last_real_column(self) -> Bool[Tensor, " batch"]:
        """Which rows got a real token in the last column (on the device)."""
        return self.attention_mask[:, -1].bool()

    def _check_mirror(self) -> None:
        if not self.host_mirror_exact:
            raise RuntimeError("this runner's host mask is not exact (append(valid=...)); "
                               "rewinds and forks need it")

    def append_ragged(self, suffixes: Sequence[Sequence[int]]) -> None:
        """Queue a different number of tokens per row, left-padded (masked) within the chunk."""
        if len(suffixes) != self.batch_size:
            raise ValueError(f"need one suffix per row ({self.batch_size}); got {len(suffixes)}")
        if not any(suffixes):
            return
        chunk, chunk_mask = left_pad_host([list(s) for s in suffixes], self.pad_id)
        self.tokens = torch.cat([self.tokens, chunk.to(self.device)], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, chunk_mask.long().to(self.device)], dim=1)
        self.host_mask = torch.cat([self.host_mask, chunk_mask], dim=1)

    def rewind(self, keep: Sequence[int]) -> None:
        """Keep the first ``keep[row]`` real tokens of each row and drop the rest.

        The cache is cropped at the earliest cut over the rows; kept tokens after that point
        are queued again (ragged, gathered on the device), so the next forward recomputes only them.
        """
        length = int(self.tokens.shape[1])
        cuts = []
        for row, (count, kept) in enumerate(zip(self.n_real(), keep, strict=True)):
            if not 0 <= kept <= count:
                raise ValueError(f"row {row}: cannot keep {kept} of {count} real tokens")
            real_columns = self.host_mask[row].nonzero().flatten()
            cuts.append(int(real_columns[kept]) if kept < count else length)
        crop = min(min(cuts), self.n_fed)
        columns = [(self.host_mask[row, crop:cut].nonzero().flatten() + crop).tolist() for row, cut in enumerate(cuts)]
        chunk = None
        if any(columns):
            index, chunk_mask = left_pad_host(columns, 0)
            device_mask = chunk_mask.to(self.device)
            chunk = torch.where(device_mask, self.tokens.gather(1, index.to(self.device)), self.pad_id)
        self.tokens = self.tokens[:, :crop]
        self.attention_mask = self.attention_mask[:, :crop]
        self.host_mask = self.host_mask[:, :crop]
        if crop == 0:
            self.cache = None  # an emptied cache object would ignore later batch reshapes
        elif self.cache is not None:
            # transformers 5.x: crop(-n) removes the last n cached positions
            surplus = self.cache.get_seq_length() - crop
            if surplus > 0:
                self.cache.crop(-surplus)
        self.n_fed = crop
        if chunk is not None:
            self.tokens = torch.cat([self.tokens, chunk], dim=1)
            self.attention_mask = torch.cat([self.attention_mask, device_mask.long()], dim=1)
            self.host_mask = torch.cat([self.host_mask, chunk_mask], dim=1)

    def fork_window(self, rows: Sequence[int], window: int) -> tuple[CachedRunner, Bool[Tensor, "fork pending"]]:
        """An independent copy of ``rows`` (repeats allowed) whose last ``window`` real tokens
        (0: all of them) are pending again, to be recomputed (steered) by its next forward.

        Returns the copy and, on the device, which of its pending positions are in the window.
        The copy's cache is cropped before its rows are selected, so it holds only the positions
        before the window's first column: the extra memory is rows x that length, and the next
        forward recomputes rows x (the widest of these rows' windows, plus interior pads).
        """
        self._check_mirror()
        host = self.host_mask[list(rows)]
        counts = host.sum(dim=1)
        limit = counts if window == 0 else counts.clamp(max=window)
        from_end = host.flip(1).cumsum(dim=1).flip(1)  # real tokens at or after each column
        in_window = host & (from_end <= limit[:, None])
        crop = min(int(in_window.float().argmax(dim=1).min()), self.n_fed)
        twin = copy.copy(self)
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        twin.tokens = self.tokens.index_select(0, index)
        twin.attention_mask = self.attention_mask.index_select(0, index)
        twin.host_mask = host
        twin.frame = PositionFrame()
        twin._real_column = None
        twin.cache = None
        twin.n_fed = 0
        if crop > 0 and self.cache is not None:
            # Shallow copies suffice: cache layers only ever rebind their tensors (slice, index),
            # never write into them, so the copy's changes cannot reach this runner.
            twin.cache = copy.copy(self.cache)
            twin.cache.layers = [copy.copy(layer) for layer in self.cache.layers]
            surplus = twin.cache.get_seq_length() - crop
            if surplus > 0:
                twin.cache.crop(-surplus)
            twin.cache.batch_select_indices(index)
            twin.n_fed = crop
        return twin, in_window[:, twin.n_fed :].to(self.device)

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in this order), e.g. dropping rows that finished generating."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.tokens = self.tokens.index_select(0, index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.host_mask = self.host_mask[list(rows)]
        self._real_column = None
        if self.cache is not None:
            self.cache.batch_select_indices(index)


__all__ = ["CachedRunner", "left_pad", "left_pad_host", "pad_token_id", "position_ids_for"]
