"""The KV-cached batched hybrid must equal a naive full-recompute oracle of the same algorithm."""

import pytest
import torch

from mechsteer.core.models import load_model
from mechsteer.hybrid.generator import HybridConfig, behaviour_vectors, hybrid_generate
from mechsteer.hybrid.pair_vocab import ThinkingText
from mechsteer.hybrid.reference import reference_hybrid_generate
from mechsteer.hybrid.timing import (
    BIAS_ONLY,
    AlwaysBiasPolicy,
    BiasOnlyPolicy,
    NeverPolicy,
    PolicyInput,
    RandomFiringPolicy,
    SAEArgmaxPolicy,
    ThresholdPolicy,
)
from mechsteer.steering.direction_set import DirectionSet
from tests.tiny_models import char_tokenizer, save_tiny_model

PROMPTS = ["The cat sat", "A much longer prompt, with some padding", "Hi"]


class LinearClassifier:
    """A stand-in SAE: centring plus a fixed random encoder (deterministic per row)."""

    def __init__(self, d_model: int, n_latents: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.encoder = torch.randn(d_model, n_latents, generator=generator)

    def prepare(self, acts, *, centring_mean=None):
        return acts / acts.norm(dim=-1, keepdim=True)

    def encode_pre(self, x):
        return x @ self.encoder


@pytest.fixture(scope="module")
def pair_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_models")
    base = load_model(str(save_tiny_model(root / "base", "llama", seed=0)))
    thinking = load_model(str(save_tiny_model(root / "thinking", "qwen2", seed=1)))
    thinking_bpe = load_model(str(save_tiny_model(root / "thinking_bpe", "llama", seed=2, extra_merges=True)))
    return base, thinking, thinking_bpe


def direction_set(directions, behaviour_ids, bias=None) -> DirectionSet:
    return DirectionSet(model_name="tiny", d_model=directions.shape[1], n_layers=3, layer=1, site="resid_post",
                        method="mean", behaviour_ids=behaviour_ids, titles=[f"b{b}" for b in behaviour_ids],
                        directions=directions, bias=bias)


def make_vectors(d_model: int, n_behaviours: int = 4, seed: int = 0) -> DirectionSet:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_behaviours, d_model, generator=generator) * 3
    return direction_set(directions, behaviour_ids=[0, 1, 2, 3][:n_behaviours], bias=torch.randn(d_model, generator=generator))


def oracle(base, thinking, base_prompt, think_prompt, vectors, policy, config, shared):
    return reference_hybrid_generate(base, thinking, base_prompt, think_prompt, vectors, policy, config,
                                     shared_tokenizer=shared)


CONFIGS = {
    "window1": HybridConfig(steer_layer=1, read_layer=2, coefficients=(1.0,), windows=(1,), max_new_tokens=12),
    "grid_windows": HybridConfig(steer_layer=1, read_layer=1, coefficients=(0.5, 2.0), windows=(1, 3, 50), max_new_tokens=12),
}


@pytest.mark.parametrize(("config_name", "policy_name"),
                         [("window1", "sae_argmax"), ("grid_windows", "sae_argmax"), ("window1", "threshold")])
def test_shared_tokenizer_matches_oracle(pair_models, config_name, policy_name):
    base, thinking, _ = pair_models
    config = CONFIGS[config_name]
    classifier = LinearClassifier(thinking.cfg.d_model, 4)
    policy = SAEArgmaxPolicy(classifier) if policy_name == "sae_argmax" else ThresholdPolicy(classifier, threshold=0.3)
    vectors = make_vectors(base.cfg.d_model)
    think_prompts = [f"Think: {p}" for p in PROMPTS]
    out = hybrid_generate(base, thinking, PROMPTS, think_prompts, vectors, policy, config)
    n_steered = 0
    for row, prompt in enumerate(PROMPTS):
        expected, expected_steered = oracle(base, thinking, prompt, think_prompts[row], vectors, policy, config, shared=True)
        assert out.token_ids[row] == expected, f"row {row}"
        assert [log.steered for log in out.token_logs[row]] == expected_steered
        n_steered += sum(expected_steered)
    assert n_steered > 0, "the test must exercise steering"


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_different_tokenizers_match_oracle(pair_models, config_name):
    base, _, thinking_bpe = pair_models
    config = CONFIGS[config_name]
    policy = SAEArgmaxPolicy(LinearClassifier(thinking_bpe.cfg.d_model, 4))
    vectors = make_vectors(base.cfg.d_model)
    prompts = ["the rather", "there then the", "in the"]
    out = hybrid_generate(base, thinking_bpe, prompts, prompts, vectors, policy, config)
    for row, prompt in enumerate(prompts):
        expected, expected_steered = oracle(base, thinking_bpe, prompt, prompt, vectors, policy, config, shared=False)
        assert out.token_ids[row] == expected, f"row {row}"
        assert [log.steered for log in out.token_logs[row]] == expected_steered


def test_thinking_text_merges_with_previous_tokens():
    """Appending 't', 'h', 'e' re-tokenizes to the merged 'the': the earlier tokens are replaced."""
    tokenizer = char_tokenizer(extra_merges=True)
    text = ThinkingText(tokenizer, n_rows=1, lookback_tokens=4)
    full = ""
    rewinds = []
    for piece in ["t", "h", "e", " ", "t", "h", "e", "r", "e", "!"]:
        before = len(text.ids[0])
        kept, new = text.extend(0, piece)
        full += piece
        rewinds.append(before - kept)
        assert text.ids[0] == tokenizer(full, add_special_tokens=False)["input_ids"]
        assert text.ids[0][kept:] == new
    assert rewinds[1] == 1  # "t" + "h" -> "th" replaces "t"
    assert rewinds[2] == 1  # "th" + "e" -> "the"
    assert max(rewinds) >= 1 and rewinds[0] == 0


def test_policies_never_and_always(pair_models):
    base, thinking, _ = pair_models
    config = HybridConfig(steer_layer=1, read_layer=1, max_new_tokens=6)
    vectors = make_vectors(base.cfg.d_model)
    never = hybrid_generate(base, thinking, PROMPTS, PROMPTS, vectors, NeverPolicy(), config)
    from mechsteer.interventions.generation import generate

    plain = generate(base, PROMPTS, max_new_tokens=6)
    assert never.token_ids == plain.token_ids
    assert never.steered_fractions == [0.0, 0.0, 0.0]
    always = hybrid_generate(base, thinking, PROMPTS, PROMPTS, vectors, AlwaysBiasPolicy(), config)
    assert always.steered_fractions == [1.0, 1.0, 1.0]
    assert all(log.behaviour == BIAS_ONLY for logs in always.token_logs for log in logs)


def test_bias_only_keeps_the_timing_and_drops_the_behaviour(pair_models):
    base, thinking, _ = pair_models
    config = HybridConfig(steer_layer=1, read_layer=1, max_new_tokens=8)
    vectors = make_vectors(base.cfg.d_model)
    timing = RandomFiringPolicy(rate=0.5, behaviour_ids=[0, 1, 2], seed=5)
    with_behaviours = hybrid_generate(base, thinking, PROMPTS, PROMPTS, vectors, timing, config)
    timing = RandomFiringPolicy(rate=0.5, behaviour_ids=[0, 1, 2], seed=5)
    bias_only = hybrid_generate(base, thinking, PROMPTS, PROMPTS, vectors, BiasOnlyPolicy(timing), config)
    steered = [[log.steered for log in logs] for logs in with_behaviours.token_logs]
    assert any(any(row) for row in steered) and not all(all(row) for row in steered)
    # the same steps steer (the random timing does not depend on the generated text)
    assert [[log.steered for log in logs] for logs in bias_only.token_logs] == steered
    assert all(log.behaviour == BIAS_ONLY for logs in bias_only.token_logs for log in logs if log.steered)
    assert any(log.behaviour != BIAS_ONLY for logs in with_behaviours.token_logs for log in logs if log.steered)


def test_random_firing_is_seeded_and_respects_rate():
    policy_a = RandomFiringPolicy(rate=0.25, behaviour_ids=[0, 1, 2], seed=3)
    policy_b = RandomFiringPolicy(rate=0.25, behaviour_ids=[0, 1, 2], seed=3)
    state = PolicyInput(0, torch.zeros(4000, 8), torch.zeros(4000, 5), torch.zeros(4000, 5), torch.ones(4000, dtype=torch.bool))
    first, second = policy_a.decide(state), policy_b.decide(state)
    assert torch.equal(first.steer, second.steer) and torch.equal(first.behaviour, second.behaviour)
    assert 0.2 < first.steer.float().mean() < 0.3
    assert set(first.behaviour.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="rate must be in"):
        RandomFiringPolicy(rate=1.5, behaviour_ids=[0])


def test_bad_inputs_are_clear_errors(pair_models):
    base, thinking, _ = pair_models
    vectors = direction_set(torch.zeros(2, 31), [0, 1])
    with pytest.raises(ValueError, match="d_model 31 but the base model has 32"):
        hybrid_generate(base, thinking, ["a"], ["a"], vectors, NeverPolicy(), HybridConfig(1, 1))
    with pytest.raises(ValueError, match="steer_layer must be in"):
        hybrid_generate(base, thinking, ["a"], ["a"], make_vectors(32), NeverPolicy(), HybridConfig(7, 1))
    with pytest.raises(ValueError, match="no direction for behaviour 9"):
        behaviour_vectors(make_vectors(32), torch.tensor([9]))
