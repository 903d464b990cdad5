"""Provenance at every hand-over (issue 19): the silent wrong results are now refused, each with a
message that names the two values that differ and the way out."""

import dataclasses
import json

import pytest
import torch

from mechsteer.activations import ActivationConfig, Manifest, extract_activations
from mechsteer.core.errors import ProvenanceError
from mechsteer.data.benchmarks import Problem
from mechsteer.data.traces import generate_traces, load_traces, traces_digest
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.labels import taxonomy_labels
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.sweep import sweep_to_folder
from tests.test_activations import synthetic_trace

PROBLEMS = [Problem(f"q{i}", f"What is {i} plus {i}?", str(2 * i), None, "gsm8k") for i in range(4)]
SETTINGS = dict(template="base_paper", max_new_tokens=4, batch_size=2, progress=False)


def test_traces_of_another_model_are_not_resumed(tiny_models, tmp_path):
    generate_traces(tiny_models["gpt2"], PROBLEMS[:2], tmp_path, **SETTINGS)
    before = (tmp_path / "traces.jsonl").read_text()
    # Same folder, another model, more problems: it used to reuse the 2 records and append 2 of its own.
    with pytest.raises(ProvenanceError) as refused:
        generate_traces(tiny_models["llama"], PROBLEMS, tmp_path, **SETTINGS)
    message = str(refused.value)
    assert tiny_models["gpt2"].cfg.model_name in message and tiny_models["llama"].cfg.model_name in message
    assert "use another --out" in message
    assert (tmp_path / "traces.jsonl").read_text() == before  # nothing mixed in


def test_traces_with_other_generation_settings_are_not_resumed(tiny_models, tmp_path):
    model = tiny_models["gpt2"]
    generate_traces(model, PROBLEMS[:2], tmp_path, **SETTINGS)
    with pytest.raises(ProvenanceError, match="generation setting max_new_tokens 4, but 8 is expected"):
        generate_traces(model, PROBLEMS, tmp_path, **{**SETTINGS, "max_new_tokens": 8})
    # The batch size does not change what a record holds: resuming with another one is fine.
    records = generate_traces(model, PROBLEMS, tmp_path, **{**SETTINGS, "batch_size": 3})
    assert [r.problem_id for r in records] == [p.id for p in PROBLEMS]


@pytest.fixture
def pooled(tiny_models, tmp_path):
    traces = [synthetic_trace(i) for i in range(4)]
    out = tmp_path / "activations"
    extract_activations(tiny_models["llama"], traces, out, ActivationConfig(layers=[1], batch_size=2),
                        progress=False)
    return traces, out


def test_activations_of_other_traces_with_the_same_count_are_refused(tiny_models, pooled):
    traces, out = pooled
    manifest = (out / "manifest.json").read_text()
    others = [dataclasses.replace(t, problem_id=f"other{i}") for i, t in enumerate(traces)]
    assert len(others) == len(traces)
    with pytest.raises(ProvenanceError, match=r"different traces \(digest\)") as refused:
        extract_activations(tiny_models["llama"], others, out, ActivationConfig(layers=[1], batch_size=2),
                            progress=False)
    assert traces_digest(traces) in str(refused.value) and traces_digest(others) in str(refused.value)
    assert (out / "manifest.json").read_text() == manifest
    # The same traces are the same run: a no-op.
    extract_activations(tiny_models["llama"], traces, out, ActivationConfig(layers=[1], batch_size=2), progress=False)


def claim_another_model(activations_dir):
    path = activations_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"] = "another-model"
    path.write_text(json.dumps(manifest))


def test_a_manifest_claiming_another_model_is_refused_by_the_taxonomy_and_directions(tiny_models, pooled, tmp_path):
    traces, activations = pooled
    model = tiny_models["llama"]
    claim_another_model(activations)
    # The taxonomy stage checks the activations against the model it expects...
    with pytest.raises(ProvenanceError, match="made with model 'another-model'") as refused:
        Manifest.load(activations).check_model(model, activations)
    assert model.cfg.model_name in str(refused.value)
    # ...and a taxonomy built from them carries the claim, which directions, ablations and the
    # hybrid check against their thinking model.
    sweep_to_folder(activations, [1], [2], tmp_path / "taxonomy", method="kmeans")
    taxonomy = Taxonomy.load(tmp_path / "taxonomy")
    assert taxonomy.provenance.model == "another-model"
    with pytest.raises(ProvenanceError, match="the taxonomy in .*made with model 'another-model'"):
        taxonomy.check_model(model, tmp_path / "taxonomy")
    with pytest.raises(ProvenanceError, match="model 'another-model'"):
        taxonomy.check_model_name(model.cfg.model_name, tmp_path / "taxonomy")
    taxonomy.check_model(model, tmp_path / "taxonomy", allow_other_model=True)  # the override, on purpose


def test_directions_refuse_a_taxonomy_of_other_traces_and_sets_of_another_width(tiny_models, pooled, tmp_path):
    traces, activations = pooled
    sweep_to_folder(activations, [1], [2], tmp_path / "taxonomy", method="kmeans")
    labels = taxonomy_labels(tmp_path / "taxonomy", len(traces), traces_digest=traces_digest(traces))
    assert len(labels.behaviour_ids) == 2
    others = [dataclasses.replace(t, text=t.text + " ") for t in traces]
    with pytest.raises(ProvenanceError, match="traces of digest") as refused:
        taxonomy_labels(tmp_path / "taxonomy", len(others), traces_digest=traces_digest(others))
    assert "pass the traces the taxonomy was built from" in str(refused.value)
    model = tiny_models["llama"]
    narrow = DirectionSet(model_name=model.cfg.model_name, d_model=16, n_layers=model.cfg.n_layers, layer=1,
                          site="resid_post", method="mean", behaviour_ids=[0], titles=["a"],
                          directions=torch.ones(1, 16))
    with pytest.raises(ProvenanceError, match="d_model=16 .* has d_model=32"):
        narrow.check_model(model)


def test_traces_from_a_folder_are_what_the_digest_reads(tiny_models, tmp_path):
    records = generate_traces(tiny_models["gpt2"], PROBLEMS[:2], tmp_path, **SETTINGS)
    assert traces_digest(load_traces(tmp_path)) == traces_digest(records)
