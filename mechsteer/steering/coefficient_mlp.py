"""The learned steering coefficient: a small MLP from the base model's residual to a non-negative
strength, one output per behaviour (the paper's current method, the reference's ``CatCoefMLP``).

``shared``: ``softplus(head[c](GELU(Linear(h))))``, one trunk for all behaviours and one linear
head per behaviour; ``per_behaviour``: an independent ``Linear -> GELU -> Linear`` per behaviour.
``h`` is the base model's ``resid_post`` at the steering layer at the position being steered,
before the shift is added. Weights start Xavier-uniform with biases 0.5 (as the reference's), so
the first coefficients are near ``softplus(0.5) ~ 1``.

Called as ``mlp(resid, behaviours)`` with ``resid`` ``(batch, d_model)`` and ``behaviours`` the
behaviour ids (as in :attr:`~mechsteer.steering.direction_set.DirectionSet.behaviour_ids`), it
returns ``(batch,)`` coefficients; an id without a head is refused. Saved as
``coefficient_mlp.json`` + ``coefficient_mlp.safetensors`` (it can share a folder with a direction set).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from mechsteer.core.artefacts import ArtefactFormat, load_artefact, save_artefact
from mechsteer.core.errors import ArtefactError
from mechsteer.core.tensor_types import Float, Int, Tensor

CoefficientArchitecture = Literal["shared", "per_behaviour"]
COEFFICIENT_ARCHITECTURES: tuple[str, ...] = get_args(CoefficientArchitecture)
MLP_FORMAT = ArtefactFormat(name="mechsteer.coefficient_mlp", version=1, json_file="coefficient_mlp.json",
                            tensors_file="coefficient_mlp.safetensors", kind="CoefficientMLP")


class CoefficientMLP(nn.Module):
    """Per-behaviour non-negative coefficients from the residual (see the module docstring)."""

    def __init__(self, d_model: int, behaviour_ids: Sequence[int], hidden: int = 128,
                 architecture: CoefficientArchitecture = "shared", *, seed: int = 0,
                 provenance: dict[str, Any] | None = None) -> None:
        super().__init__()
        if architecture not in COEFFICIENT_ARCHITECTURES:
            raise ValueError(f"architecture must be one of {COEFFICIENT_ARCHITECTURES}; got {architecture!r}")
        ids = [int(b) for b in behaviour_ids]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
            raise ValueError(f"behaviour_ids must be distinct non-negative ids, at least one; got {ids}")
        if d_model < 1 or hidden < 1:
            raise ValueError(f"d_model and hidden must be >= 1; got {d_model}, {hidden}")
        self.d_model, self.hidden, self.architecture = d_model, hidden, architecture
        self.behaviour_ids = ids
        self.provenance = dict(provenance or {})
        row_of = torch.full((max(ids) + 1,), -1, dtype=torch.long)
        row_of[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("row_of", row_of, persistent=False)
        generator = torch.Generator().manual_seed(seed)
        n = len(ids)
        if architecture == "shared":
            self.trunk_weight = nn.Parameter(_xavier((hidden, d_model), generator))
            self.trunk_bias = nn.Parameter(torch.full((hidden,), 0.5))
        else:
            self.trunk_weight = nn.Parameter(torch.stack([_xavier((hidden, d_model), generator) for _ in range(n)]))
            self.trunk_bias = nn.Parameter(torch.full((n, hidden), 0.5))
        self.head_weight = nn.Parameter(torch.stack([_xavier((1, hidden), generator)[0] for _ in range(n)]))
        self.head_bias = nn.Parameter(torch.full((n,), 0.5))

    def rows(self, behaviours: Int[Tensor, " batch"]) -> Int[Tensor, " batch"]:
        """Each behaviour id's head; an id without one raises ValueError naming it."""
        table: Tensor = self.row_of  # type: ignore[assignment]
        behaviours = behaviours.to(table.device).long()
        inside = (behaviours >= 0) & (behaviours < table.numel())
        rows = torch.where(inside, table[behaviours.clamp(0, table.numel() - 1)], torch.full_like(behaviours, -1))
        if bool((rows < 0).any()):
            unknown = sorted(set(behaviours[rows < 0].tolist()))
            raise ValueError(f"no coefficient head for behaviour ids {unknown}; this MLP has {self.behaviour_ids}")
        return rows

    def forward(self, resid: Float[Tensor, "batch d_model"], behaviours: Int[Tensor, " batch"]
                ) -> Float[Tensor, " batch"]:
        if resid.ndim != 2 or resid.shape[-1] != self.d_model or behaviours.shape != resid.shape[:1]:
            raise ValueError(f"need resid (batch, {self.d_model}) and behaviours (batch,); got "
                             f"{tuple(resid.shape)} and {tuple(behaviours.shape)}")
        rows = self.rows(behaviours)
        h = resid.to(self.head_weight.dtype)
        if self.architecture == "shared":
            features = nn.functional.gelu(nn.functional.linear(h, self.trunk_weight, self.trunk_bias))
            raw = (features * self.head_weight[rows]).sum(-1) + self.head_bias[rows]
        else:
            # one trunk per behaviour, applied to that behaviour's rows only (a gathered
            # (batch, hidden, d_model) weight would not fit for wide models)
            raw = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
            for row in torch.unique(rows).tolist():
                chosen = rows == row
                features = nn.functional.gelu(
                    nn.functional.linear(h[chosen], self.trunk_weight[row], self.trunk_bias[row]))
                raw = raw.index_put((chosen.nonzero().flatten(),),
                                    features @ self.head_weight[row] + self.head_bias[row])
        return nn.functional.softplus(raw)

    # ---- files

    def save(self, directory: str | Path) -> Path:
        metadata = {"d_model": self.d_model, "hidden": self.hidden, "architecture": self.architecture,
                    "behaviour_ids": self.behaviour_ids, "provenance": self.provenance}
        return save_artefact(directory, MLP_FORMAT, metadata, {name: p.detach().float() for name, p in
                                                               self.named_parameters()})

    @classmethod
    def load(cls, directory: str | Path) -> CoefficientMLP:
        metadata, tensors = load_artefact(directory, MLP_FORMAT)
        try:
            mlp = cls(metadata["d_model"], metadata["behaviour_ids"], metadata["hidden"], metadata["architecture"],
                      provenance=metadata["provenance"])
            mlp.load_state_dict(tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ArtefactError(f"{Path(directory) / MLP_FORMAT.json_file} does not describe its tensors "
                                f"({type(error).__name__}: {error}); train the coefficient MLP again") from None
        return mlp


def _xavier(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    fan_out, fan_in = shape
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


__all__ = ["COEFFICIENT_ARCHITECTURES", "MLP_FORMAT", "CoefficientArchitecture", "CoefficientMLP"]
