
import pytest
import torch

from mechsteer.core.models import (
    ModelNotAvailableError,
    load_model,
    load_pair,
    resolve_spec,
    smollm2_dir,
)
from mechsteer.interventions.generation import generate
from tests.typecheck import refused


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_models_load_through_the_bridge(tiny_model_dirs, arch):
    model = load_model(str(tiny_model_dirs[arch]))
    assert type(model).__name__ == "TransformerBridge"
    assert model.cfg.n_layers == 3 and model.cfg.d_model == 32
    assert "blocks.2.hook_resid_post" in model.hook_dict
    logits = model(torch.tensor([[1, 5, 6]]))
    assert logits.shape == (1, 3, model.cfg.d_vocab)


def test_dtype_option(tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["llama"]), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with refused("unknown dtype", parameter="dtype"):
        load_model(str(tiny_model_dirs["llama"]), dtype="float13")  # type: ignore[arg-type]


def test_unknown_name_offline_explains_how_to_supply_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="To use local weights, pass a folder"):
        load_model("no-such-org/no-such-model-1b")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        resolve_spec(str(tmp_path))


def test_pair_knows_whether_tokenizers_match(tiny_model_dirs, tmp_path):
    from tests.tiny_models import save_tiny_model

    pair = load_pair(str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"]))
    assert pair.shares_tokenizer
    # TL adds <|endoftext|> to Qwen2 tokenizers: a superset still shares every base token
    assert load_pair(str(tiny_model_dirs["llama"]), str(tiny_model_dirs["qwen2"])).shares_tokenizer
    merged = save_tiny_model(tmp_path / "bpe", "llama", extra_merges=True)
    assert not load_pair(str(tiny_model_dirs["llama"]), str(merged)).shares_tokenizer


@pytest.mark.slow
def test_smollm2_loads_offline_and_knows_paris(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("smollm2")  # converts the GGUF once if the cache is empty
    out = generate(model, ["The capital of France is"], max_new_tokens=6)
    assert "Paris" in out.texts[0], out.texts[0]
    # The reload reads the converted folder as it is: no second conversion rewrites it.
    converted = smollm2_dir() / "config.json"
    written = converted.stat().st_mtime_ns
    again = load_model("smollm2")
    assert converted.stat().st_mtime_ns == written
    assert again.cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
