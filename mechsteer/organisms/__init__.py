"""Model organisms: a tiny base/thinking Llama pair with planted, labelled reasoning behaviours.

The base organism knows HOW to reason step by step (plan, compute, verify, correct,
answer) but, prompted normally, answers in one shot; the thinking organism learned WHEN
to use those behaviours. Both are trained here on CPU (`mechsteer organism train`). Two pairs
ship: grammar v1 in ``weights/base`` and ``weights/thinking`` (model specs ``organism-base``,
``organism-thinking``), grammar v3 (timing matters mid-trace; see grammar.py) in ``weights/v3/``
(``organism-v3-base``, ``organism-v3-thinking``).
"""

from __future__ import annotations

from pathlib import Path

ORGANISM_NAMES: tuple[str, ...] = ("base", "thinking")
WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
# The shipped pairs: grammar -> folder under WEIGHTS_ROOT ("" for v1, shipped first).
SHIPPED_PAIRS: dict[str, str] = {"v1": "", "v3": "v3"}


def model_spec(name: str, grammar: str = "v1") -> str:
    """The registered model spec of a shipped organism: ``organism-base``, ``organism-v3-thinking`` ..."""
    return f"organism-{name}" if grammar == "v1" else f"organism-{grammar}-{name}"


def weights_dir(name: str, grammar: str = "v1") -> Path:
    """The shipped folder (config, safetensors, tokenizer) of organism ``name`` of ``grammar``'s pair."""
    if name not in ORGANISM_NAMES:
        raise ValueError(f"organism name must be one of {ORGANISM_NAMES}, got {name!r}")
    if grammar not in SHIPPED_PAIRS:
        raise ValueError(f"no shipped organism pair of grammar {grammar!r}; shipped: {sorted(SHIPPED_PAIRS)}")
    folder = WEIGHTS_ROOT / SHIPPED_PAIRS[grammar] / name
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"organism weights missing in {folder}; train them with "
            f"`mechsteer organism train --grammar {grammar} --out DIR` and copy DIR/{name} there"
        )
    return folder


__all__ = ["ORGANISM_NAMES", "SHIPPED_PAIRS", "WEIGHTS_ROOT", "model_spec", "weights_dir"]
