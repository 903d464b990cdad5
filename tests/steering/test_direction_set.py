"""DirectionSet.steer / DirectionSet.ablate: the same residual change as the hooks' steer / ablate, then gone."""

import dataclasses

import pytest
import torch

from mechsteer.core.models import resid_hook_name
from mechsteer.interventions.hooks import ablate, steer
from mechsteer.steering.direction_set import DirectionSet


def model_set(model, layer: int = 1, bias: bool = True) -> DirectionSet:
    generator = torch.Generator().manual_seed(0)
    d_model = model.cfg.d_model
    return DirectionSet(
        model_name=model.cfg.model_name, d_model=d_model, n_layers=model.cfg.n_layers, layer=layer,
        site="resid_post", method="mean", behaviour_ids=[4, 7, 9], titles=["plan", "verify", "answer"],
        directions=torch.randn(3, d_model, generator=generator),
        bias=torch.randn(d_model, generator=generator) if bias else None,
    )


def residuals(model, tokens, names):
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return {name: cache[name].clone() for name in names}


def test_steer_changes_the_residual_like_the_hook_and_restores_the_model(tiny_models):
    model = tiny_models["llama"]
    directions = model_set(model)
    tokens = model.tokenizer("abcdefgh", return_tensors="pt").input_ids
    names = [resid_hook_name(layer) for layer in range(model.cfg.n_layers)]
    plain = residuals(model, tokens, names)
    with directions.steer(model, 7, coeff=2.5, positions=[1, 3]):
        steered = residuals(model, tokens, names)
    with steer(model, directions.direction(7), layers=1, coeff=2.5, positions=[1, 3]):
        expected = residuals(model, tokens, names)
    for name in names:
        assert torch.equal(steered[name], expected[name]), name
    assert not torch.equal(steered[names[1]], plain[names[1]])
    assert torch.equal(steered[names[0]], plain[names[0]])  # before the set's layer: untouched
    delta = (steered[names[1]] - plain[names[1]])[0]
    assert torch.allclose(delta[1], 2.5 * directions.direction(7), atol=1e-5)
    assert delta[[0, 2, 4]].abs().max() < 1e-6
    after = residuals(model, tokens, names)  # the with-block removed its hook
    for name in names:
        assert torch.equal(after[name], plain[name]), name


def test_steer_with_bias_adds_bias_plus_direction(tiny_models):
    model = tiny_models["llama"]
    directions = model_set(model)
    tokens = model.tokenizer("abcdef", return_tensors="pt").input_ids
    name = resid_hook_name(1)
    with directions.steer(model, 4, coeff=2.0, with_bias=True):
        steered = residuals(model, tokens, [name])[name]
    with steer(model, directions.direction(4) + directions.bias, layers=1, coeff=2.0):
        expected = residuals(model, tokens, [name])[name]
    assert torch.equal(steered, expected)
    assert torch.equal(directions.steering_vector(4, with_bias=True), directions.direction(4) + directions.bias)
    with pytest.raises(ValueError, match="with_bias needs a direction set with a bias"):
        model_set(model, bias=False).steer(model, 4, with_bias=True)


def test_ablate_projects_out_like_the_hook_and_restores_the_model(tiny_models):
    model = tiny_models["qwen2"]
    directions = model_set(model, layer=2)
    tokens = model.tokenizer("some text here", return_tensors="pt").input_ids
    names = [resid_hook_name(layer) for layer in range(model.cfg.n_layers)]
    plain = residuals(model, tokens, names)
    with directions.ablate(model, [9]):
        ablated = residuals(model, tokens, names)
    with ablate(model, directions.direction(9), layers=2):
        expected = residuals(model, tokens, names)
    for name in names:
        assert torch.equal(ablated[name], expected[name]), name
    unit = directions.direction(9) / directions.direction(9).norm()
    assert (ablated[names[2]] @ unit).abs().max() < 1e-5
    # several behaviours at several layers: projected out one after another, in the given order,
    # so the last one has no component left anywhere
    with directions.ablate(model, [9, 4], layers=[0, 1, 2]):
        every = residuals(model, tokens, names)
    unit_4 = directions.direction(4) / directions.direction(4).norm()
    for name in names:
        assert (every[name] @ unit_4).abs().max() < 1e-5, name
    with directions.ablate(model):  # every behaviour of the set, at its layer
        all_ablated = residuals(model, tokens, names)
    assert torch.equal(all_ablated[names[1]], plain[names[1]])
    assert (all_ablated[names[2]] @ unit).abs().max() < 1e-5  # 9, the set's last behaviour
    after = residuals(model, tokens, names)
    for name in names:
        assert torch.equal(after[name], plain[name]), name


def test_steer_and_ablate_check_the_model(tiny_models):
    model = tiny_models["llama"]
    directions = dataclasses.replace(model_set(model), model_name="another")
    with pytest.raises(ValueError, match="made for 'another'"):
        directions.steer(model, 4)
    with pytest.raises(ValueError, match="made for 'another'"):
        directions.ablate(model)
    with directions.steer(model, 4, allow_other_name=True), directions.ablate(model, [7], allow_other_name=True):
        model(model.tokenizer("ab", return_tensors="pt").input_ids)
    with pytest.raises(ValueError, match="unknown behaviour id 5"):
        directions.steer(model, 5, allow_other_name=True)
