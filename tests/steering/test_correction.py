"""Correction vectors: disagreement collection (positions, labels, targets, resumption, provenance),
the coefficient MLP, and joint training."""

import dataclasses
from pathlib import Path

import pytest
import torch

from mechsteer.core.errors import ArtefactError, ConfigError, ProvenanceError
from mechsteer.core.models import load_model
from mechsteer.data.traces import TraceRecord
from mechsteer.steering.coefficient_mlp import CoefficientMLP
from mechsteer.steering.correction import (
    CorrectionConfig,
    CorrectionVectors,
    position_batch,
    position_logits,
    train_correction_vectors,
)
from mechsteer.steering.disagreements import (
    DisagreementSettings,
    collect_disagreements,
    expected_provenance,
    load_disagreements,
)
from mechsteer.steering.framing import reframe_trace
from mechsteer.steering.labels import BehaviourLabels, ground_truth_labeller
from tests.tiny_models import save_tiny_model

THINKING_PROMPT = "Q: sum?\nA:\n"
BASE_PROMPT = "Question: what is the sum?\nAnswer:\n"  # another length: base and thinking positions differ
TITLES = ["feature", "plain"]
WORDS = ["add the two", "take one off", "carry the ten", "look again now"]


def make_trace(index: int) -> TraceRecord:
    lines = [f"we {WORDS[(index + k) % 4]} here" for k in range(4)]
    lines[index % 4] = lines[index % 4].replace("here", "X X X")
    lines.insert(2, "ok")  # too short to be a sentence: never labelled
    reasoning = "\n".join(lines)
    return TraceRecord(
        problem_id=f"p{index}", benchmark="organism", prompt=THINKING_PROMPT, text=THINKING_PROMPT + reasoning,
        generation=reasoning, reasoning=reasoning, answer_part="", reasoning_char_start=len(THINKING_PROMPT),
        reasoning_char_end=len(THINKING_PROMPT) + len(reasoning), token_ids=[], n_prompt_tokens=0, prediction=None,
        reference="0", correct=False, finish_reason="eos", model="synthetic", settings={"template": "thinking"},
    )


def line_labels(reasoning: str) -> dict[tuple[int, int], str]:
    labels, start = {}, 0
    for line in reasoning.split("\n"):
        labels[(start, start + len(line))] = "feature" if "X" in line else "plain"
        start += len(line) + 1
    return labels


LABELS = BehaviourLabels(ground_truth_labeller(TITLES), [0, 1], TITLES, line_labels)
SETTINGS = DisagreementSettings(layer=1, top_k=10, chunk_size=3, batch_size=2)  # cache_dir's


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("correction_models")
    loaded = {name: load_model(str(save_tiny_model(root / name, "llama", seed=seed)))
              for name, seed in (("base", 0), ("thinking", 1), ("other", 2))}
    # a thinking model that favours "X" everywhere (a random one is near uniform): a target that one
    # vector per behaviour can learn
    thinking = loaded["thinking"]
    with torch.no_grad():
        thinking.unembed._original_component.bias[thinking.tokenizer.convert_tokens_to_ids("X")] += 6.0
    return loaded


@pytest.fixture(scope="module")
def traces():
    own = [make_trace(i) for i in range(8)]
    return own, [reframe_trace(t, BASE_PROMPT) for t in own]


@pytest.fixture(scope="module")
def cache_dir(models, traces, tmp_path_factory):
    folder = tmp_path_factory.mktemp("disagreements")
    collect_disagreements(models["base"], models["thinking"], *traces, LABELS, SETTINGS, folder)
    return folder


def naive_positions(model, thinking, own, framed):
    """Every (trace, base position, behaviour, thinking position) by a direct loop: the char tokenizer
    gives token j = character j - 1 of the text (after BOS)."""
    expected = []
    for index, (record, original) in enumerate(zip(framed, own, strict=True)):
        ids = model.tokenizer(record.text)["input_ids"]
        with torch.no_grad():
            greedy = model(torch.tensor([ids])).argmax(-1)[0]
        for (start, end), title in line_labels(record.reasoning).items():
            if end - start < 5:  # the two-letter line is not a sentence
                continue
            for char in range(start, end):
                j = record.reasoning_char_start + char + 1
                if int(greedy[j - 1]) != ids[j]:
                    thinking_j = original.reasoning_char_start + char + 1
                    expected.append((index, j - 1, TITLES.index(title), thinking_j - 1))
    return expected


def test_collection_finds_exactly_the_disagreements_with_their_labels_and_targets(models, traces, cache_dir):
    own, framed = traces
    cache = load_disagreements(cache_dir)
    expected = naive_positions(models["base"], models["thinking"], own, framed)
    found = list(zip(cache.trace_index.tolist(), cache.position.tolist(), cache.behaviour.tolist(), strict=True))
    assert found == [(t, p, b) for t, p, b, _ in expected]
    assert 0 < len(found) < sum(len(t.reasoning) for t in framed)  # a subset, with both behaviours
    assert set(cache.behaviour.tolist()) == {0, 1}
    assert bool((cache.base_greedy != cache.target_token).all())
    # top-K: a direct forward of the thinking model over its own text, at the matched position
    for row in (0, len(found) // 2, len(found) - 1):
        trace, _, _, thinking_position = expected[row]
        ids = models["thinking"].tokenizer(own[trace].text)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(models["thinking"](torch.tensor([ids]))[0, thinking_position].float(), -1)
        values, top_ids = logprobs.topk(10)
        assert torch.equal(cache.top_k_ids[row], top_ids)
        torch.testing.assert_close(cache.top_k_logprobs[row], values)
        assert cache.target_token[row] == ids[thinking_position + 1]
    # the residual the coefficient MLP reads: base resid_post of the layer, unsteered
    ids = models["base"].tokenizer(framed[expected[0][0]].text)["input_ids"]
    with torch.no_grad():
        _, run = models["base"].run_with_cache(torch.tensor([ids]), names_filter=["blocks.1.hook_resid_post"])
    torch.testing.assert_close(cache.resid[0], run["blocks.1.hook_resid_post"][0, expected[0][1]].float())
    assert cache.token_ids[expected[0][0]] == ids


def test_collection_resumes_with_identical_files(models, traces, cache_dir, tmp_path):
    assert collect_disagreements(models["base"], models["thinking"], *traces, LABELS, SETTINGS, tmp_path,
                                 stop_after_chunks=1) is None
    with pytest.raises(Exception, match="unfinished"):
        load_disagreements(tmp_path)
    collect_disagreements(models["base"], models["thinking"], *traces, LABELS, SETTINGS, tmp_path)
    names = sorted(p.name for p in Path(cache_dir).iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir()) and len(names) == 7  # 3 chunks + manifest
    for name in names:
        assert (tmp_path / name).read_bytes() == (Path(cache_dir) / name).read_bytes(), name


def other_inputs(models, traces):
    """Inputs that differ from cache_dir's in one thing each, by the provenance field that names it:
    (base, thinking, traces, framed traces, settings)."""
    own, framed = traces
    other_own = [*own[:-1], make_trace(9)]
    return {
        "traces digest": (models["base"], models["thinking"], other_own, [reframe_trace(t, BASE_PROMPT) for t in other_own],
                          SETTINGS),
        "base model": (models["other"], models["thinking"], own, framed, SETTINGS),
        "thinking model": (models["base"], models["other"], own, framed, SETTINGS),
        "layer": (models["base"], models["thinking"], own, framed, DisagreementSettings(2, 10, 3, 2)),
        "top k": (models["base"], models["thinking"], own, framed, DisagreementSettings(1, 5, 3, 2)),
    }


def test_a_cache_of_other_traces_models_or_layer_is_refused(models, traces, cache_dir):
    good = expected_provenance(models["base"], models["thinking"], *traces, LABELS, SETTINGS)
    load_disagreements(cache_dir, good)
    # the same model name with other weights (a retrained checkpoint in the same folder)
    for weights in ("base weights", "thinking weights"):
        with pytest.raises(ProvenanceError, match=weights):
            load_disagreements(cache_dir, dataclasses.replace(good, **{weights.replace(" ", "_"): "0" * 16}))
    for what, (base, thinking, these, these_framed, these_settings) in other_inputs(models, traces).items():
        expected = expected_provenance(base, thinking, these, these_framed, LABELS, these_settings)
        with pytest.raises(ProvenanceError, match=what):
            load_disagreements(cache_dir, expected)
        with pytest.raises(ProvenanceError, match=what):  # nor is it resumed into
            collect_disagreements(base, thinking, these, these_framed, LABELS, these_settings, cache_dir)


def test_vectors_of_other_traces_models_or_layer_are_refused(models, traces, cache_dir, tmp_path):
    """The vectors record the cache they were trained on: read where another cache's inputs are
    expected (other traces, either model, its weights, another layer or K), they are refused by name."""
    cache = load_disagreements(cache_dir)
    trained = train_correction_vectors(models["base"], cache, dict(enumerate(TITLES)),
                                       CorrectionConfig(seeds=(0,), epochs=1, batch_size=2, mlp_hidden=4))
    trained.save(tmp_path)
    good = expected_provenance(models["base"], models["thinking"], *traces, LABELS, SETTINGS)
    assert CorrectionVectors.load(tmp_path, good).provenance == cache.provenance
    for weights in ("base weights", "thinking weights"):
        with pytest.raises(ProvenanceError, match=f"directions.json: made with {weights}"):
            CorrectionVectors.load(tmp_path, dataclasses.replace(good, **{weights.replace(" ", "_"): "0" * 16}))
    for what, (base, thinking, these, these_framed, these_settings) in other_inputs(models, traces).items():
        expected = expected_provenance(base, thinking, these, these_framed, LABELS, these_settings)
        with pytest.raises(ProvenanceError, match=f"directions.json: made with {what}") as refused:
            CorrectionVectors.load(tmp_path, expected)
        assert "train the correction vectors again" in str(refused.value)


def test_a_pair_with_different_tokenizers_is_refused(models, traces, tmp_path):
    merged = load_model(str(save_tiny_model(tmp_path / "merged", "llama", seed=1, extra_merges=True)))
    with pytest.raises(ConfigError, match="different tokenizers"):
        collect_disagreements(models["base"], merged, *traces, LABELS, DisagreementSettings(layer=1), tmp_path / "c")


def test_coefficient_mlp_is_non_negative_per_behaviour_and_round_trips(tmp_path):
    resid = torch.randn(6, 16) * 5
    behaviours = torch.tensor([3, 7, 3, 9, 7, 9])
    for architecture in ("shared", "per_behaviour"):
        mlp = CoefficientMLP(16, [3, 7, 9], hidden=8, architecture=architecture, seed=1)
        out = mlp(resid, behaviours)
        assert out.shape == (6,) and bool((out >= 0).all())
        # a behaviour's coefficient depends on its own head: swapping ids changes the output
        assert not torch.allclose(out, mlp(resid, torch.tensor([7, 3, 9, 3, 9, 7])))
        with pytest.raises(ValueError, match=r"behaviour ids \[5\]"):
            mlp(resid, torch.tensor([3, 7, 3, 9, 7, 5]))
        mlp.save(tmp_path / architecture)
        torch.testing.assert_close(CoefficientMLP.load(tmp_path / architecture)(resid, behaviours), out)


def test_training_lowers_the_loss_and_moves_the_base_model_towards_the_thinking_one(models, cache_dir, tmp_path):
    base = models["base"]
    cache = load_disagreements(cache_dir)
    config = CorrectionConfig(seeds=(0, 1), epochs=6, batch_size=2, val_fraction=0.25, mlp_hidden=16)
    trained = train_correction_vectors(base, cache, dict(enumerate(TITLES)), config)
    report = trained.report
    assert [s.seed for s in report.seeds] == [0, 1]
    chosen = next(s for s in report.seeds if s.seed == report.chosen_seed)
    assert chosen.best_val_kl == min(s.best_val_kl for s in report.seeds)
    for seed in report.seeds:
        assert seed.train_kl[-1] < seed.train_kl[0]
        assert seed.best_val_kl < seed.initial_val_kl
    assert report.best_val_kl < report.unsteered_val_kl
    directions = trained.directions
    assert directions.method == "correction" and directions.bias is None and directions.behaviour_ids == [0, 1]
    assert not any(p.grad is not None for p in base.parameters())
    # at its positions, the trained set raises the probability of the thinking model's top token
    slot_of = {0: 0, 1: 1}
    everything = torch.arange(cache.n_positions)
    traces = sorted(set(cache.trace_index.tolist()))
    batch = position_batch(cache, traces, everything, slot_of, base.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        steered = position_logits(base, 1, batch, directions.directions, trained.mlp)
        unsteered = position_logits(base, 1, batch, None, None)
    top = batch.top_k_ids[:, :1]
    gain = torch.log_softmax(steered, -1).gather(-1, top) - torch.log_softmax(unsteered, -1).gather(-1, top)
    assert float(gain.mean()) > 0.1 and float((gain > 0).float().mean()) > 0.6
    # round trip, provenance kept and checked
    trained.save(tmp_path / "vectors")
    loaded = CorrectionVectors.load(tmp_path / "vectors", cache.provenance)
    torch.testing.assert_close(loaded.directions.directions, directions.directions)
    assert loaded.mlp is not None and trained.mlp is not None
    torch.testing.assert_close(loaded.mlp(cache.resid, cache.behaviour), trained.mlp(cache.resid, cache.behaviour))
    assert loaded.report == report
    # each behaviour's mean learned coefficient at its positions scales the ceiling's vectors
    alpha = trained.mlp(cache.resid, cache.behaviour).detach()
    for slot, behaviour in enumerate(directions.behaviour_ids):
        mean = float(alpha[cache.behaviour == behaviour].mean())
        assert report.mean_coefficients[str(behaviour)] == pytest.approx(mean, rel=1e-5)
        torch.testing.assert_close(loaded.at_learned_scale().directions[slot], directions.directions[slot] * mean)
    stale = dataclasses.replace(loaded, report=dataclasses.replace(report, mean_coefficients={}))
    with pytest.raises(ArtefactError, match="train the correction vectors again"):
        stale.at_learned_scale()


def test_vectors_alone_train_with_coefficient_one(models, cache_dir):
    cache = load_disagreements(cache_dir)
    trained = train_correction_vectors(models["base"], cache, dict(enumerate(TITLES)),
                                       CorrectionConfig(seeds=(3,), epochs=3, batch_size=2, coefficient="none"))
    assert trained.mlp is None
    assert trained.report.best_val_kl < trained.report.seeds[0].initial_val_kl
    with pytest.raises(ConfigError, match="base model"):
        train_correction_vectors(models["other"], cache, dict(enumerate(TITLES)), CorrectionConfig(seeds=(3,)))


def state_positions(model, own, framed):
    """Every reasoning-token disagreement, with its thinking position (char tokenizer, as naive_positions)."""
    expected = []
    for index, (record, original) in enumerate(zip(framed, own, strict=True)):
        ids = model.tokenizer(record.text)["input_ids"]
        with torch.no_grad():
            greedy = model(torch.tensor([ids])).argmax(-1)[0]
        for char in range(len(record.reasoning)):
            j = record.reasoning_char_start + char + 1
            if int(greedy[j - 1]) != ids[j]:
                expected.append((index, j - 1, original.reasoning_char_start + char))
    return expected


@pytest.mark.parametrize("read", ["last_token", "next_token"])
def test_state_labels_read_the_thinking_models_activation_as_the_policy_will(models, traces, tmp_path, read):
    from mechsteer.steering.disagreements import StateLabels

    own, framed = traces

    def label(acts):  # a behaviour id that depends on the activation itself
        return (acts[:, 0] > 0).long() * 3 + (acts[:, 1] > 0).long()

    state = StateLabels(label=label, layer=1, read=read, digest="test-labeller")
    cache = collect_disagreements(models["base"], models["thinking"], own, framed, state, SETTINGS, tmp_path / read)
    assert cache is not None
    expected = state_positions(models["base"], own, framed)
    assert list(zip(cache.trace_index.tolist(), cache.position.tolist(), strict=True)) == [(t, p) for t, p, _ in expected]
    # more candidates than the sentence labels: the short line and every other reasoning token count too
    by_sentence = collect_disagreements(models["base"], models["thinking"], own, framed, LABELS, SETTINGS,
                                        tmp_path / f"{read}_sentences")
    assert by_sentence is not None and cache.n_positions > by_sentence.n_positions
    hook = "blocks.1.hook_resid_post"
    for row in (0, len(expected) // 2, len(expected) - 1):
        trace, _, thinking_last = expected[row]
        ids = models["thinking"].tokenizer(own[trace].text)["input_ids"]
        with torch.no_grad():
            _, activations = models["thinking"].run_with_cache(torch.tensor([ids]), names_filter=[hook])
        at = thinking_last + (1 if read == "next_token" else 0)
        assert int(cache.behaviour[row]) == int(label(activations[hook][0, at][None].float())[0])
    # another labeller is another cache
    other = dataclasses.replace(state, digest="another-labeller")
    with pytest.raises(ProvenanceError, match="labels digest"):
        collect_disagreements(models["base"], models["thinking"], own, framed, other, SETTINGS, tmp_path / read)


def test_a_pair_of_one_family_with_different_added_tokens_is_collected(tmp_path):
    """The paper's pairs share their ordinary vocabulary and differ in added tokens: collection takes
    them, and the thinking model's top K are tokens the base model has, as base ids."""
    from tests.tiny_models import save_real_pair

    base_path, thinking_path = save_real_pair(tmp_path / "pair", "qwen2")
    base, thinking = load_model(str(base_path)), load_model(str(thinking_path))
    assert base.tokenizer.get_vocab() != thinking.tokenizer.get_vocab()
    own = [make_trace(i) for i in range(4)]
    framed = [reframe_trace(t, BASE_PROMPT) for t in own]
    cache = collect_disagreements(base, thinking, own, framed, LABELS,
                                  DisagreementSettings(layer=1, top_k=8, chunk_size=4), tmp_path / "cache")
    assert cache is not None and cache.n_positions > 0
    ids = sorted(set(cache.top_k_ids.flatten().tolist()))
    assert ids[-1] < base.cfg.d_vocab
    # each a token both models have: the base id of a text the thinking vocabulary holds
    texts = base.tokenizer.convert_ids_to_tokens(ids)
    assert None not in texts and set(texts) <= set(thinking.tokenizer.get_vocab())
