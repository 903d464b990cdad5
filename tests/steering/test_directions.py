"""Behaviour directions: difference of means, SAE mapping, optimised vectors, the DirectionSet artefact."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mechsteer.core.models import load_model
from mechsteer.data.traces import TraceRecord
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.framing import reframe_trace
from mechsteer.steering.labels import ground_truth_labeller
from mechsteer.steering.mean import build_mean_directions, difference_of_means, mean_bias
from mechsteer.steering.optimise import (
    OptimisationConfig,
    SteeringExample,
    onset_example,
    optimise_vector,
    reasoning_example,
    sentence_examples,
)
from mechsteer.steering.sae_map import fit_linear_map, sae_steering_directions
from tests.tiny_models import char_tokenizer
from tests.typecheck import refused


def make_trace(index: int, sentences: list[str], prompt: str = "Q: sum?\nA:\n") -> TraceRecord:
    reasoning = "\n".join(sentences)
    return TraceRecord(
        problem_id=f"p{index}", benchmark="organism", prompt=prompt, text=prompt + reasoning,
        generation=reasoning, reasoning=reasoning, answer_part="", reasoning_char_start=len(prompt),
        reasoning_char_end=len(prompt) + len(reasoning), token_ids=[], n_prompt_tokens=0, prediction=None,
        reference="0", correct=False, finish_reason="eos", model="synthetic", settings={"template": "organism"},
    )


def feature_labeller(reasoning: str) -> dict[tuple[int, int], str]:
    """Ground truth for the planted-feature test: a line with an X is "feature", else "plain"."""
    labels, start = {}, 0
    for line in reasoning.split("\n"):
        labels[(start, start + len(line))] = "feature" if "X" in line else "plain"
        start += len(line) + 1
    return labels


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory):
    """A tiny Llama whose embedding of "X" carries a large planted direction."""
    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    planted = torch.randn(32, generator=torch.Generator().manual_seed(7))
    planted = planted / planted.norm()
    x_id = tokenizer.convert_tokens_to_ids("X")
    with torch.no_grad():
        model.model.embed_tokens.weight[x_id] += 30.0 * planted
    folder = tmp_path_factory.mktemp("planted")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder)), planted


def test_difference_of_means_recovers_a_planted_feature_in_a_model(planted_model):
    model, planted = planted_model
    words = ["add the two", "take one off", "carry the ten", "look again now"]
    traces = []
    for index in range(12):
        lines = [f"we {words[(index + k) % 4]} here" for k in range(4)]
        lines[index % 4] = lines[index % 4].replace("here", "X X X")
        lines[(index + 2) % 4] = lines[(index + 2) % 4].replace("here", "a b c")
        traces.append(make_trace(index, lines))
    titles = ["feature", "plain"]
    directions = build_mean_directions(model, traces, ground_truth_labeller(titles), [0, 1], titles, layer=0,
                                       text_labeller=feature_labeller, base_traces=traces[:4])
    cosine = torch.nn.functional.cosine_similarity(directions.direction(0), planted, dim=0)
    assert cosine >= 0.95
    assert directions.method == "mean" and directions.provenance["sentences_per_behaviour"] == {0: 12, 1: 36}
    # the "plain" direction points the other way
    assert torch.nn.functional.cosine_similarity(directions.direction(1), planted, dim=0) < -0.9


def test_difference_of_means_by_hand_on_synthetic_vectors():
    generator = torch.Generator().manual_seed(0)
    planted = torch.randn(16, generator=generator)
    labels = torch.tensor([0, 1, 1, 2, -1, 0])
    vectors = torch.randn(6, 16, generator=generator)
    vectors[labels == 0] += 5 * planted
    result = difference_of_means(vectors, labels, [0, 2])
    expected = vectors[labels == 0].mean(0) - vectors.mean(0)
    assert torch.allclose(result[0], expected, atol=1e-5)
    assert torch.allclose(result[1], vectors[3] - vectors.mean(0), atol=1e-5)
    assert torch.allclose(mean_bias(vectors[:2], vectors[2:]), vectors[:2].mean(0) - vectors[2:].mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="behaviour 5 has no labelled sentences"):
        difference_of_means(vectors, labels, [5])


def test_linear_map_recovers_a_planted_relation_and_maps_directions():
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(400, 12, generator=generator)
    true_map = torch.randn(12, 20, generator=generator)
    target = source @ true_map + torch.randn(20, generator=generator) + 0.01 * torch.randn(400, 20, generator=generator)
    fitted = fit_linear_map(source, target)
    assert torch.allclose(fitted, true_map, atol=0.01)
    rows = torch.eye(12)[:3]
    mapped = sae_steering_directions(rows, 4.0, fitted)
    assert mapped.shape == (3, 20)
    assert torch.allclose(mapped.norm(dim=-1), torch.full((3,), 4.0), atol=1e-4)
    expected = true_map[:3] / true_map[:3].norm(dim=-1, keepdim=True) * 4.0
    assert torch.allclose(mapped, expected, atol=0.01)
    identity = sae_steering_directions(rows, 2.0)
    assert torch.equal(identity, rows * 2.0)


def test_optimisation_lowers_target_loss_and_leaves_the_model_untouched(tiny_models):
    model = tiny_models["llama"]
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    traces = [make_trace(i, [f"Plan: {i} + 3.", f"{i} + 3 = {i + 3}.", f"The answer is {i + 3}."]) for i in range(10, 18)]
    examples = [reasoning_example(record, model.tokenizer) for record in traces]
    assert model.tokenizer.decode(list(examples[0].token_ids[examples[0].target_start:examples[0].target_end])) == traces[0].reasoning
    config = OptimisationConfig(steps=16, batch_size=2, eval_every=4, patience=10, lr=5e-2, val_fraction=0.25)
    vector, report = optimise_vector(model, examples, layer=1, config=config)
    assert report.best_val_loss < report.initial_val_loss - 0.05
    assert report.train_losses[-1] < report.train_losses[0]
    assert vector.shape == (model.cfg.d_model,) and not vector.requires_grad
    for name, parameter in model.named_parameters():
        assert parameter.grad is None, name
        assert torch.equal(parameter, before[name]), name


def test_behaviour_examples_target_the_labelled_sentences(tiny_models):
    model = tiny_models["llama"]
    trace = make_trace(0, ["Plan: 4 + 3.", "4 + 3 = 7.", "The answer is 7."])
    from mechsteer.organisms.plugin import label_reasoning as organism_labeller

    titles = ["plan", "compute", "verify", "correct", "answer"]
    examples = sentence_examples([trace], model.tokenizer, ground_truth_labeller(titles), 1,
                                 text_labeller=organism_labeller)
    assert len(examples) == 1
    example = examples[0]
    assert model.tokenizer.decode(list(example.token_ids[example.target_start:])) == "4 + 3 = 7."
    with pytest.raises(ValueError, match="target span"):
        SteeringExample((1, 2, 3), 0, 2)
    # onset_tokens: only the sentence's first tokens are targets, and nothing after them is seen
    onset = onset_example(example, 2)
    assert onset.token_ids == example.token_ids[: example.target_start + 2]
    assert (onset.target_start, onset.target_end) == (example.target_start, example.target_start + 2)
    assert onset_example(example, 100) == example
    with pytest.raises(ValueError, match="onset_tokens"):
        OptimisationConfig(onset_tokens=0)


def small_set(d_model: int = 8, method: str = "mean", bias: bool = True) -> DirectionSet:
    generator = torch.Generator().manual_seed(3)
    return DirectionSet(
        model_name="tiny", d_model=d_model, n_layers=3, layer=1, site="resid_post", method=method,
        behaviour_ids=[4, 7, 9], titles=["plan", "verify", "answer"],
        directions=torch.randn(3, d_model, generator=generator),
        bias=torch.randn(d_model, generator=generator) if bias else None, provenance={"note": "test"},
    )


def test_random_like_matches_the_parts_or_the_added_vector():
    base = small_set()
    # "parts" (the default) draws what it always drew: the directions, then the bias, from one seeded stream
    generator = torch.Generator().manual_seed(5)
    raw, raw_bias = torch.randn(3, 8, generator=generator), torch.randn(8, generator=generator)
    parts = base.random_like(5)
    assert torch.equal(parts.directions, raw / raw.norm(dim=-1, keepdim=True) * base.norms[:, None])
    assert torch.equal(parts.bias, raw_bias / raw_bias.norm() * base.bias.norm())
    added = base.random_like(5, match="added")
    assert added.bias is None and added.method == "random"
    assert torch.allclose(added.norms, (base.directions + base.bias).norm(dim=-1), atol=1e-5)
    assert not torch.allclose(added.norms, base.norms, atol=1e-3)  # the bias changes the norm to match
    assert added.provenance["history"][-1]["match"] == "added"
    assert torch.equal(base.random_like(5, match="added").directions, added.directions)
    assert not torch.equal(base.random_like(6, match="added").directions, added.directions)
    # without a bias the added vector is the direction itself
    no_bias = small_set(bias=False)
    assert torch.allclose(no_bias.random_like(5, match="added").norms, no_bias.norms, atol=1e-5)
    with refused("match must be one of", parameter="match"):
        base.random_like(5, match="sum")


def test_direction_set_round_trip(tmp_path):
    original = small_set()
    original.save(tmp_path / "set")
    loaded = DirectionSet.load(tmp_path / "set")
    assert torch.equal(loaded.directions, original.directions) and torch.equal(loaded.bias, original.bias)
    for name in ("model_name", "d_model", "n_layers", "layer", "site", "method", "behaviour_ids", "titles", "provenance"):
        assert getattr(loaded, name) == getattr(original, name), name
    assert torch.equal(loaded.direction(7), original.directions[1])
    no_bias = small_set(bias=False)
    no_bias.save(tmp_path / "nobias")
    assert DirectionSet.load(tmp_path / "nobias").bias is None
    with pytest.raises(ValueError, match="not a saved DirectionSet"):
        DirectionSet.load(tmp_path / "missing")


def test_direction_set_arithmetic():
    base = small_set()
    assert torch.allclose(base.scaled(2.0).directions, 2 * base.directions)
    assert torch.allclose(base.scaled(2.0).bias, 2 * base.bias)
    assert torch.allclose(base.normalised().norms, torch.ones(3))
    assert torch.allclose(base.normalised().bias.norm(), torch.tensor(1.0))
    summed = base.added(base.scaled(-1.0))
    assert torch.allclose(summed.directions, torch.zeros(3, 8), atol=1e-6)
    assert [op["op"] for op in summed.provenance["history"]] == ["added"]
    control = base.random_like(seed=0)
    assert control.method == "random"
    assert torch.allclose(control.norms, base.norms, atol=1e-5)
    assert torch.allclose(control.bias.norm(), base.bias.norm(), atol=1e-5)
    assert control.provenance["history"][-1] == {"op": "random_like", "seed": 0, "match": "parts",
                                                 "source_method": "mean"}
    cosines = torch.nn.functional.cosine_similarity(control.directions, base.directions, dim=-1)
    assert bool((cosines.abs() < 0.99).all())
    assert torch.equal(base.random_like(seed=0).directions, control.directions)
    assert not torch.equal(base.random_like(seed=1).directions, control.directions)
    assert base.provenance == {"note": "test"}  # arithmetic never mutates the original
    other = small_set()
    other.layer = 2
    with pytest.raises(ValueError, match="different layer"):
        base.added(other)
    picked = base.subset([9, 4])
    assert picked.behaviour_ids == [9, 4] and picked.titles == ["answer", "plan"]
    assert torch.equal(picked.directions, base.directions[[2, 0]]) and torch.equal(picked.bias, base.bias)
    assert picked.provenance["history"][-1] == {"op": "subset", "behaviour_ids": [9, 4]}
    with pytest.raises(ValueError, match="unknown behaviour id 5"):
        base.subset([5])
    with pytest.raises(ValueError, match="distinct"):
        base.subset([4, 4])


def test_direction_set_bad_inputs(tiny_models):
    model = tiny_models["llama"]  # d_model 32, 3 layers
    with pytest.raises(ValueError, match="d_model=8"):
        small_set(d_model=8).check_model(model)
    fitting = small_set(d_model=32)
    with pytest.raises(ValueError, match="made for 'tiny'"):
        fitting.check_model(model)
    fitting.check_model(model, allow_other_name=True)
    fitting.layer = 2
    fitting.n_layers = 8
    fitting.layer = 5
    with pytest.raises(ValueError, match="outside"):
        fitting.check_model(model, allow_other_name=True)
    with pytest.raises(ValueError, match=r"unknown behaviour id 3; this set has \[4, 7, 9\]"):
        small_set().direction(3)
    with pytest.raises(ValueError, match="shape"):
        DirectionSet("m", 8, 3, 1, "resid_post", "mean", [0, 1], ["a", "b"], torch.zeros(3, 8))
    with refused("site", parameter="site"):
        DirectionSet("m", 8, 3, 1, "resid_pre", "mean", [0], ["a"], torch.zeros(1, 8))  # type: ignore[arg-type]
    with refused("method", parameter="method"):
        DirectionSet("m", 8, 3, 1, "resid_post", "kmeans", [0], ["a"], torch.zeros(1, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer"):
        DirectionSet("m", 8, 3, 3, "resid_post", "mean", [0], ["a"], torch.zeros(1, 8))


def test_reframe_trace_keeps_the_reasoning_verbatim():
    trace = make_trace(0, ["Plan: 4 + 3.", "4 + 3 = 7."], prompt="<|user|>sum?<think>\n")
    framed = reframe_trace(trace, "Question:\nsum?\n")
    assert framed.text == "Question:\nsum?\n" + trace.reasoning
    assert framed.text[framed.reasoning_char_start:framed.reasoning_char_end] == trace.reasoning


def test_directions_and_ablate_cli_on_tiny_models(tiny_model_dirs, tmp_path):
    import dataclasses
    import json

    from mechsteer.causal.outputs import NECESSITY_CSV, SUFFICIENCY_CSV
    from mechsteer.cli import main

    traces_dir = tmp_path / "traces"
    traces_dir.mkdir()
    lines = []
    for index in range(6):
        start = 20 + index
        sentences = [f"Plan: start at {start}, add 9 for 2 days.", f"Day 1: {start} + 9 = {start + 9}.",
                     f"Check: {start + 9} - 9 = {start}.", f"Day 2: {start + 9} + 9 = {start + 18}.",
                     f"The answer is {start + 18}."]
        lines.append(json.dumps(dataclasses.asdict(make_trace(index, sentences, prompt=f"Q: {start}?\nA:\n"))))
    (traces_dir / "traces.jsonl").write_text("\n".join(lines) + "\n")
    pair = f"{tiny_model_dirs['llama']},{tiny_model_dirs['llama']}"
    out = tmp_path / "directions"
    assert main(["directions", "--pair", pair, "--traces", str(traces_dir), "--ground-truth", "--method", "mean",
                 "--layer", "1", "--out", str(out), "--base-traces", str(traces_dir), "--threads", "1"]) == 0
    loaded = DirectionSet.load(out)
    assert loaded.titles == ["plan", "compute", "verify", "answer"]  # "correct" never occurs: left out
    assert loaded.behaviour_ids == [0, 1, 2, 4] and loaded.provenance["skipped_behaviours"] == [3]
    # no labels asked for: one line naming --taxonomy and --ground-truth, exit 2, nothing loaded
    assert main(["directions", "--pair", pair, "--traces", str(traces_dir), "--layer", "1", "--out", str(out)]) == 2
    trimmed = DirectionSet(loaded.model_name, loaded.d_model, loaded.n_layers, loaded.layer, loaded.site,
                           loaded.method, [0, 2], ["plan", "verify"], loaded.directions[[0, 2]], loaded.bias)
    trimmed.save(tmp_path / "trimmed")
    ablations = tmp_path / "ablations"
    assert main(["ablate", "--pair", pair, "--traces", str(traces_dir), "--ground-truth", "--directions",
                 str(tmp_path / "trimmed"), "--out", str(ablations), "--n-problems", "2", "--max-new-tokens", "4",
                 "--n-contexts", "3", "--coeffs", "2", "--sentence-tokens", "4", "--threads", "1", "--per-layer"]) == 0
    assert (ablations / NECESSITY_CSV).read_text().count("\n") == 1 + 2 * 3
    assert "all layers, per-layer directions" in (ablations / NECESSITY_CSV).read_text()
    assert (ablations / SUFFICIENCY_CSV).read_text().count("\n") == 1 + 2
    assert (ablations / "ablations.png").is_file()


def test_taxonomy_adapter_and_sae_directions(tiny_models, tmp_path):
    from mechsteer.activations import (
        ActivationConfig,
        extract_activations,
        read_sentences,
    )
    from mechsteer.organisms.plugin import label_reasoning as organism_labeller
    from mechsteer.steering.labels import sentence_labels, taxonomy_labels
    from mechsteer.steering.mean import pool_sentences
    from mechsteer.steering.sae_map import build_sae_directions
    from mechsteer.taxonomy.build import build_taxonomy

    model = tiny_models["llama"]
    traces = [make_trace(i, [f"Plan: {20 + i} + 9 - 2.", f"{20 + i} + 9 = {29 + i}.", f"The answer is {27 + i}."])
              for i in range(8)]
    extract_activations(model, traces, tmp_path / "acts", ActivationConfig(layers=[1]), labeller=organism_labeller,
                        progress=False)
    taxonomy = build_taxonomy(tmp_path / "acts", 1, n_latents=3, k=1, sae_options={"max_epochs": 5})
    taxonomy.save(tmp_path / "taxonomy")
    labels = taxonomy_labels(tmp_path / "taxonomy", n_traces=len(traces))
    assert labels.behaviour_ids == taxonomy.behaviour_ids
    pooled = pool_sentences(model, traces, 1)
    assert [(s.trace_index, s.char_start) for s in pooled.sentences] == [
        (s.trace_index, s.char_start) for s in read_sentences(tmp_path / "acts")]
    assert sentence_labels(pooled.sentences, labels.labeller).tolist() == taxonomy.assignments.tolist()
    with pytest.raises(ValueError, match="cover 8 traces"):
        taxonomy_labels(tmp_path / "taxonomy", n_traces=3)
    sae = taxonomy.load_sae()
    result = build_sae_directions(model, model, sae, labels.behaviour_ids, labels.titles, 1, traces)
    assert result.method == "sae" and result.provenance["mapping"] == "identity"
    scale = result.provenance["scale"]
    assert torch.allclose(result.directions, sae.decoder_directions[labels.behaviour_ids] * scale, atol=1e-5)
    linear = build_sae_directions(model, model, sae, labels.behaviour_ids, labels.titles, 1, traces, mapping="linear")
    assert linear.provenance["n_pairs"] == 24
    assert torch.allclose(linear.norms, torch.full((3,), scale), atol=1e-4)
