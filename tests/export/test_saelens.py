"""``mechsteer export --to saelens`` and ``mechsteer taxonomy --sae-from``: a taxonomy's SAE as a
SAELens folder, read back by mechsteer (weights equal, the same latents), and checked against
SAELens's published config fields.

The fields SAELens needs in ``cfg.json`` to load a top-k SAE (SAELens 6.x, ``SAE.load_from_disk``):

* ``sae_lens/saes/sae.py``, ``SAEConfig``: ``d_in``, ``d_sae`` (required), ``dtype``, ``device``,
  ``apply_b_dec_to_input``, ``normalize_activations`` ("none" | "expected_average_only_in" |
  "constant_norm_rescale" | "layer_norm"), ``reshape_activations`` ("none" | "hook_z"), ``metadata``;
* ``sae_lens/saes/topk_sae.py``, ``TopKSAEConfig``: ``k``, ``rescale_acts_by_decoder_norm``;
  ``architecture()`` is "topk";
* ``sae_lens/loading/pretrained_sae_loaders.py``: ``architecture`` picks the config class;
  ``dtype`` is read by ``read_sae_components_from_disk``; without ``sae_lens_version`` the
  pre-6.0 conversion (``handle_pre_6_0_config``) moves ``hook_name`` and ``model_name`` (of
  ``LLM_METADATA_KEYS``) under ``metadata``; unknown keys are dropped (``filter_valid_dataclass_fields``).
* ``sae_lens/constants.py``: the files are ``cfg.json`` and ``sae_weights.safetensors``; the tensors
  (``initialize_weights``) are ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae), ``W_dec`` (d_sae, d_in),
  ``b_dec`` (d_in), and ``load_state_dict`` is strict, so no other tensor may be there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechsteer.activations import CENTRING
from mechsteer.cli import main
from mechsteer.core.errors import ArtefactError
from mechsteer.export.saelens import export_taxonomy_sae
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.build import build_taxonomy
from mechsteer.taxonomy.sae import SAEConfig, TopKSAE
from mechsteer.taxonomy.saelens import PREPARE_KEY, read_saelens_folder
from tests.taxonomy.test_taxonomy import D_MODEL, FAST_SAE, write_activation_folder

SAELENS_TOPK_FIELDS = {"architecture", "d_in", "d_sae", "k", "dtype", "device", "apply_b_dec_to_input",
                       "normalize_activations", "reshape_activations", "rescale_acts_by_decoder_norm"}
SAELENS_METADATA_FIELDS = {"hook_name", "model_name"}
SAELENS_NORMALISATIONS = {"none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"}
SAELENS_TENSOR_SHAPES = {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",)}


def saelens_encode_pre(folder: Path, raw: torch.Tensor) -> torch.Tensor:
    """SAELens's ``TopKSAE`` pre-activation from the folder's files, as its code computes it
    (``process_sae_in`` then ``sae_in @ W_enc + b_enc``), after the preparation cfg.json describes."""
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(folder / "sae_weights.safetensors")
    x = raw
    if PREPARE_KEY in cfg:
        x = x - torch.tensor(cfg[PREPARE_KEY]["centring_mean"])
        if cfg[PREPARE_KEY]["l2_normalise"]:
            x = torch.nn.functional.normalize(x, dim=-1)
    x = x - weights["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = x @ weights["W_enc"] + weights["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * weights["W_dec"].norm(dim=-1)
    return pre


@pytest.fixture(scope="module")
def activations(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("planted") / "activations"
    write_activation_folder(folder)
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["normalised", "unnormalised"])
def taxonomy(request, activations, tmp_path_factory) -> tuple[Path, Taxonomy]:
    folder = tmp_path_factory.mktemp("taxonomy") / "taxonomy"
    built = build_taxonomy(activations, 2, n_latents=5, seed=1, normalise=request.param, sae_options=FAST_SAE)
    built.save(folder)
    return folder, built


def test_cfg_json_has_saelens_fields_and_the_weights_its_names(taxonomy, tmp_path):
    _, built = taxonomy
    out = export_taxonomy_sae(built, tmp_path / "sae")
    cfg = json.loads((out / "cfg.json").read_text())
    assert SAELENS_TOPK_FIELDS | SAELENS_METADATA_FIELDS <= set(cfg)
    assert cfg["architecture"] == "topk" and cfg["d_in"] == D_MODEL and cfg["d_sae"] == 5 and cfg["k"] == 3
    assert cfg["hook_name"] == "blocks.2.hook_resid_post" and cfg["model_name"] == "synthetic-planted"
    assert cfg["normalize_activations"] in SAELENS_NORMALISATIONS and cfg["reshape_activations"] == "none"
    assert cfg["dtype"] == "float32" and cfg["apply_b_dec_to_input"] is True
    assert cfg[PREPARE_KEY]["l2_normalise"] is built.provenance.normalised
    assert "sae_lens_version" not in cfg and "metadata" not in cfg  # the flat layout SAELens converts
    weights = load_file(out / "sae_weights.safetensors")
    sizes = {"d_in": D_MODEL, "d_sae": 5}
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        name: tuple(sizes[s] for s in shape) for name, shape in SAELENS_TENSOR_SHAPES.items()}
    sae = built.load_sae()
    assert torch.equal(weights["W_enc"], sae.W_enc.detach().T) and torch.equal(weights["W_dec"], sae.W_dec.detach())


def test_read_back_the_weights_and_latents_are_the_same(taxonomy, activations, tmp_path):
    _, built = taxonomy
    original = built.load_sae()
    folder = export_taxonomy_sae(built, tmp_path / "sae")
    imported = read_saelens_folder(folder)
    assert (imported.layer, imported.site, imported.model_name) == (2, "resid_post", "synthetic-planted")
    sae = imported.sae
    assert sae.normalised == original.normalised and sae.config.k == original.config.k
    for name, tensor in original.state_dict().items():
        assert torch.equal(sae.state_dict()[name], tensor), name
    raw = 3.0 * torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(3))
    mean = load_file(activations / CENTRING)["layer_2"]
    prepared = original.prepare(raw)
    assert torch.equal(sae.encode(sae.prepare(raw)), original.encode(prepared))
    assert torch.equal(sae.classify_tokens(raw, centring_mean=mean), original.classify_tokens(raw, centring_mean=mean))
    # What SAELens computes from the same files: the same behaviour (argmax of the pre-activation).
    pre = saelens_encode_pre(folder, raw)
    assert torch.allclose(pre, original.encode_pre(prepared), atol=1e-5)
    assert torch.equal(pre.argmax(dim=-1), original.classify(prepared))


def foreign_folder(folder: Path, *, layout: str = "nested") -> tuple[Path, torch.Tensor]:
    """A SAELens SAE of raw activations that mechsteer did not write: no preparation key, b_dec not
    subtracted from the input, top-k ranked by pre-activation x decoder norm (decoder rows not unit)."""
    generator = torch.Generator().manual_seed(5)
    d_sae = 6
    w_dec = torch.randn(d_sae, D_MODEL, generator=generator)
    weights = {"W_enc": torch.randn(D_MODEL, d_sae, generator=generator), "b_enc": torch.randn(d_sae, generator=generator),
               "W_dec": w_dec, "b_dec": torch.randn(D_MODEL, generator=generator)}
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": D_MODEL, "d_sae": d_sae, "k": 2, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": True}
    names = {"hook_name": "blocks.2.hook_resid_post", "model_name": "synthetic-planted"}
    cfg |= {"metadata": {**names, "sae_lens_version": "6.18.0"}} if layout == "nested" else names
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, w_dec


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_a_foreign_saelens_sae_reads_as_saelens_computes_it(tmp_path, layout):
    folder, w_dec = foreign_folder(tmp_path / "foreign", layout=layout)
    imported = read_saelens_folder(folder)
    sae = imported.sae
    assert imported.hook_name == "blocks.2.hook_resid_post" and not sae.normalised
    assert torch.equal(sae.centring_mean, torch.zeros(D_MODEL))
    assert torch.allclose(sae.decoder_directions.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(sae.decoder_directions, w_dec / w_dec.norm(dim=-1, keepdim=True))
    raw = torch.randn(50, D_MODEL, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(sae.encode_pre(sae.prepare(raw)), saelens_encode_pre(folder, raw), atol=1e-4)
    # Moved to another centring mean, it still labels raw activations the same.
    mean = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1))
    moved = sae.recentred(mean)
    assert torch.equal(moved.classify_tokens(raw), sae.classify_tokens(raw))
    assert torch.allclose(moved(moved.prepare(raw)) + mean, sae(sae.prepare(raw)), atol=1e-4)


@pytest.mark.parametrize(("change", "message"), [
    ({"architecture": "standard"}, "top-k SAEs only"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations 'none' only"),
    ({"hook_name": "blocks.2.attn.hook_z"}, "not a residual-stream hook name"),
    ({"rescale_acts_by_decoder_norm": False}, "not unit norm"),
    ({"d_sae": 7}, "W_enc has shape"),
])
def test_what_mechsteer_cannot_run_exactly_is_refused(tmp_path, change, message):
    folder, _ = foreign_folder(tmp_path / "foreign", layout="flat")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ArtefactError, match=message):
        read_saelens_folder(folder)


def test_a_normalised_sae_is_not_moved_to_another_mean():
    sae = TopKSAE(SAEConfig(d_in=4, n_latents=3, k=1), centring_mean=torch.zeros(4), normalised=True)
    with pytest.raises(ValueError, match="different mean"):
        sae.recentred(torch.ones(4))


def test_taxonomy_sae_from_gives_the_exported_taxonomy_back(taxonomy, activations, tmp_path, capsys):
    folder, built = taxonomy
    assert main(["export", str(folder), "--to", "saelens", "--out", str(tmp_path / "sae")]) == 0
    assert json.loads(capsys.readouterr().out)["d_sae"] == 5
    assert main(["taxonomy", "--activations", str(activations), "--sae-from", str(tmp_path / "sae"),
                 "--seed", "1", "--out", str(tmp_path / "again")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["hook_name"] == "blocks.2.hook_resid_post"
    again = Taxonomy.load(tmp_path / "again")
    assert torch.equal(again.assignments, built.assignments)
    assert torch.equal(again.directions, built.directions)
    assert again.provenance.normalised == built.provenance.normalised and again.metrics.sizes == built.metrics.sizes
    assert again.metrics.silhouette == built.metrics.silhouette


def test_sae_from_refuses_sweep_flags_and_other_layers(taxonomy, activations, tmp_path, capsys):
    _, built = taxonomy
    export_taxonomy_sae(built, tmp_path / "sae")
    assert main(["taxonomy", "--activations", str(activations), "--sae-from", str(tmp_path / "sae"),
                 "--n-latents", "4", "--out", str(tmp_path / "x")]) == 2
    assert "drop --n-latents" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "hook_name": "blocks.5.hook_resid_post"}))
    assert main(["taxonomy", "--activations", str(activations), "--sae-from", str(tmp_path / "sae"),
                 "--out", str(tmp_path / "x")]) == 1
    assert "extract that layer first" in capsys.readouterr().err
