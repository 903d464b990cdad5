"""`mechsteer run` on pairs of the paper's shape: a thinking model prompted with a chat template
(R1-style), or with Open-Reasoner-Zero's own prompt, and a base model prompted with the paper's
base prompt, so that the thinking traces are re-framed for the base model; and SmolLM2 (a real
model, with its own chat template) as the thinking model. Every direction method, tuning,
controls and ablations on; then the per-stage commands on the same folders.

The random-weight pairs (tests.tiny_models.save_chat_pair) have different ordinary vocabularies,
so the hybrid reads the base model's tokens through text. Sizes are small: what is tested is that
every stage runs and hands the next one what it needs, not what the models can do."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mechsteer.cli import main
from mechsteer.core.models import load_model
from mechsteer.core.store import read_json, write_json_atomic
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.data.traces import load_traces
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.pipeline import run_pipeline
from mechsteer.experiment.report import expected_stages
from mechsteer.steering.framing import frame_for_base
from mechsteer.steering.labels import labelled_counts, taxonomy_labels
from tests.tiny_models import save_chat_pair

DIRECTION_METHODS = ("mean", "sae", "optimised")
# Stages a change of direction_method re-runs (the ones after the taxonomy).
FIRST_REDONE = "directions"


def small_config(base: str, thinking: str, *, thinking_template: str | None = None, **overrides) -> RunConfig:
    settings = dict(name="real-pair", base_model=base, thinking_model=thinking, benchmark="gsm8k",
                    n_train=8, n_eval=2, max_new_tokens=40, batch_size=8, n_latents=[3], activation_layers=[1],
                    direction_method="mean", coefficients=[0.5, 1.0], tune_split="validation", n_tune=2,
                    ablation_contexts=3, optimisation={"steps": 4, "max_examples": 16}, device="cpu")
    if thinking_template is not None:
        settings["thinking_template"] = thinking_template
    settings.update(overrides)
    return RunConfig.from_dict(settings)


def rerun_from_taxonomy(source: Path, out: Path, config: RunConfig) -> dict:
    """``source``'s traces, activations and taxonomy, every later stage run again under ``config``."""
    shutil.copytree(source, out)
    state = read_json(out / "stages.json", "stages")
    stages = list(state["stages"])
    state["stages"] = {name: state["stages"][name] for name in stages[: stages.index(FIRST_REDONE)]}
    write_json_atomic(out / "stages.json", state)
    for folder in ("directions", "tuning", "eval", "ablations"):
        shutil.rmtree(out / folder, ignore_errors=True)
    return run_pipeline(config, out, log=lambda message: None)


def check_finished_run(out: Path, config: RunConfig, report: dict) -> None:
    stages = read_json(out / "stages.json", "stages")["stages"]
    assert [stage for stage in expected_stages(config) if stage != "report"] == \
        [stage for stage in expected_stages(config) if stage in stages]
    for section in ("base_accuracy", "thinking_accuracy", "hybrid_accuracy", "gap_recovered", "controls",
                    "taxonomy", "directions", "ablations", "tuning", "tokens_steered_fraction"):
        assert section in report, section
    assert set(report["controls"]) == set(config.controls)
    assert report["directions"]["method"] == config.direction_method
    tensors = load_file(out / "directions" / "directions.safetensors")
    for name, tensor in tensors.items():
        norms = tensor.reshape(-1, tensor.shape[-1]).norm(dim=-1)
        assert bool(norms.isfinite().all()) and bool((norms > 0).all()), name
    if config.ablations:
        ablations = json.loads((out / "ablations" / "ablations.json").read_text())
        assert ablations["necessity"] and ablations["sufficiency"]
        assert all(math.isfinite(row["steered"]["rate"]) for row in ablations["sufficiency"])


def check_labels_reach_base_frame(out: Path, config: RunConfig, base_tokenizer) -> dict[int, int]:
    """Every behaviour of the taxonomy labels sentences of the traces re-framed for the base model."""
    raw = load_traces(out / "traces" / "thinking_train")
    labels = taxonomy_labels(out / "taxonomy", traces=raw)
    train = load_benchmark(config.benchmark, config.train_split, config.n_train)
    framed = frame_for_base(raw, {p.id: p.question for p in train}, base_tokenizer, config.resolved_base_template)
    assert all(f.prompt != r.prompt and f.reasoning == r.reasoning for f, r in zip(framed, raw, strict=True))
    counts = labelled_counts(framed, base_tokenizer, labels.labeller, labels.behaviour_ids)
    assert counts and all(count >= 2 for count in counts.values()), counts
    return counts


@pytest.fixture(scope="module")
def chat_pairs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("chat_pairs")
    return {prompt: tuple(str(path) for path in save_chat_pair(root, thinking_prompt=prompt)) for prompt in ("r1", "orz")}


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["r1", "orz"])
def test_random_weight_qwen2_pair_finishes_every_method(prompt, chat_pairs, tmp_path):
    base, thinking = chat_pairs[prompt]
    template = "orz" if prompt == "orz" else None  # r1: the thinking model's own chat template (the default)
    reports = {}
    first = tmp_path / "mean"
    for method in DIRECTION_METHODS:
        config = small_config(base, thinking, thinking_template=template, direction_method=method)
        out = tmp_path / method
        report = run_pipeline(config, out, log=lambda message: None) if method == "mean" else \
            rerun_from_taxonomy(first, out, config)
        check_finished_run(out, config, report)
        reports[method] = report
    config = small_config(base, thinking, thinking_template=template)
    assert config.resolved_thinking_template != config.resolved_base_template
    check_labels_reach_base_frame(first, config, load_model(base).tokenizer)
    # The per-stage commands finish on the same folders.
    for method in DIRECTION_METHODS:
        assert main(["directions", "--pair", f"{base},{thinking}", "--traces", str(first / "traces" / "thinking_train"),
                     "--taxonomy", str(first / "taxonomy"), "--split", "train", "--method", method, "--steps", "4",
                     "--base-traces", str(first / "traces" / "base_train"), "--device", "cpu",
                     "--out", str(tmp_path / f"cli_{method}")]) == 0
    assert main(["ablate", "--pair", f"{base},{thinking}", "--traces", str(first / "traces" / "thinking_train"),
                 "--taxonomy", str(first / "taxonomy"), "--split", "train", "--directions",
                 str(tmp_path / "cli_optimised"), "--n-problems", "2", "--max-new-tokens", "16", "--n-contexts", "3",
                 "--device", "cpu", "--out", str(tmp_path / "cli_ablate")]) == 0
    assert (tmp_path / "cli_ablate" / "ablations.json").is_file()


@pytest.mark.slow
def test_smollm2_as_the_thinking_model_finishes_every_method(chat_pairs, tmp_path):
    """SmolLM2-135M-Instruct with its own chat template; the base is of another width, so the
    necessity pass ablates the thinking model's own difference-of-means directions. The ablation
    stage runs with the first method only (its per-layer tests take minutes on this CPU; the random
    Qwen2 pairs run it with every method)."""
    base = chat_pairs["r1"][0]
    first = tmp_path / "mean"
    for method in DIRECTION_METHODS:
        config = small_config(base, "smollm2", direction_method=method, n_train=6, max_new_tokens=32,
                              ablation_contexts=2, coefficients=[1.0], ablations=method == "mean")
        out = tmp_path / method
        report = run_pipeline(config, out, log=lambda message: None) if method == "mean" else \
            rerun_from_taxonomy(first, out, config)
        check_finished_run(out, config, report)
        if config.ablations:
            settings = json.loads((out / "ablations" / "ablations.json").read_text())["settings"]
            assert "thinking model" in settings["necessity_directions"]
    assert config.resolved_thinking_template == "thinking_chat"
    check_labels_reach_base_frame(first, config, load_model(base).tokenizer)
