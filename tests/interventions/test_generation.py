"""KV-cached, batched, steered generation must equal a naive full-recompute loop."""

import pytest
import torch

from mechsteer.core.models import resid_hook_name
from mechsteer.interventions.generation import generate, left_pad
from mechsteer.interventions.hooks import Steering, intervene

PROMPTS = ["The cat sat", "A much longer prompt, with padding needed", "Hi"]
MAX_NEW = 12


def full_recompute(model, prompt_ids, interventions_for_row, max_new, eos_id):
    """The oracle: one prompt, no padding, no cache; every step reruns the whole sequence."""
    tokens = list(prompt_ids)
    generated, step_logits = [], []
    with torch.no_grad(), intervene(model, interventions_for_row):
        for _ in range(max_new):
            logits = model(torch.tensor([tokens]))[0, -1]
            step_logits.append(logits)
            token = int(logits.argmax())
            generated.append(token)
            tokens.append(token)
            if token == eos_id:
                break
    return generated, step_logits


def cached_with_logits(model, prompts, **kwargs):
    captured = []

    def capture(state):
        captured.append(state.logits.clone())
        return None

    out = generate(model, prompts, max_new_tokens=MAX_NEW, step_callback=capture, **kwargs)
    return out, captured


def assert_matches_oracle(model, out, captured, interventions_per_row):
    eos = model.tokenizer.eos_token_id
    for row, prompt_ids in enumerate(out.prompt_token_ids):
        expected_tokens, expected_logits = full_recompute(
            model, prompt_ids, interventions_per_row(row), MAX_NEW, eos
        )
        assert out.token_ids[row] == expected_tokens, f"row {row} tokens differ"
        for step, logits in enumerate(expected_logits):
            diff = (captured[step][row] - logits).abs().max().item()
            assert diff < 1e-4, f"row {row} step {step}: logits differ by {diff}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("layers", [(1,), (0, 2)])
def test_kv_cache_matches_full_recompute(tiny_models, arch, layers):
    model = tiny_models[arch]
    torch.manual_seed(1)
    steering = [Steering(layer, torch.randn(model.cfg.d_model), coeff=2.0) for layer in layers]
    out, captured = cached_with_logits(model, PROMPTS, interventions=steering)
    assert len({len(ids) for ids in out.prompt_token_ids}) == 3  # really left-padded
    assert_matches_oracle(model, out, captured, lambda row: steering)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_steering_at_absolute_positions_with_padding(tiny_models, arch):
    """Positions count each row's own tokens; prompt and generated positions both work."""
    model = tiny_models[arch]
    torch.manual_seed(2)
    steering = [Steering(1, torch.randn(model.cfg.d_model), coeff=4.0, positions=[1, 2, 13, 15])]
    out, captured = cached_with_logits(model, PROMPTS, interventions=steering)
    assert_matches_oracle(model, out, captured, lambda row: steering)


def test_unsteered_differs_from_steered(tiny_models):
    """Guards the tests above against steering that silently does nothing."""
    model = tiny_models["llama"]
    torch.manual_seed(1)
    steering = [Steering(1, torch.randn(model.cfg.d_model), coeff=2.0)]
    plain = generate(model, PROMPTS, max_new_tokens=MAX_NEW)
    steered = generate(model, PROMPTS, max_new_tokens=MAX_NEW, interventions=steering)
    assert plain.token_ids != steered.token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_step_callback_steering_matches_oracle(tiny_models, arch):
    """A vector returned by the callback at step s is added at the position fed next, which
    holds the token generated at step s: absolute position len(prompt) + s."""
    model = tiny_models[arch]
    torch.manual_seed(3)
    direction = torch.randn(model.cfg.d_model) * 3
    hook = resid_hook_name(1)
    steer_steps = {0, 2, 3, 7}
    captured = []

    def callback(state):
        captured.append(state.logits.clone())
        assert state.activations[hook].shape == (3, model.cfg.d_model)
        if state.step in steer_steps:
            return {hook: direction.expand(3, -1)}
        return None

    out = generate(model, PROMPTS, max_new_tokens=MAX_NEW, step_callback=callback,
                   steering_hooks=[hook], record_hooks=[hook])

    def oracle_steering(row):
        n_prompt = len(out.prompt_token_ids[row])
        return [Steering(1, direction, 1.0, positions=[n_prompt + s for s in steer_steps])]

    assert_matches_oracle(model, out, captured, oracle_steering)


def test_recorded_activations_match_full_forward(tiny_models):
    model = tiny_models["llama"]
    hook = resid_hook_name(2)
    out = generate(model, PROMPTS, max_new_tokens=6, record_hooks=[hook], return_activations=True)
    for row, prompt_ids in enumerate(out.prompt_token_ids):
        sequence = prompt_ids + out.token_ids[row]
        _, cache = model.run_with_cache(torch.tensor([sequence]), names_filter=[hook])
        # the activation that predicted generated token i sits at position len(prompt) - 1 + i
        start = len(prompt_ids) - 1
        expected = cache[hook][0, start : start + len(out.token_ids[row])]
        recorded = out.activations[hook][row]
        assert recorded.shape == expected.shape
        assert (recorded - expected).abs().max() < 1e-4


def test_callback_rejects_bad_steering(tiny_models):
    model = tiny_models["llama"]
    hook = resid_hook_name(1)
    with pytest.raises(ValueError, match="not in steering_hooks"):
        generate(model, ["abc"], max_new_tokens=2, step_callback=lambda s: {hook: torch.zeros(1, 32)})
    with pytest.raises(ValueError, match=r"\(batch, d_model\) = \(1, 32\)"):
        generate(model, ["abc"], max_new_tokens=2, steering_hooks=[hook],
                 step_callback=lambda s: {hook: torch.zeros(1, 31)})


def test_sampling_is_seeded(tiny_models):
    model = tiny_models["qwen2"]
    first = generate(model, PROMPTS, max_new_tokens=8, do_sample=True, seed=7, top_k=20, top_p=0.9)
    second = generate(model, PROMPTS, max_new_tokens=8, do_sample=True, seed=7, top_k=20, top_p=0.9)
    other = generate(model, PROMPTS, max_new_tokens=8, do_sample=True, seed=8, top_k=20, top_p=0.9)
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


def test_batch_size_does_not_change_greedy_output(tiny_models):
    model = tiny_models["gpt2"]
    together = generate(model, PROMPTS, max_new_tokens=8)
    one_by_one = generate(model, PROMPTS, max_new_tokens=8, batch_size=1)
    assert together.token_ids == one_by_one.token_ids


def test_stop_strings_cut_the_text(tiny_models):
    model = tiny_models["llama"]
    free = generate(model, ["The cat sat"], max_new_tokens=20, eos_token_id=[])
    text = free.texts[0]
    stop = text[5:7]
    first = text.find(stop)
    stopped = generate(model, ["The cat sat"], max_new_tokens=20, stop_strings=[stop], eos_token_id=[])
    assert stopped.finish_reasons == ["stop"]
    assert stopped.texts[0] == text[: first + len(stop)]
    assert len(stopped.token_ids[0]) < len(free.token_ids[0])


def test_eos_stops_a_row(tiny_models):
    model = tiny_models["llama"]
    free = generate(model, ["The cat sat"], max_new_tokens=10, eos_token_id=[])
    fake_eos = free.token_ids[0][3]
    out = generate(model, ["The cat sat"], max_new_tokens=10, eos_token_id=fake_eos)
    assert out.finish_reasons == ["eos"]
    assert out.token_ids[0] == free.token_ids[0][: free.token_ids[0].index(fake_eos) + 1]


def test_left_pad_layout():
    tokens, mask, n_pad = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert n_pad.tolist() == [0, 2]
