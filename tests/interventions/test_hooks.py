import pytest
import torch

from mechsteer.core.models import resid_hook_name
from mechsteer.interventions.hooks import (
    Steering,
    ablate,
    add_direction,
    intervene,
    mean_over_spans,
    project_out,
    steer,
)
from tests.typecheck import refused


def test_project_out_removes_the_component():
    torch.manual_seed(0)
    resid = torch.randn(4, 7, 16) * 10
    direction = torch.randn(16)
    ablated = project_out(resid, direction)
    unit = direction / direction.norm()
    assert (ablated @ unit).abs().max() < 1e-5
    # and leaves the orthogonal part alone
    orthogonal = resid - (resid @ unit)[..., None] * unit
    assert torch.allclose(ablated, orthogonal, atol=1e-5)


def test_add_direction_masks_positions_and_rows():
    resid = torch.zeros(2, 3, 4)
    direction = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    out = add_direction(resid, direction, torch.tensor([1.0, 3.0]), mask)
    assert out[0, 0].tolist() == [1, 0, 0, 0]
    assert out[0, 1].tolist() == [0, 0, 0, 0]
    assert out[1, 2].tolist() == [0, 6, 0, 0]
    assert out[1, 0].abs().sum() == 0


def test_add_direction_shape_is_checked():
    with pytest.raises(Exception, match="d_model"):
        add_direction(torch.zeros(2, 3, 4), torch.zeros(5))


def test_mean_over_spans_matches_manual_average():
    torch.manual_seed(0)
    acts = torch.randn(2, 10, 8)
    spans = torch.tensor([[0, 0, 3], [0, 3, 4], [1, 2, 10], [1, 2, 10]])
    pooled = mean_over_spans(acts, spans)
    for row, (b, start, end) in enumerate(spans.tolist()):
        assert torch.allclose(pooled[row], acts[b, start:end].mean(0), atol=1e-6)


@pytest.mark.parametrize("bad", [[[0, 3, 3]], [[0, -1, 2]], [[2, 0, 1]], [[0, 0, 11]]])
def test_mean_over_spans_rejects_bad_spans(bad):
    with pytest.raises(ValueError, match="spans must satisfy"):
        mean_over_spans(torch.zeros(2, 10, 8), torch.tensor(bad))


def test_wrong_direction_size_is_a_clear_error(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ValueError, match=r"shape \(d_model,\) = \(32,\).*got \(31,\)"):
        with steer(model, torch.zeros(31), layers=1):
            pass


def test_layer_out_of_range_is_a_clear_error(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\].*got 3"):
        with steer(model, torch.zeros(32), layers=3):
            pass


def test_non_finite_direction_is_a_clear_error(tiny_models):
    model = tiny_models["llama"]
    direction = torch.zeros(32)
    direction[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        with ablate(model, direction, layers=[0]):
            pass


def test_ablate_context_removes_direction_in_the_model(tiny_models):
    model = tiny_models["qwen2"]
    torch.manual_seed(0)
    direction = torch.randn(32)
    unit = direction / direction.norm()
    tokens = model.tokenizer("some text here", return_tensors="pt").input_ids
    names = [resid_hook_name(layer) for layer in range(3)]
    with ablate(model, direction):
        _, cache = model.run_with_cache(tokens, names_filter=names)
    for name in names:
        assert (cache[name] @ unit).abs().max() < 1e-5
    # after the block the hooks are gone: the direction is back in the residual stream
    _, plain = model.run_with_cache(tokens, names_filter=names)
    assert (plain[names[0]] @ unit).abs().max() > 1e-3


def test_steer_context_adds_at_chosen_positions(tiny_models):
    model = tiny_models["llama"]
    direction = torch.ones(32)
    tokens = model.tokenizer("abcdef", return_tensors="pt").input_ids
    name = resid_hook_name(1)
    _, plain = model.run_with_cache(tokens, names_filter=[name])
    with steer(model, direction, layers=1, coeff=2.0, positions=[2, 4]):
        _, steered = model.run_with_cache(tokens, names_filter=[name])
    delta = (steered[name] - plain[name])[0]
    assert torch.allclose(delta[2], torch.full((32,), 2.0), atol=1e-5)
    assert torch.allclose(delta[4], torch.full((32,), 2.0), atol=1e-5)
    assert delta[[0, 1, 3]].abs().max() < 1e-6


def test_steering_validates_site(tiny_models):
    with refused("unknown residual site", parameter="site"):
        _ = Steering(0, torch.zeros(32), site="resid_after").hook_name  # type: ignore[arg-type]


def test_steering_accepts_int_coefficients_and_rejects_non_numbers(tiny_models):
    model = tiny_models["llama"]
    direction = torch.randn(model.cfg.d_model)
    tokens = model.to_tokens(["hello there"])
    with intervene(model, [Steering(1, direction, coeff=3)]):
        as_int = model(tokens)
    with intervene(model, [Steering(1, direction, coeff=3.0)]):
        as_float = model(tokens)
    assert Steering(1, direction, coeff=3).coeff == 3.0
    assert torch.equal(as_int, as_float) and not torch.equal(as_int, model(tokens))
    for bad in ("3", True, None):
        with refused("coeff must be a number", parameter="coeff"):
            Steering(1, direction, coeff=bad)
