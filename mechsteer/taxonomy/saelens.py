"""SAELens's folder format for an SAE, and reading one back as a :class:`~mechsteer.taxonomy.sae.TopKSAE`.

A SAELens folder is ``cfg.json`` plus ``sae_weights.safetensors`` (``W_enc`` (d_in, d_sae),
``b_enc`` (d_sae), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in)); SAELens's ``SAE.load_from_disk``
reads it (fields: ``sae_lens/saes/sae.py`` ``SAEConfig``, ``sae_lens/saes/topk_sae.py``
``TopKSAEConfig``, ``sae_lens/loading/pretrained_sae_loaders.py``). :class:`SAELensConfig` declares
the fields mechsteer writes (:mod:`mechsteer.export.saelens`) and reads here, in SAELens's flat
layout (``hook_name`` and ``model_name`` at the top level): SAELens 6 reads it through its pre-6.0
conversion, which moves those two under ``metadata``; its nested layout is read here too.

What differs from mechsteer's SAE, and how a folder carries it:

* **Preparation.** Mechsteer's SAE reads *prepared* vectors: the activation minus the run's
  centring mean, then L2-normalised if the taxonomy was. SAELens has no such step, so
  ``cfg.json`` carries it under :data:`PREPARE_KEY` (the mean as a list of floats, the flag).
  SAELens ignores keys its config class lacks (``filter_valid_dataclass_fields``), so an
  SAELens user must apply it by hand before ``encode``. A folder without the key is an SAE of
  raw activations (any SAELens SAE): it reads as mechsteer's SAE with a zero centring mean.
* **Top-k.** SAELens's ``TopK`` applies a ReLU to the k kept values; mechsteer keeps the raw
  pre-activations. The behaviour of a vector is the argmax of the pre-activation in both (SAELens's
  ``hook_sae_acts_pre``), so labels agree; the codes agree wherever the kept values are positive.
* **Supported SAEs.** ``architecture`` "topk", ``normalize_activations`` and ``reshape_activations``
  "none". ``apply_b_dec_to_input`` false and ``rescale_acts_by_decoder_norm`` true are folded into
  the weights exactly; an SAE without either whose decoder rows are not unit norm is refused, since
  mechsteer's behaviour directions are the unit decoder rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors.torch import load_file

from mechsteer.core.errors import ArtefactError
from mechsteer.core.models import ResidSite, parse_resid_hook_name
from mechsteer.core.tensor_types import Tensor
from mechsteer.taxonomy.sae import SAEConfig, TopKSAE

SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
PREPARE_KEY = "mechsteer_prepare"
PREPARE_DOC = (
    "mechsteer prepares an activation x before the SAE: x - centring_mean, then divided by its L2 norm "
    "if l2_normalise; SAELens does not, so do it before encode"
)
SAELENS_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
# A decoder row counts as unit norm within this (mechsteer renormalises after every step).
UNIT_NORM_ATOL = 1e-4
SAELensArchitecture = Literal["topk"]
SAELensNormalisation = Literal["none"]


@dataclass(frozen=True)
class Preparation:
    """How mechsteer prepares an activation before its SAE (see :data:`PREPARE_DOC`)."""

    centring_mean: list[float]
    l2_normalise: bool


@dataclass(frozen=True)
class SAELensConfig:
    """``cfg.json`` of a SAELens top-k SAE, the fields mechsteer writes and reads."""

    d_in: int
    d_sae: int
    k: int
    hook_name: str  # TransformerLens name, blocks.{L}.hook_resid_post
    model_name: str
    architecture: SAELensArchitecture = "topk"
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: SAELensNormalisation = "none"
    reshape_activations: SAELensNormalisation = "none"
    rescale_acts_by_decoder_norm: bool = False
    prepare: Preparation | None = None

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        del document["prepare"]
        if self.prepare is not None:
            document[PREPARE_KEY] = {**asdict(self.prepare), "description": PREPARE_DOC}
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any], where: Path) -> SAELensConfig:
        """Read SAELens's flat or nested (``metadata``) layout; refuse what mechsteer cannot run exactly."""
        given_metadata = document.get("metadata")
        metadata: dict[str, Any] = given_metadata if isinstance(given_metadata, dict) else {}

        def value_of(name: str, *, nested: bool = False, default: Any = None) -> Any:
            value = document.get(name, metadata.get(name) if nested else None)
            if value is None:
                if default is not None:
                    return default
                raise ArtefactError(f"{where} has no {name!r}; a SAELens cfg.json names it (SAELens's save_model "
                                    "writes one)")
            return value

        architecture = value_of("architecture", default="standard")
        kwargs = document.get("activation_fn_kwargs") or {}
        k = document.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        if architecture not in get_args(SAELensArchitecture) or k is None:
            raise ArtefactError(f"{where}: architecture {architecture!r} (k={k!r}); mechsteer reads top-k SAEs only "
                                "(architecture 'topk' with k)")
        normalisation = value_of("normalize_activations", default="none")
        if normalisation is False:  # SAELens before 6 wrote a bool
            normalisation = "none"
        for name, value in (("normalize_activations", normalisation),
                            ("reshape_activations", value_of("reshape_activations", default="none"))):
            if value not in get_args(SAELensNormalisation):
                raise ArtefactError(f"{where}: {name} is {value!r}; mechsteer reads SAEs with {name} 'none' only")
        prepare = document.get(PREPARE_KEY)
        preparation = None
        if prepare is not None:
            try:
                preparation = Preparation(centring_mean=[float(v) for v in prepare["centring_mean"]],
                                          l2_normalise=bool(prepare["l2_normalise"]))
            except (KeyError, TypeError, ValueError) as error:
                raise ArtefactError(f"{where}: {PREPARE_KEY} is not {{centring_mean: [floats], l2_normalise: bool}} "
                                    f"({type(error).__name__}: {error}); export the SAE again") from None
        return cls(
            d_in=int(value_of("d_in")), d_sae=int(value_of("d_sae")), k=int(k),
            hook_name=str(value_of("hook_name", nested=True)), model_name=str(value_of("model_name", nested=True)),
            dtype=str(value_of("dtype", default="float32")), device=str(value_of("device", default="cpu")),
            apply_b_dec_to_input=bool(value_of("apply_b_dec_to_input", default=True)),
            rescale_acts_by_decoder_norm=bool(document.get("rescale_acts_by_decoder_norm", False)),
            prepare=preparation,
        )


@dataclass(frozen=True)
class SAELensSAE:
    """An SAE read from a SAELens folder, with where it reads the model."""

    sae: TopKSAE
    model_name: str
    hook_name: str
    layer: int
    site: ResidSite
    folder: Path


def _weights(folder: Path, config: SAELensConfig) -> dict[str, Tensor]:
    path = folder / SAELENS_WEIGHTS_FILE
    if not path.is_file():
        raise ArtefactError(f"{path} missing: a SAELens folder keeps its weights there")
    tensors = {name: tensor.float() for name, tensor in load_file(path).items()}
    expected = {"W_enc": (config.d_in, config.d_sae), "b_enc": (config.d_sae,),
                "W_dec": (config.d_sae, config.d_in), "b_dec": (config.d_in,)}
    if set(tensors) != set(expected):
        raise ArtefactError(f"{path} holds {sorted(tensors)}; a SAELens top-k SAE holds exactly {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtefactError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                f"(d_in={config.d_in}, d_sae={config.d_sae} in {SAELENS_CONFIG_FILE})")
    return tensors


def _as_mechsteer(tensors: dict[str, Tensor], config: SAELensConfig, where: Path) -> dict[str, Tensor]:
    """SAELens's weights as mechsteer's (W_enc transposed), with SAELens-only options folded in."""
    w_enc, b_enc, w_dec, b_dec = (tensors[name] for name in SAELENS_TENSORS)
    if not config.apply_b_dec_to_input:  # encode reads x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_enc = b_enc + b_dec @ w_enc
    norms = w_dec.norm(dim=-1)
    if config.rescale_acts_by_decoder_norm:  # top-k ranks pre * norms: scale the encoder, unit-normalise the decoder
        w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    elif not torch.allclose(norms, torch.ones_like(norms), atol=UNIT_NORM_ATOL, rtol=0.0):
        worst = float((norms - 1).abs().max())
        raise ArtefactError(f"{where}: decoder rows are not unit norm (off by up to {worst:.3g}) and "
                            "rescale_acts_by_decoder_norm is false; mechsteer's behaviour directions are unit decoder "
                            "rows, so fold the norms first (SAELens: sae.fold_W_dec_norm())")
    return {"W_enc": w_enc.T.contiguous(), "b_enc": b_enc, "W_dec": w_dec.contiguous(), "b_dec": b_dec}


def read_saelens_folder(folder: str | Path) -> SAELensSAE:
    """The top-k SAE of a SAELens folder as mechsteer's :class:`TopKSAE`, with its model and hook.

    With :data:`PREPARE_KEY` in ``cfg.json`` (a folder mechsteer exported) the SAE gets that
    centring mean and normalisation back; without it, a zero mean and no normalisation (it reads
    raw activations). See the module docstring for what is refused.
    """
    folder = Path(folder)
    config_path = folder / SAELENS_CONFIG_FILE
    if not config_path.is_file():
        raise ArtefactError(f"{config_path} missing: not a SAELens SAE folder (cfg.json + {SAELENS_WEIGHTS_FILE})")
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ArtefactError(f"{config_path} is not JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(document, dict):
        raise ArtefactError(f"{config_path} is not a JSON object of SAE config fields")
    config = SAELensConfig.from_json(document, config_path)
    try:
        layer, site = parse_resid_hook_name(config.hook_name)
    except ValueError as error:
        raise ArtefactError(f"{config_path}: hook_name: {error}; mechsteer's SAEs read the residual stream") from None
    if not 1 <= config.k <= config.d_sae:
        raise ArtefactError(f"{config_path}: k={config.k} is outside [1, d_sae={config.d_sae}]")
    weights = _as_mechsteer(_weights(folder, config), config, config_path)
    centring_mean = torch.zeros(config.d_in)
    normalised = False
    if config.prepare is not None:
        if len(config.prepare.centring_mean) != config.d_in:
            raise ArtefactError(f"{config_path}: {PREPARE_KEY}.centring_mean has {len(config.prepare.centring_mean)} "
                                f"values, expected d_in={config.d_in}")
        centring_mean = torch.tensor(config.prepare.centring_mean, dtype=torch.float32)
        normalised = config.prepare.l2_normalise
    sae = TopKSAE(SAEConfig(d_in=config.d_in, n_latents=config.d_sae, k=config.k),
                  centring_mean=centring_mean, normalised=normalised)
    sae.load_state_dict({**weights, "centring_mean": centring_mean}, strict=True)
    if not all(bool(torch.isfinite(tensor).all()) for tensor in sae.state_dict().values()):
        raise ArtefactError(f"{folder}: the SAE's weights or centring mean hold nan or inf")
    return SAELensSAE(sae=sae, model_name=config.model_name, hook_name=config.hook_name, layer=layer, site=site,
                      folder=folder)


def load_saelens_sae(folder: str | Path) -> TopKSAE:
    """Only the SAE of :func:`read_saelens_folder`."""
    return read_saelens_folder(folder).sae


def saelens_weights(sae: TopKSAE) -> dict[str, Tensor]:
    """Mechsteer's SAE weights under SAELens's names and orientation (``W_enc`` is (d_in, d_sae) there)."""
    return {"W_enc": sae.W_enc.detach().T.contiguous().float().cpu(), "b_enc": sae.b_enc.detach().float().cpu(),
            "W_dec": sae.W_dec.detach().contiguous().float().cpu(), "b_dec": sae.b_dec.detach().float().cpu()}


__all__ = ["PREPARE_DOC", "PREPARE_KEY", "SAELENS_CONFIG_FILE", "SAELENS_TENSORS", "SAELENS_WEIGHTS_FILE",
           "SAELensConfig", "SAELensSAE", "Preparation", "load_saelens_sae", "read_saelens_folder", "saelens_weights"]
