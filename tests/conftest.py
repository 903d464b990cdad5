import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

# Tests never touch a hub, and wandb never writes outside a temporary folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

from mechsteer.core import plugins  # noqa: E402
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


@pytest.fixture
def install_plugin(monkeypatch) -> Callable[[Callable[[], None]], list[str]]:
    """``install(register)`` makes ``register`` the one installed mechsteer plug-in, not yet loaded
    (the installed ones already are), so that the next registry miss calls it; returns the list
    its calls are noted in."""
    plugins.load_plugins()

    def install(register: Callable[[], None]) -> list[str]:
        calls: list[str] = []

        def counted() -> None:
            calls.append("register")
            register()

        entry_point = SimpleNamespace(value="tests:register", load=lambda: counted)
        monkeypatch.setattr(plugins, "entry_points",
                            lambda group: [entry_point] if group == plugins.ENTRY_POINT_GROUP else [])
        monkeypatch.setattr(plugins, "_loaded", False)
        return calls

    return install
