"""A taxonomy's SAE as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

The fields and tensor names are declared in :mod:`mechsteer.taxonomy.saelens`, which reads such a
folder back; its docstring says how mechsteer's SAE differs from SAELens's and how the folder
carries the difference (the preparation under ``mechsteer_prepare`` in ``cfg.json``).
``hook_name`` is the TransformerLens name of the layer the taxonomy read,
``blocks.{L}.hook_resid_post``; ``model_name`` the model its activations came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import get_args

from safetensors.torch import save_file

from mechsteer.core.models import ResidSite, resid_hook_name
from mechsteer.core.store import write_json_atomic
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.sae import TopKSAE
from mechsteer.taxonomy.saelens import (
    SAELENS_CONFIG_FILE,
    SAELENS_WEIGHTS_FILE,
    Preparation,
    SAELensConfig,
    saelens_weights,
)


def saelens_config(sae: TopKSAE, *, model_name: str, hook_name: str) -> SAELensConfig:
    """The ``cfg.json`` of ``sae`` read at ``hook_name`` of ``model_name``."""
    return SAELensConfig(
        d_in=sae.config.d_in, d_sae=sae.config.n_latents, k=sae.config.k, hook_name=hook_name, model_name=model_name,
        prepare=Preparation(centring_mean=sae.centring_mean.detach().float().cpu().tolist(),
                            l2_normalise=sae.normalised),
    )


def write_saelens_folder(sae: TopKSAE, out: str | Path, *, model_name: str, hook_name: str) -> Path:
    """Write ``sae`` into ``out`` as a SAELens folder; the weights first and ``cfg.json`` last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / SAELENS_WEIGHTS_FILE
    staging = weights.with_name(weights.name + ".tmp")
    save_file(saelens_weights(sae), str(staging))
    os.replace(staging, weights)
    write_json_atomic(out / SAELENS_CONFIG_FILE, saelens_config(sae, model_name=model_name, hook_name=hook_name).to_json())
    return out


def export_taxonomy_sae(taxonomy: Taxonomy, out: str | Path) -> Path:
    """The SAE of ``taxonomy`` (method "sae") as a SAELens folder in ``out``."""
    provenance = taxonomy.provenance
    site = next((site for site in get_args(ResidSite) if site == provenance.site), None)
    if site is None:
        raise ValueError(f"the taxonomy read site {provenance.site!r}, not a residual-stream site {get_args(ResidSite)}")
    return write_saelens_folder(taxonomy.load_sae(), out, model_name=provenance.model,
                                hook_name=resid_hook_name(provenance.layer, site))


__all__ = ["export_taxonomy_sae", "saelens_config", "write_saelens_folder"]
