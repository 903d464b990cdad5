"""Placement: devices and dtypes resolved, weights put where asked and checked there, and a pair
whose models load when a stage first needs them and are freed when a stage does not."""

import pytest
import torch

from mechsteer.core.models import (
    PlacementError,
    check_placement,
    load_model,
    resolve_device,
    resolve_dtype,
)
from mechsteer.core.resident import ResidentPair


def test_auto_device_and_dtype():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype(None) == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float13")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(PlacementError, match="sees no CUDA device; use device: auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(PlacementError, match="sees no CUDA device"):
        load_model("organism-base", device="cuda:1")


def test_weights_land_where_asked_and_are_checked(tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["qwen2"]), device="auto", dtype="bfloat16")
    params = list(model.parameters())
    assert {p.device.type for p in params} == {resolve_device("auto").type}
    assert {p.dtype for p in params if p.is_floating_point()} == {torch.bfloat16}
    # The check fails loudly where weights are not what was asked (the silent-CPU-run fault).
    with pytest.raises(PlacementError, match=r"parameters in \['torch.bfloat16'\].*asked for torch.float32"):
        check_placement(model, device=resolve_device("auto"), dtype=torch.float32)
    stray = torch.nn.Linear(4, 4, device="meta")
    with pytest.raises(PlacementError, match=r"parameters on \['meta'\]"):
        check_placement(stray, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(PlacementError, match=r"parameters on \['meta'\]"):
        check_placement(stray, device=None, dtype=torch.float32, device_map="auto")


def test_device_map_goes_to_from_pretrained(tiny_model_dirs, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)  # the loader imports it
    model = load_model(str(tiny_model_dirs["llama"]), device_map={"": "cpu"}, dtype="bfloat16")
    assert seen[-1]["device_map"] == {"": "cpu"} and seen[-1]["dtype"] == torch.bfloat16
    assert all(p.device.type == "cpu" for p in model.parameters())
    load_model(str(tiny_model_dirs["llama"]), device="cpu")
    assert "device_map" not in seen[-1]  # on the CPU the weights load as they always did


def test_resident_pair_loads_on_first_use_and_frees_per_stage(tiny_model_dirs):
    pair = ResidentPair(str(tiny_model_dirs["llama"]), str(tiny_model_dirs["qwen2"]), device="cpu", dtype="auto")
    info = pair.info("thinking")
    assert (info.cfg.n_layers, info.cfg.d_model) == (3, 32) and pair.loaded == () and pair.loads == []
    pair.need("thinking")
    assert pair.thinking.cfg.n_layers == 3 and pair.loaded == ("thinking",)
    assert pair.info("thinking").cfg.model_name == pair.thinking.cfg.model_name == info.cfg.model_name
    pair.need("base")
    assert pair.loaded == ()  # the thinking model is freed before the base model loads
    assert pair.base.cfg.d_model == 32 and pair.loaded == ("base",)
    pair.need("base", "thinking")
    _ = pair.thinking
    assert pair.loads == ["thinking", "base", "thinking"]
    pair.release()
    assert pair.loaded == ()
    with pytest.raises(ValueError, match="unknown model roles"):
        pair.need("judge")  # type: ignore[arg-type]
