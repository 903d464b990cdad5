import os
from pathlib import Path

import pytest

# Tests never touch a hub, and wandb never writes outside a temporary folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

from tests.tiny_models import save_tiny_model  # noqa: E402

# The test models are tiny (d_model 32-576): one thread is as fast, and two OpenMP threads
# spin-waiting on a busy 2-core machine make small matmuls ~10x slower. Set once for the
# whole session; tests do not change it.
torch.set_num_threads(1)

ARCHITECTURES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: save_tiny_model(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs):
    from mechsteer.core.models import load_model

    return {arch: load_model(str(folder)) for arch, folder in tiny_model_dirs.items()}
