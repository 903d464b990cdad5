"""Current-position steering: the coefficient rules and cache modes of mechsteer.hybrid.coefficients,
batched and KV-cached, equal to the full-recompute oracle token for token."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mechsteer.core.models import load_model
from mechsteer.hybrid.coefficients import (
    COEFFICIENT_RULES,
    check_rule_and_mode,
    first_match,
    match_order,
)
from mechsteer.hybrid.generator import HybridConfig, hybrid_generate
from mechsteer.hybrid.reference import reference_hybrid_trace
from mechsteer.hybrid.timing import SAEArgmaxPolicy
from tests.device_discipline import DeviceDiscipline
from tests.hybrid.test_hybrid import LinearClassifier, make_vectors
from tests.tiny_models import save_tiny_model

PROMPTS = ["The cat sat", "A much longer prompt, with some padding", "Hi", "Why?"]
CROSS_PROMPTS = ["the rather", "there then the", "in the"]


class SoftplusCoefficients(torch.nn.Module):
    """A deterministic stand-in for the trained coefficient MLP: softplus of a fixed linear map of
    the residual plus a per-behaviour offset (BIAS_ONLY, -1, reads the first offset)."""

    def __init__(self, d_model: int, n_behaviours: int = 4, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(d_model, generator=generator) * 0.3, requires_grad=False)
        self.offset = torch.nn.Parameter(torch.linspace(-0.5, 1.0, n_behaviours + 1), requires_grad=False)

    def forward(self, resid, behaviours):
        return torch.nn.functional.softplus(resid.float() @ self.weight + self.offset[behaviours + 1])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The base model; a thinking model near it (the same tokenizer, perturbed weights: the two
    agree often, so steps are both steered and not, and steered tokens sometimes match); a
    thinking model near it with a different tokenizer (a BPE with merges)."""
    root = tmp_path_factory.mktemp("current_position")
    base_dir = save_tiny_model(root / "base", "llama", seed=0)
    bpe_dir = save_tiny_model(root / "bpe", "llama", seed=2, extra_merges=True)
    for name, tokenizer_dir in (("near", base_dir), ("near_bpe", bpe_dir)):
        near = AutoModelForCausalLM.from_pretrained(base_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        near.resize_token_embeddings(len(tokenizer))  # the BPE's merges come after the shared characters
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for parameter in near.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        near.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {"base": load_model(str(base_dir)), "near": load_model(str(root / "near")),
            "near_bpe": load_model(str(root / "near_bpe"))}


def config_for(rule: str, mode: str, **overrides) -> HybridConfig:
    grid = dict(coefficients=(1.0,), windows=(1,)) if rule == "learned" else \
        dict(coefficients=(1.0, 0.05, 0.3), windows=(1,) if mode == "keep" else (1, 3))
    settings = dict(steer_layer=1, read_layer=2, max_new_tokens=12, stop_strings=("yy",), batch_size=3,
                    coefficient_rule=rule, cache_mode=mode, kl_top_k=20, **grid)
    settings.update(overrides)
    return HybridConfig(**settings)


def run_both(models, thinking_name, prompts, config, shared):
    base, thinking = models["base"], models[thinking_name]
    policy = SAEArgmaxPolicy(LinearClassifier(thinking.cfg.d_model, 4))
    vectors = make_vectors(base.cfg.d_model)
    coefficient_model = SoftplusCoefficients(base.cfg.d_model) if config.coefficient_rule == "learned" else None
    out = hybrid_generate(base, thinking, prompts, prompts, vectors, policy, config,
                          coefficient_model=coefficient_model)
    traces = [reference_hybrid_trace(base, thinking, prompt, prompt, vectors, policy, config, shared_tokenizer=shared,
                                     coefficient_model=coefficient_model) for prompt in prompts]
    return out, traces


def assert_equal_to_oracle(out, traces):
    for row, trace in enumerate(traces):
        assert out.token_ids[row] == trace.token_ids, f"row {row}"
        logs = out.token_logs[row]
        assert [log.steered for log in logs] == trace.steered, f"row {row}"
        # the learned coefficient is read off a cached residual: equal up to float rounding
        assert [log.coeff for log in logs] == pytest.approx(trace.coeffs, rel=1e-4, abs=1e-6), f"row {row}"
        assert [log.matches_thinking for log in logs] == trace.matches, f"row {row}"


@pytest.mark.parametrize("mode", ["revert", "keep"])
@pytest.mark.parametrize("rule", sorted(COEFFICIENT_RULES))
def test_shared_tokenizer_matches_oracle(models, rule, mode):
    out, traces = run_both(models, "near", PROMPTS, config_for(rule, mode), shared=True)
    assert_equal_to_oracle(out, traces)
    # two batches, rows ending at different lengths (a stop string, EOS, max_new_tokens)
    assert len({len(ids) for ids in out.token_ids}) > 1
    steered = [log.steered for logs in out.token_logs for log in logs]
    assert any(steered) and not all(steered)
    if rule == "think_top1_match":  # both outcomes of the ceiling: a match, and rows left unsteered
        disagreements = sum(not log.agree for logs in out.token_logs for log in logs)
        assert 0 < sum(steered) < disagreements
        # the ceiling takes only a coefficient whose token is the thinking model's
        assert all(log.matches_thinking for logs in out.token_logs for log in logs if log.steered)
    else:
        assert not all(log.matches_thinking for logs in out.token_logs for log in logs if log.steered)
    if rule == "learned":  # the predicted coefficients, not a grid's
        assert len({round(log.coeff, 4) for logs in out.token_logs for log in logs if log.steered}) > 5


@pytest.mark.parametrize("mode", ["revert", "keep"])
@pytest.mark.parametrize("rule", ["guardrail", "think_top1_match", "learned"])
def test_different_tokenizers_match_oracle(models, rule, mode):
    out, traces = run_both(models, "near_bpe", CROSS_PROMPTS, config_for(rule, mode), shared=False)
    assert_equal_to_oracle(out, traces)
    assert any(log.steered for logs in out.token_logs for log in logs)


@pytest.mark.parametrize("rule", ["guardrail", "learned"])
def test_keep_changes_later_tokens(models, rule):
    """Later tokens attend to the kept shift: keep and revert part ways after a steered step, and
    never before the first one."""
    outputs = {}
    for mode in ("revert", "keep"):
        outputs[mode], _ = run_both(models, "near", PROMPTS[:1], config_for(rule, mode, max_new_tokens=14), True)
    revert, keep = outputs["revert"].token_ids[0], outputs["keep"].token_ids[0]
    assert revert != keep
    first_steered = [log.steered for log in outputs["revert"].token_logs[0]].index(True)
    first_difference = next(i for i, (a, b) in enumerate(zip(revert, keep, strict=False)) if a != b)
    assert first_difference > first_steered


@pytest.mark.parametrize("rule", ["kl_topk", "learned", "think_top1_match"])
def test_rules_and_keep_are_device_clean(models, rule):
    base, thinking = models["base"], models["near"]
    config = config_for(rule, "keep", ignore_eos=True, stop_strings=(), max_new_tokens=8)
    coefficient_model = SoftplusCoefficients(base.cfg.d_model) if rule == "learned" else None
    mode = DeviceDiscipline()
    with mode:
        out = hybrid_generate(base, thinking, PROMPTS[:3], PROMPTS[:3], make_vectors(base.cfg.d_model),
                              SAEArgmaxPolicy(LinearClassifier(thinking.cfg.d_model, 4)), config,
                              coefficient_model=coefficient_model)
    assert mode.faults == []
    steps = max(len(ids) for ids in out.token_ids)
    assert mode.host_transfers() <= 2 * steps + 1
    # per row a few ids, flags (whether the steered token is the thinking model's among them), top latents and
    # the learned coefficient; no full-vocabulary logits (107)
    assert max(t.numel for t in mode.transfers) <= 3 * 14
    assert out.largest_fork <= config.max_candidates_per_chunk


def test_bad_settings_are_clear_errors(models):
    base, bpe = models["base"], models["near_bpe"]
    with pytest.raises(ValueError, match=r"cache_mode 'keep' .* set windows=\(1,\)"):
        HybridConfig(1, 1, windows=(3,), cache_mode="keep")
    # names outside the Literals (a config file's typo; the tests' type checker refuses them earlier)
    with pytest.raises(ValueError, match="cache_mode must be one of"):
        check_rule_and_mode("guardrail", "persist", (1,), (1.0,), 50)
    with pytest.raises(ValueError, match="coefficient_rule must be one of"):
        check_rule_and_mode("pg", "revert", (1,), (1.0,), 50)
    with pytest.raises(ValueError, match="'learned' takes no grid"):
        HybridConfig(1, 1, coefficients=(0.5, 1.0), coefficient_rule="learned")
    vectors, policy = make_vectors(base.cfg.d_model), SAEArgmaxPolicy(LinearClassifier(bpe.cfg.d_model, 4))
    with pytest.raises(ValueError, match="'learned' needs a coefficient_model"):
        hybrid_generate(base, bpe, ["a"], ["a"], vectors, policy, HybridConfig(1, 1, coefficient_rule="learned"))
    with pytest.raises(ValueError, match="only it takes one"):
        hybrid_generate(base, bpe, ["a"], ["a"], vectors, policy, HybridConfig(1, 1),
                        coefficient_model=SoftplusCoefficients(base.cfg.d_model))
    with pytest.raises(ValueError, match="'kl_topk' .* sharing their ordinary vocabulary"):
        hybrid_generate(base, bpe, ["a"], ["a"], vectors, policy, HybridConfig(1, 1, coefficient_rule="kl_topk"))


def test_first_match_takes_the_smallest_coefficient():
    candidates = [(1.0, 1), (0.5, 1), (0.5, 3), (2.0, 1)]
    order = torch.tensor(match_order(candidates))
    assert order.tolist() == [1, 2, 0, 3]
    matches = torch.tensor([[True, False, True, True], [False, False, False, False], [True, False, False, True]])
    assert first_match(matches, order).tolist() == [2, -1, 0]
