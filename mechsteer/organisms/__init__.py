"""Model organisms: a tiny base/thinking Llama pair with planted, labelled reasoning behaviours.

The base organism knows HOW to reason step by step (plan, compute, verify, correct,
answer) but, prompted normally, answers in one shot; the thinking organism learned WHEN
to use those behaviours. Both are trained here on CPU (`mechsteer organism train`) and
ship in ``weights/base`` and ``weights/thinking``.
"""

from __future__ import annotations

from pathlib import Path

ORGANISM_NAMES: tuple[str, ...] = ("base", "thinking")
WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"


def weights_dir(name: str) -> Path:
    """The shipped folder (config, safetensors, tokenizer) of organism ``name``."""
    if name not in ORGANISM_NAMES:
        raise ValueError(f"organism name must be one of {ORGANISM_NAMES}, got {name!r}")
    folder = WEIGHTS_ROOT / name
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"organism weights missing in {folder}; train them with "
            f"`mechsteer organism train --out DIR` and copy DIR/{name} there"
        )
    return folder


__all__ = ["ORGANISM_NAMES", "WEIGHTS_ROOT", "weights_dir"]
