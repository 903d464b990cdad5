"""The ``DirectionSet`` artefact: one steering direction per behaviour (and a bias) in the base model.

Every direction lives at one hook site, ``blocks.{L}.hook_resid_post`` (the output of block
L), for derivation, training and injection alike. (The paper's reference code trains its
optimised vectors with a pre-hook on block L, i.e. ``resid_pre`` of L, but injects them at
block L's output; we use ``resid_post`` of L for both.) The methods that make a set are
:mod:`mechsteer.steering.mean`, :mod:`mechsteer.steering.sae_map` and
:mod:`mechsteer.steering.optimise`.

On disk a set is ``directions.safetensors`` (``directions`` and, if any, ``bias``) plus
``directions.json`` (model name, d_model, n_layers, layer, site, method, behaviour ids,
titles, norms, provenance), read and written through :mod:`mechsteer.core.artefacts`.

A set applies itself to a model as a context manager, like steering-vectors'
``SteeringVector.apply()``: :meth:`DirectionSet.steer` adds one behaviour's direction and
:meth:`DirectionSet.ablate` projects directions out, both through the interventions of
:mod:`mechsteer.interventions.hooks`; the hooks are removed when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from mechsteer.core.artefacts import ArtefactFormat, load_artefact, save_artefact
from mechsteer.core.errors import ArtefactError, ProvenanceError
from mechsteer.core.models import resid_hook_name
from mechsteer.core.plugins import load_plugins
from mechsteer.core.provenance import recorded_location, recorded_path, same_model
from mechsteer.core.resident import ModelInfo
from mechsteer.core.tensor_types import Float, Tensor
from mechsteer.interventions.hooks import (
    Ablation,
    InterventionSet,
    PositionFrame,
    Steering,
    intervene,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# The built-in methods' names (a plug-in's method may take any registered name).
DirectionMethod = Literal["mean", "sae", "optimised", "random", "correction"]
# What DirectionSet.random_like matches the random vectors' norms to (see there).
RandomMatch = Literal["parts", "added", "keep_bias"]
Site = Literal["resid_post"]
SITE: Site = "resid_post"

# The methods a set may name: "random" (DirectionSet.random_like's controls), "correction"
# (mechsteer.steering.correction's trained sets, which come with a coefficient MLP and so are not
# built through the direction-method registry) and every method registered with
# mechsteer.steering.methods.register_direction_method, which adds its name here.
_SET_METHODS: list[str] = ["random", "correction"]


def add_set_method(name: str) -> None:
    """Let sets name ``name`` as their method (:func:`mechsteer.steering.methods.register_direction_method` calls it)."""
    if "+" in name or not name:
        raise ValueError(f"a direction method's name must be non-empty and without '+' (sums use it); got {name!r}")
    if name not in _SET_METHODS:
        _SET_METHODS.append(name)


def set_method_names() -> tuple[str, ...]:
    """The methods a :class:`DirectionSet` may name (plug-ins loaded)."""
    load_plugins()
    return tuple(_SET_METHODS)


DIRECTIONS_FORMAT = ArtefactFormat(name="mechsteer.direction_set", version=1, json_file="directions.json",
                                   tensors_file="directions.safetensors", kind="DirectionSet")
# Provenance keys naming the folders a set was built from (the traces, the taxonomy its labels came from).
PROVENANCE_PATHS = ("traces", "base_traces", "taxonomy")


@dataclass
class DirectionSet:
    """One steering direction per behaviour (and an optional bias) at ``resid_post`` of ``layer``."""

    model_name: str
    d_model: int
    n_layers: int
    layer: int
    site: Site
    method: str  # a registered method (set_method_names), or several joined with "+" (a sum of sets)
    behaviour_ids: list[int]
    titles: list[str]
    directions: Float[Tensor, "n_behaviours d_model"]
    bias: Float[Tensor, " d_model"] | None = None
    provenance: dict = field(default_factory=dict)  # its PROVENANCE_PATHS on disk relative to the set's folder

    def __post_init__(self) -> None:
        self.behaviour_ids = [int(b) for b in self.behaviour_ids]
        self.titles = [str(t) for t in self.titles]
        n = len(self.behaviour_ids)
        if self.site != SITE:
            raise ValueError(f"site must be {SITE!r} (the one site used for training and injection); got {self.site!r}")
        parts = self.method.split("+")
        if any(part not in _SET_METHODS for part in parts):
            load_plugins()  # a plug-in's method: its set is known once the plug-in registered it
        if any(part not in _SET_METHODS for part in parts):
            raise ValueError(f"method must be one of {set_method_names()} (or a '+'-joined sum); got {self.method!r}")
        if not 0 <= self.layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers - 1}]; got {self.layer}")
        if len(set(self.behaviour_ids)) != n:
            raise ValueError(f"behaviour_ids must be unique; got {self.behaviour_ids}")
        if len(self.titles) != n:
            raise ValueError(f"need one title per behaviour ({n}); got {len(self.titles)}")
        if not isinstance(self.directions, Tensor) or tuple(self.directions.shape) != (n, self.d_model):
            shape = tuple(self.directions.shape) if isinstance(self.directions, Tensor) else type(self.directions)
            raise ValueError(f"directions must have shape (n_behaviours, d_model) = ({n}, {self.d_model}); got {shape}")
        self.directions = self.directions.detach().float().cpu()
        if self.bias is not None:
            if tuple(self.bias.shape) != (self.d_model,):
                raise ValueError(f"bias must have shape (d_model,) = ({self.d_model},); got {tuple(self.bias.shape)}")
            self.bias = self.bias.detach().float().cpu()
        if not bool(torch.isfinite(self.directions).all()) or (
            self.bias is not None and not bool(torch.isfinite(self.bias).all())
        ):
            raise ValueError("directions and bias must be finite (no nan or inf)")

    # ---- lookup

    @property
    def n_behaviours(self) -> int:
        return len(self.behaviour_ids)

    @property
    def hook_name(self) -> str:
        return resid_hook_name(self.layer, self.site)

    @property
    def norms(self) -> Float[Tensor, " n_behaviours"]:
        return self.directions.norm(dim=-1)

    def index_of(self, behaviour_id: int) -> int:
        try:
            return self.behaviour_ids.index(int(behaviour_id))
        except ValueError:
            raise ValueError(
                f"unknown behaviour id {behaviour_id!r}; this set has {self.behaviour_ids} "
                f"({', '.join(f'{b}={t!r}' for b, t in zip(self.behaviour_ids, self.titles, strict=True))})"
            ) from None

    def direction(self, behaviour_id: int) -> Float[Tensor, " d_model"]:
        return self.directions[self.index_of(behaviour_id)]

    def title(self, behaviour_id: int) -> str:
        return self.titles[self.index_of(behaviour_id)]

    def check_model(self, model: TransformerBridge | ModelInfo, *, allow_other_name: bool = False) -> None:
        """Raise :class:`ProvenanceError` (a ValueError) unless this set fits ``model`` (d_model,
        layer range, model name).

        ``allow_other_name`` accepts a model of another name with the same shape, e.g. a
        thinking model that shares the base model's residual basis.
        """
        cfg = model.cfg
        if cfg.d_model != self.d_model:
            raise ProvenanceError(
                f"direction set has d_model={self.d_model} (model {self.model_name!r}) but "
                f"{cfg.model_name!r} has d_model={cfg.d_model}; make the directions in {cfg.model_name!r}"
            )
        if not 0 <= self.layer < cfg.n_layers:
            raise ProvenanceError(
                f"direction set is at layer {self.layer}, outside [0, {cfg.n_layers - 1}] of {cfg.model_name!r}; "
                f"make the directions in {cfg.model_name!r}"
            )
        if not allow_other_name and not same_model(self.model_name, cfg.model_name):
            raise ProvenanceError(
                f"direction set was made for {self.model_name!r}, not {cfg.model_name!r}; pass the set made "
                "in this model, or allow_other_name=True (--allow-other-model) to apply it anyway"
            )

    # ---- arithmetic (each returns a new set with provenance updated)

    def _derived(self, directions: Tensor, bias: Tensor | None, operation: dict[str, Any],
                 method: str | None = None) -> DirectionSet:
        provenance = dict(self.provenance)
        provenance["history"] = [*self.provenance.get("history", []), operation]
        return dataclasses.replace(
            self, directions=directions.clone(), bias=None if bias is None else bias.clone(),
            method=method or self.method, provenance=provenance,
            behaviour_ids=list(self.behaviour_ids), titles=list(self.titles),
        )

    def scaled(self, coeff: float) -> DirectionSet:
        """Directions and bias times ``coeff``."""
        bias = None if self.bias is None else self.bias * coeff
        return self._derived(self.directions * coeff, bias, {"op": "scaled", "coeff": float(coeff)})

    def added(self, other: DirectionSet) -> DirectionSet:
        """Behaviour-wise sum with ``other`` (same behaviours, layer, site, d_model); a missing bias counts as 0."""
        for name in ("d_model", "layer", "site", "behaviour_ids"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"cannot add direction sets with different {name}: "
                                 f"{getattr(self, name)!r} != {getattr(other, name)!r}")
        if self.bias is None and other.bias is None:
            bias = None
        else:
            zero = torch.zeros(self.d_model)
            bias = (self.bias if self.bias is not None else zero) + (other.bias if other.bias is not None else zero)
        method = self.method if self.method == other.method else f"{self.method}+{other.method}"
        return self._derived(self.directions + other.directions, bias,
                             {"op": "added", "other_method": other.method, "other_provenance": other.provenance},
                             method=method)

    def normalised(self) -> DirectionSet:
        """Every direction (and the bias, if nonzero) scaled to unit norm."""
        if bool((self.norms == 0).any()):
            zero = [b for b, n in zip(self.behaviour_ids, self.norms.tolist(), strict=True) if n == 0]
            raise ValueError(f"cannot normalise zero directions (behaviours {zero})")
        bias = self.bias
        if bias is not None and float(bias.norm()) > 0:
            bias = bias / bias.norm()
        return self._derived(self.directions / self.norms[:, None], bias, {"op": "normalised"})

    def subset(self, behaviour_ids: Sequence[int]) -> DirectionSet:
        """Only ``behaviour_ids``, in that order (the bias is kept)."""
        rows = [self.index_of(b) for b in behaviour_ids]
        if not rows or len(set(rows)) != len(rows):
            raise ValueError(f"subset needs distinct behaviour ids, at least one; got {list(behaviour_ids)}")
        chosen = dataclasses.replace(self, behaviour_ids=[self.behaviour_ids[r] for r in rows],
                                     titles=[self.titles[r] for r in rows], directions=self.directions[rows])
        return chosen._derived(chosen.directions, chosen.bias, {"op": "subset", "behaviour_ids": chosen.behaviour_ids})

    def random_like(self, seed: int, match: RandomMatch = "parts") -> DirectionSet:
        """Norm-matched random controls: one Gaussian direction per behaviour.

        ``parts``: each direction has its behaviour direction's norm, and the bias (if any) is a
        random vector of the bias's norm. ``added``: each direction has the norm of
        ``bias + direction`` (what the hybrid adds per unit coefficient for that behaviour) and the
        set has no bias, so that steering with it adds a random vector of exactly that norm.
        ``keep_bias``: each direction has its behaviour direction's norm and the set keeps its own
        bias, so that only the behaviour directions are random.
        """
        if match not in get_args(RandomMatch):
            raise ValueError(f"match must be one of {get_args(RandomMatch)}; got {match!r}")
        generator = torch.Generator().manual_seed(seed)
        raw = torch.randn(self.n_behaviours, self.d_model, generator=generator)
        if match == "added" and self.bias is not None:
            norms = (self.directions + self.bias).norm(dim=-1)
        else:
            norms = self.norms
        directions = raw / raw.norm(dim=-1, keepdim=True) * norms[:, None]
        bias = self.bias.clone() if match == "keep_bias" and self.bias is not None else None
        if match == "parts" and self.bias is not None:
            raw_bias = torch.randn(self.d_model, generator=generator)
            bias = raw_bias / raw_bias.norm() * self.bias.norm()
        return self._derived(directions, bias, {"op": "random_like", "seed": int(seed), "match": match,
                                                "source_method": self.method}, method="random")

    # ---- applying to a model

    def steering_vector(self, behaviour_id: int, *, with_bias: bool = False) -> Float[Tensor, " d_model"]:
        """The behaviour's direction, plus the bias with ``with_bias`` (how optimised vectors were trained)."""
        if not with_bias:
            return self.direction(behaviour_id)
        if self.bias is None:
            raise ValueError("with_bias needs a direction set with a bias")
        return self.direction(behaviour_id) + self.bias

    def steer(
        self,
        model: TransformerBridge,
        behaviour_id: int,
        coeff: float = 1.0,
        *,
        positions: Sequence[int] | None = None,
        frame: PositionFrame | None = None,
        with_bias: bool = False,
        allow_other_name: bool = False,
    ) -> contextlib.AbstractContextManager[InterventionSet]:
        """Context manager: add ``coeff * direction`` of ``behaviour_id`` at the set's layer and site.

        ``positions`` are absolute positions (None: every real position), ``frame`` the
        :class:`~mechsteer.interventions.hooks.PositionFrame` a KV-cache runner updates;
        ``with_bias`` adds ``coeff * (bias + direction)``. The model is checked against the set
        (:meth:`check_model`) before any hook is added.
        """
        self.check_model(model, allow_other_name=allow_other_name)
        vector = self.steering_vector(behaviour_id, with_bias=with_bias)
        return intervene(model, [Steering(self.layer, vector, coeff, positions, self.site)], frame)

    def ablate(
        self,
        model: TransformerBridge,
        behaviour_ids: Sequence[int] | None = None,
        *,
        layers: int | Sequence[int] | None = None,
        frame: PositionFrame | None = None,
        allow_other_name: bool = False,
    ) -> contextlib.AbstractContextManager[InterventionSet]:
        """Context manager: project the directions of ``behaviour_ids`` (all if None) out of the residual.

        At the set's layer, or at ``layers``; with several behaviours the directions are
        projected out one after another, in the given order, at each layer.
        """
        self.check_model(model, allow_other_name=allow_other_name)
        chosen = self.behaviour_ids if behaviour_ids is None else [int(b) for b in behaviour_ids]
        if layers is None:
            layer_list = [self.layer]
        else:
            layer_list = [layers] if isinstance(layers, int) else list(layers)
        ablations = [Ablation(layer, self.direction(b), self.site) for layer in layer_list for b in chosen]
        return intervene(model, ablations, frame)

    # ---- files

    def save(self, directory: str | Path) -> Path:
        tensors = {"directions": self.directions}
        if self.bias is not None:
            tensors["bias"] = self.bias
        metadata = {
            "model_name": self.model_name, "d_model": self.d_model, "n_layers": self.n_layers,
            "layer": self.layer, "site": self.site, "hook_name": self.hook_name, "method": self.method,
            "behaviour_ids": self.behaviour_ids, "titles": self.titles,
            "norms": self.norms.tolist(), "bias_norm": None if self.bias is None else float(self.bias.norm()),
            "provenance": {key: recorded_path(value, directory) if key in PROVENANCE_PATHS and value else value
                           for key, value in self.provenance.items()},
        }
        return save_artefact(directory, DIRECTIONS_FORMAT, metadata, tensors)

    @classmethod
    def load(cls, directory: str | Path) -> DirectionSet:
        metadata, tensors = load_artefact(directory, DIRECTIONS_FORMAT)
        try:
            provenance = {key: str(recorded_location(value, directory)) if key in PROVENANCE_PATHS and value else value
                          for key, value in metadata["provenance"].items()}
            return cls(
                model_name=metadata["model_name"], d_model=metadata["d_model"], n_layers=metadata["n_layers"],
                layer=metadata["layer"], site=metadata["site"], method=metadata["method"],
                behaviour_ids=metadata["behaviour_ids"], titles=metadata["titles"],
                directions=tensors["directions"], bias=tensors.get("bias"), provenance=provenance,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ArtefactError(f"{Path(directory) / DIRECTIONS_FORMAT.json_file} does not describe its tensors "
                                f"({type(error).__name__}: {error}); rebuild the direction set") from None


def direction_provenance(model: TransformerBridge, method: str, **extra: Any) -> dict[str, Any]:
    """The provenance every method records: method, model, creation time, site, plus ``extra``."""
    return {"method": method, "model": model.cfg.model_name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "site": SITE, **extra}


__all__ = ["DIRECTIONS_FORMAT", "PROVENANCE_PATHS", "SITE", "DirectionMethod", "DirectionSet", "RandomMatch", "Site", "add_set_method",
           "direction_provenance", "set_method_names"]
