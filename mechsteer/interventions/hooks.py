"""Typed residual-stream interventions and the hooks that apply them to a bridge model.

Three tensor functions do the work: :func:`add_direction` (steering), :func:`project_out`
(directional ablation) and :func:`mean_over_spans` (sentence pooling). The hook factories and
context managers below wire the first two into ``blocks.{L}.hook_{site}`` of a
``TransformerBridge``.

Positions and the KV cache
--------------------------
Steering positions are *absolute indices in each sequence's own tokens*: 0 is the sequence's
first real token, padding excluded. A hook only sees the tokens of the current forward call,
so a :class:`PositionFrame` tells it each input token's absolute position (the runner in
:mod:`mechsteer.interventions.generation` keeps it up to date). With a KV cache:

- prompt positions are steered once, during the prefill; later tokens read their steered
  keys/values from the cache, exactly as a full recompute with the same steering would;
- a generated position is steered when it is fed to the model (as the newest input token),
  and from then on only through the cache.

So steering any set of absolute positions with a cache is equivalent to a full recompute that
steers the same positions (tests/test_generation.py checks this token for token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mechsteer.core.models import ResidSite, resid_hook_name
from mechsteer.core.tensor_types import Bool, Float, Int, Tensor, typechecked

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@typechecked
def add_direction(
    resid: Float[Tensor, "batch pos d_model"],
    direction: Float[Tensor, " d_model"] | Float[Tensor, "batch d_model"],
    coeff: float | Float[Tensor, " batch"] = 1.0,
    position_mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """``resid + coeff * direction`` at the positions where ``position_mask`` is True (all if None).

    ``direction`` is one vector for every row or one per row; ``coeff`` is a scalar or one per row.
    """
    if direction.ndim == 1 and not isinstance(coeff, Tensor):
        # One vector for every row is broadcast, not expanded, so that a gradient through it (a
        # trained steering vector) sums over batch and positions in one reduction.
        delta = (direction * coeff).to(resid.dtype)
        if position_mask is not None:
            delta = position_mask[..., None].to(resid.dtype) * delta
        return resid + delta
    if direction.ndim == 1:
        direction = direction.expand(resid.shape[0], -1)
    if isinstance(coeff, Tensor):
        direction = direction * coeff[:, None]
    else:
        direction = direction * coeff
    delta = direction[:, None, :].to(resid.dtype)
    if position_mask is not None:
        delta = delta * position_mask[..., None].to(resid.dtype)
    return resid + delta


@typechecked
def project_out(
    resid: Float[Tensor, "*batch d_model"], direction: Float[Tensor, " d_model"]
) -> Float[Tensor, "*batch d_model"]:
    """Remove the component of ``resid`` along ``direction`` (directional ablation)."""
    unit = direction / direction.norm()
    unit = unit.to(resid.dtype)
    return resid - (resid @ unit)[..., None] * unit


@typechecked
def mean_over_spans(
    acts: Float[Tensor, "batch pos d_model"], spans: Int[Tensor, "n_spans 3"]
) -> Float[Tensor, "n_spans d_model"]:
    """Mean of ``acts[b, start:end]`` for each row ``(b, start, end)`` of ``spans`` (half-open).

    Uses a prefix sum in float64, so the cost is one pass over ``acts`` whatever the spans.
    """
    batch, n_pos, _ = acts.shape
    rows, starts, ends = spans[:, 0], spans[:, 1], spans[:, 2]
    if spans.shape[0] and (
        bool((rows < 0).any())
        or bool((rows >= batch).any())
        or bool((starts < 0).any())
        or bool((ends > n_pos).any())
        or bool((ends <= starts).any())
    ):
        raise ValueError(
            f"spans must satisfy 0 <= batch_index < {batch} and 0 <= start < end <= {n_pos}; "
            f"got {spans.tolist()}"
        )
    prefix = torch.zeros(batch, n_pos + 1, acts.shape[-1], dtype=torch.float64, device=acts.device)
    prefix[:, 1:] = acts.to(torch.float64).cumsum(dim=1)
    sums = prefix[rows, ends] - prefix[rows, starts]
    return (sums / (ends - starts)[:, None].to(torch.float64)).to(acts.dtype)


# --------------------------------------------------------------------------------------------
# Validation shared by every hook factory


def check_direction(model: TransformerBridge, direction: Tensor, name: str = "direction") -> None:
    d_model = model.cfg.d_model
    if direction.ndim != 1 or direction.shape[0] != d_model:
        raise ValueError(
            f"{name} must have shape (d_model,) = ({d_model},) for {model.cfg.model_name}; "
            f"got {tuple(direction.shape)}"
        )
    if not bool(torch.isfinite(direction).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def check_layer(model: TransformerBridge, layer: int) -> None:
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers - 1}] for {model.cfg.model_name}; got {layer}")


# --------------------------------------------------------------------------------------------
# Hooks


@dataclass
class PositionFrame:
    """Absolute positions of the tokens of the current forward call (see the module docstring).

    ``positions`` is (batch, n_new): each input token's index among its own sequence's real
    tokens, and -1 for padding. A runner with a KV cache sets it before every call; left as
    None, a call's tokens are positions 0..n-1 of unpadded sequences (a plain forward).
    """

    positions: Int[Tensor, "batch n_new"] | None = None

    def absolute_positions(self, batch: int, n_new: int, device: torch.device) -> Tensor:
        if self.positions is None:
            return torch.arange(n_new, device=device).expand(batch, -1)
        if tuple(self.positions.shape) != (batch, n_new):
            raise ValueError(
                f"position frame holds {tuple(self.positions.shape)} positions but the forward "
                f"call has (batch, n_new) = ({batch}, {n_new})"
            )
        return self.positions.to(device)


HookFn = Callable[[Tensor, object], Tensor]


class ResidSiteIntervention:
    """What every intervention at ``blocks.{layer}.hook_{site}`` shares: its hook name and the
    checks of its layer and direction against a model. Subclasses are dataclasses with
    ``layer``, ``direction`` and ``site`` fields and a ``make_hook(frame)``."""

    layer: int
    direction: Tensor
    site: ResidSite

    @property
    def hook_name(self) -> str:
        return resid_hook_name(self.layer, self.site)

    def validate(self, model: TransformerBridge) -> None:
        check_layer(model, self.layer)
        check_direction(model, self.direction)

    def make_hook(self, frame: PositionFrame) -> HookFn:
        raise NotImplementedError(f"{type(self).__name__} must define make_hook(frame)")


@dataclass
class Steering(ResidSiteIntervention):
    """Add ``coeff * direction`` to ``blocks.{layer}.hook_{site}`` at ``positions``.

    ``positions`` is None (every real position), or a sequence of absolute positions applied
    to every row (negative values never match).
    """

    layer: int
    direction: Float[Tensor, " d_model"]
    coeff: float = 1.0
    positions: Sequence[int] | None = None
    site: ResidSite = "resid_post"

    def __post_init__(self) -> None:
        # An int coefficient (coeff=4) is a natural thing to write; accept it here rather than
        # fail inside the forward pass with a type error.
        if isinstance(self.coeff, bool) or not isinstance(self.coeff, int | float):
            raise ValueError(f"coeff must be a number; got {self.coeff!r}")
        self.coeff = float(self.coeff)

    def make_hook(self, frame: PositionFrame) -> HookFn:
        def hook(resid: Tensor, hook: object) -> Tensor:
            batch, n_new, _ = resid.shape
            absolute = frame.absolute_positions(batch, n_new, resid.device)
            mask = absolute >= 0
            if self.positions is not None:
                wanted = torch.tensor(list(self.positions), device=resid.device)
                mask = mask & torch.isin(absolute, wanted)
            return add_direction(resid, self.direction.to(resid.device), self.coeff, mask)

        return hook


@dataclass
class Ablation(ResidSiteIntervention):
    """Project ``direction`` out of ``blocks.{layer}.hook_{site}`` at every position."""

    layer: int
    direction: Float[Tensor, " d_model"]
    site: ResidSite = "resid_post"

    def validate(self, model: TransformerBridge) -> None:
        super().validate(model)
        if float(self.direction.norm()) == 0.0:
            raise ValueError("cannot project out a zero direction")

    def make_hook(self, frame: PositionFrame) -> HookFn:
        def hook(resid: Tensor, hook: object) -> Tensor:
            return project_out(resid, self.direction.to(resid.device))

        return hook


# Anything that hooks one residual site: Steering, Ablation, or a caller's own subclass.
Intervention = ResidSiteIntervention


@dataclass
class InterventionSet:
    """Interventions plus the position frame their hooks read; reusable across forward calls."""

    interventions: list[Intervention] = field(default_factory=list)
    frame: PositionFrame = field(default_factory=PositionFrame)

    def hooks(self, model: TransformerBridge) -> list[tuple[str, HookFn]]:
        for intervention in self.interventions:
            intervention.validate(model)
        return [(item.hook_name, item.make_hook(self.frame)) for item in self.interventions]


@contextlib.contextmanager
def intervene(
    model: TransformerBridge,
    interventions: Sequence[Intervention],
    frame: PositionFrame | None = None,
) -> Iterator[InterventionSet]:
    """Apply steering and ablations to every forward call inside the ``with`` block.

    Yields the :class:`InterventionSet`, whose ``frame`` a caller running a KV cache updates
    before each call.
    """
    active = InterventionSet(list(interventions), frame or PositionFrame())
    with model.hooks(fwd_hooks=active.hooks(model)):
        yield active


def steer(
    model: TransformerBridge,
    direction: Tensor,
    layers: int | Sequence[int],
    coeff: float = 1.0,
    positions: Sequence[int] | None = None,
    site: ResidSite = "resid_post",
) -> contextlib.AbstractContextManager[InterventionSet]:
    """Context manager: add ``coeff * direction`` at one or more layers."""
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    return intervene(model, [Steering(layer, direction, coeff, positions, site) for layer in layer_list])


def ablate(
    model: TransformerBridge,
    direction: Tensor,
    layers: int | Sequence[int] | None = None,
    site: ResidSite = "resid_post",
) -> contextlib.AbstractContextManager[InterventionSet]:
    """Context manager: project ``direction`` out at the given layers (all layers if None)."""
    if layers is None:
        layer_list = list(range(model.cfg.n_layers))
    else:
        layer_list = [layers] if isinstance(layers, int) else list(layers)
    return intervene(model, [Ablation(layer, direction, site) for layer in layer_list])
