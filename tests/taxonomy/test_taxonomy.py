"""Taxonomy artefact, selection and CLI on hand-written activation folders with planted clusters."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mechsteer.activations import (
    CENTRING,
    MANIFEST,
    SENTENCES,
    Manifest,
    SentenceRecord,
    ShardInfo,
    load_sentence_vectors,
    read_sentences,
)
from mechsteer.cli import main as cli_main
from mechsteer.cli.taxonomy import parse_grid
from mechsteer.organisms.evaluate import MAX_NEW_TOKENS as ORGANISM_MAX_NEW_TOKENS
from mechsteer.taxonomy.artefact import SELECTION_GEOMETRIC, SELECTION_JUDGE, Taxonomy
from mechsteer.taxonomy.build import build_taxonomy
from mechsteer.taxonomy.judge.oracle import oracle_judge_from_activations
from mechsteer.taxonomy.metrics import adjusted_rand_index, cosine_silhouette
from mechsteer.taxonomy.sweep import sweep_taxonomies

PLANTED = ("plan", "compute", "verify", "correct", "answer")
D_MODEL = 24
LAYERS = (1, 2)
# Small judge workloads and short SAE training keep the tests fast.
FAST_SAE = {"max_epochs": 30}


def write_activation_folder(
    folder: Path, *, n_per_label: int = 40, labelled: bool = True, seed: int = 0, noise: float = 0.25
) -> list[str]:
    """An activation run folder as `extract_activations` writes it, with planted clusters.

    Each planted behaviour has its own random direction (per layer); a sentence's raw vector
    is a shared offset (what centring removes) + a random positive scale of its behaviour's
    direction + Gaussian noise. Sentences are interleaved so no label is contiguous.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = [PLANTED[i % len(PLANTED)] for i in range(n_per_label * len(PLANTED))]
    folder.mkdir(parents=True, exist_ok=True)
    tensors, means = {}, {}
    for layer in LAYERS:
        directions = torch.nn.functional.normalize(torch.randn(len(PLANTED), D_MODEL, generator=generator), dim=-1)
        offset = 5.0 * torch.randn(D_MODEL, generator=generator)
        codes = torch.tensor([PLANTED.index(label) for label in labels])
        scale = 2.0 + torch.rand(len(labels), 1, generator=generator)
        vectors = offset + scale * directions[codes] + noise * torch.randn(len(labels), D_MODEL, generator=generator)
        tensors[f"layer_{layer}"] = vectors.contiguous()
        means[f"layer_{layer}"] = vectors.mean(dim=0)
    save_file(tensors, str(folder / "shard_00000.safetensors"))
    save_file(means, str(folder / CENTRING))
    with (folder / SENTENCES).open("w") as handle:
        for index, label in enumerate(labels):
            record = SentenceRecord(
                trace_index=index // 5, problem_id=f"p{index // 5}", sentence_index=index % 5,
                text=f"{label} sentence number {index}.", char_start=0, char_end=10, tok_start=1,
                tok_end=11, label=label if labelled else None,
            )
            handle.write(json.dumps(asdict(record)) + "\n")
    manifest = Manifest(
        model="synthetic-planted",
        config={"layers": list(LAYERS), "site": "resid_post", "include_previous_token": True,
                "min_words": 3, "batch_size": 8, "shard_size": 2048},
        n_traces=len(labels) // 5,
        d_model=D_MODEL,
        shards=[ShardInfo("shard_00000.safetensors", 0, len(labels), 0, len(labels) // 5)],
        complete=True,
    )
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
    return labels


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("planted") / "activations"
    return folder, write_activation_folder(folder)


def test_save_load_round_trip(labelled_run, tmp_path):
    folder, labels = labelled_run
    taxonomy = build_taxonomy(folder, 2, n_latents=5, seed=1, sae_options=FAST_SAE)
    assert len(taxonomy.behaviours) == 5 and taxonomy.behaviour_ids == [0, 1, 2, 3, 4]
    assert taxonomy.metrics.ari is not None and taxonomy.metrics.ari > 0.9
    # Without a judge the titles name the matched planted label.
    assert {b.matched_label for b in taxonomy.behaviours} == set(PLANTED)
    assert all(b.title == f"behaviour {b.id} ({b.matched_label})" for b in taxonomy.behaviours)
    assert all(b.examples for b in taxonomy.behaviours)

    taxonomy.save(tmp_path / "taxonomy")
    loaded = Taxonomy.load(tmp_path / "taxonomy")
    assert loaded == taxonomy  # dataclass equality covers provenance, metrics and behaviours...
    assert torch.equal(loaded.assignments, taxonomy.assignments)  # ...but tensors need equal()
    assert torch.equal(loaded.directions, taxonomy.directions)
    sae, original = loaded.load_sae(), taxonomy.load_sae()
    for name, tensor in original.state_dict().items():
        assert torch.equal(sae.state_dict()[name], tensor), name
    # The SAE classifies raw activations (it centres them itself) like the taxonomy's assignments.
    from safetensors.torch import load_file

    raw = load_file(str(folder / "shard_00000.safetensors"))["layer_2"]
    mean = load_file(str(folder / CENTRING))["layer_2"]
    assert torch.equal(sae.classify_tokens(raw, centring_mean=mean), loaded.assignments)
    with pytest.raises(ValueError, match="different mean"):
        sae.classify_tokens(raw, centring_mean=mean + 1.0)
    # Directions are the unit decoder rows, in the model's residual width.
    assert torch.equal(loaded.directions, sae.decoder_directions)
    assert torch.equal(loaded.sentence_vectors(), load_sentence_vectors(folder, 2, normalise=True))
    assert torch.allclose(loaded.directions.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_kmeans_taxonomy_has_no_sae(labelled_run, tmp_path):
    folder, _ = labelled_run
    taxonomy = build_taxonomy(folder, 1, method="kmeans", n_latents=5)
    assert taxonomy.provenance.k is None and taxonomy.metrics.ari > 0.9
    loaded = Taxonomy.load(taxonomy.save(tmp_path / "kmeans"))
    assert not (tmp_path / "kmeans" / "sae").exists() and loaded == taxonomy
    with pytest.raises(ValueError, match="no SAE"):
        loaded.load_sae()


def test_geometric_selection_chooses_the_planted_k_and_ignores_ari(labelled_run):
    folder, labels = labelled_run
    rows, best = sweep_taxonomies(folder, list(LAYERS), [3, 5, 8], seed=0, sae_options=FAST_SAE)
    assert len(rows) == 6 and sum(row["selected"] for row in rows) == 1
    assert best.metrics.selection_criterion == SELECTION_GEOMETRIC
    assert best.provenance.n_latents == len(PLANTED)
    assert best.metrics.selection_score == max(row["selection_score"] for row in rows)
    assert adjusted_rand_index(labels, best.assignments.tolist()) == pytest.approx(best.metrics.ari)
    assert best.metrics.ari > 0.9


def test_unlabelled_runs_select_without_ground_truth(tmp_path):
    folder = tmp_path / "unlabelled"
    write_activation_folder(folder, labelled=False, seed=3)
    rows, best = sweep_taxonomies(folder, [1], [3, 5, 8], sae_options=FAST_SAE)
    assert best.provenance.n_latents == len(PLANTED)
    assert all(row["ari"] is None for row in rows) and best.metrics.ari is None
    assert best.behaviours[0].title == "behaviour 0"
    with pytest.raises(ValueError, match="needs ground-truth labels"):
        oracle_judge_from_activations(folder)


def test_oracle_judge_selection_and_titles(labelled_run):
    folder, _ = labelled_run
    judge = oracle_judge_from_activations(folder)
    from mechsteer.taxonomy.build import JudgeSettings

    settings = JudgeSettings(n_top_examples=10, n_random_examples=10, n_repeats=2, n_in=20, n_out=20, n_per_behaviour=20)
    rows, best = sweep_taxonomies(folder, [2], [4, 5, 7], judge=judge, judge_settings=settings, sae_options=FAST_SAE)
    by_k = {row["n_latents"]: row for row in rows}
    assert best.metrics.selection_criterion == SELECTION_JUDGE
    assert best.provenance.n_latents == 5
    assert by_k[5]["judge_final"] == pytest.approx(1.0)
    assert by_k[7]["orthogonality"] < 1.0 and by_k[4]["judge_final"] < 1.0
    assert sorted(b.title for b in best.behaviours) == sorted(PLANTED)
    assert best.provenance.judge == "OracleJudge"


def test_cosine_silhouette_by_hand():
    # Two tight pairs at right angles: a = 0 within pairs, b = 1 to the other pair -> s = 1.
    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    assert cosine_silhouette(vectors, torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0)
    # Mixed pairs: a = 1, b = 0.5 for every point -> s = (0.5 - 1) / 1 = -0.5.
    assert cosine_silhouette(vectors, torch.tensor([0, 1, 0, 1])) == pytest.approx(-0.5)
    # Singletons score 0; the pair [1,0],[1,0]: a = 0, b = 1 to either singleton -> 1.
    assert cosine_silhouette(vectors, torch.tensor([0, 0, 1, 2])) == pytest.approx(0.5)
    # [1,0] with [0,1]: a = 1, b = 0 (its twin [1,0] is alone) -> -1; mean with 0, 0 -> -0.5.
    assert cosine_silhouette(vectors, torch.tensor([0, 1, 1, 2])) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="at least 2"):
        cosine_silhouette(vectors, torch.zeros(4, dtype=torch.long))


def test_parse_grid():
    assert parse_grid("5:50:5") == list(range(5, 51, 5))
    assert parse_grid("3:5") == [3, 4, 5]
    assert parse_grid("2,3") == [2, 3]
    with pytest.raises(ValueError, match="start:stop"):
        parse_grid("5:x")
    with pytest.raises(ValueError, match="start:stop"):
        parse_grid("9:5")


def test_cli_end_to_end_with_oracle_judge(labelled_run, tmp_path, capsys):
    folder, _ = labelled_run
    out = tmp_path / "cli"
    code = cli_main([
        "taxonomy", "--activations", str(folder), "--layers", "1,2", "--k", "3",
        "--n-latents", "4:5", "--method", "sae", "--judge", "oracle", "--normalise", "both",
        "--out", str(out),
        "--max-epochs", "30", "--n-examples", "10", "--n-repeats", "2", "--n-judged", "20",
    ])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_latents"] == 5 and summary["selection_criterion"] == SELECTION_JUDGE
    taxonomy = Taxonomy.load(out)
    assert taxonomy.provenance.n_latents == 5 and taxonomy.metrics.judge_final == pytest.approx(1.0)
    assert sorted(b.title for b in taxonomy.behaviours) == sorted(PLANTED)
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    points = [(int(r["layer"]), r["normalised"], int(r["n_latents"])) for r in rows]
    assert points == [(layer, normalised, n) for layer in (1, 2) for normalised in ("True", "False") for n in (4, 5)]
    assert [r["selected"] for r in rows].count("True") == 1
    for plot in ("metrics_vs_k.png", "sentence_map.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_oracle_without_labels_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "unlabelled"
    write_activation_folder(folder, labelled=False, n_per_label=10)
    assert cli_main(["taxonomy", "--activations", str(folder), "--n-latents", "3", "--judge", "oracle",
                     "--out", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mechsteer: error: --judge oracle needs ground-truth labels")
    assert not (tmp_path / "out" / "taxonomy.json").exists()


# --- acceptance on the thinking organism -------------------------------------------------

ORGANISM_DIR = Path(__file__).resolve().parents[2] / "mechsteer" / "organisms" / "weights" / "thinking"
MISSING_ORGANISM_FILES = [
    str(ORGANISM_DIR / name) for name in ("config.json", "model.safetensors")
    if not (ORGANISM_DIR / name).is_file()
]
N_ORGANISM_PROBLEMS = 160
ORGANISM_LAYERS = [1, 2]
ORGANISM_GRID = [4, 5, 6, 7]  # around the five planted behaviours


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING_ORGANISM_FILES), reason=f"organism weights missing: {MISSING_ORGANISM_FILES}")
def test_organism_taxonomy_recovers_planted_behaviours(tmp_path):
    from mechsteer.activations import ActivationConfig, extract_activations
    from mechsteer.core.models import load_model
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.data.traces import generate_traces
    from mechsteer.organisms.grammar import BEHAVIOURS
    from mechsteer.organisms.plugin import label_reasoning as organism_labeller

    model = load_model("organism-thinking")
    problems = load_benchmark("organism", "test", N_ORGANISM_PROBLEMS)
    traces = generate_traces(
        # the organism evaluation's budget always reaches the end of a thinking trace
        model, problems, tmp_path / "traces", max_new_tokens=ORGANISM_MAX_NEW_TOKENS,
        batch_size=N_ORGANISM_PROBLEMS, progress=False,
    )
    assert all(trace.finish_reason != "length" for trace in traces)
    extract_activations(
        model, traces, tmp_path / "activations", ActivationConfig(layers=ORGANISM_LAYERS, batch_size=32),
        labeller=organism_labeller, progress=False,
    )
    rows, best = sweep_taxonomies(
        tmp_path / "activations", ORGANISM_LAYERS, ORGANISM_GRID, normalise=(True, False), seed=0
    )
    labels = [sentence.label for sentence in read_sentences(tmp_path / "activations")]
    counts = {label: labels.count(label) for label in sorted(set(labels))}
    assert set(BEHAVIOURS) <= set(labels), f"the thinking organism never shows some behaviours: {counts}"
    shown = ("layer", "normalised", "n_latents", "silhouette", "ari", "nmi")
    print("organism sweep:", json.dumps([{key: row[key] for key in shown} for row in rows]))
    print("selected:", best.provenance.layer, best.provenance.normalised, best.provenance.n_latents,
          "ARI", best.metrics.ari, "NMI", best.metrics.nmi)
    for behaviour in best.behaviours:
        print(behaviour.id, behaviour.size, behaviour.matched_label, behaviour.label_precision, behaviour.label_recall)
    assert best.metrics.selection_score == max(row["selection_score"] for row in rows)
    # Measured on the retrained organisms: plan and answer are each found whole (precision
    # and recall >= 0.99); compute sentences (~60% of all) split into several behaviours of
    # precision ~0.9 each, which caps the ARI (0.38) while the NMI stays ~0.6.
    by_label = {}
    for behaviour in best.behaviours:
        assert behaviour.label_precision >= 0.8, (behaviour.id, behaviour.matched_label, behaviour.label_precision)
        by_label.setdefault(behaviour.matched_label, []).append(behaviour)
    for label in ("plan", "answer"):
        assert [b.label_recall for b in by_label[label]] and max(b.label_recall for b in by_label[label]) >= 0.9, label
    assert "compute" in by_label
    assert best.metrics.nmi >= 0.5
