"""Model organisms: a tiny base/thinking Llama pair with planted, labelled reasoning behaviours.

The base organism knows HOW to reason step by step (plan, compute, verify, correct,
answer) but, prompted normally, answers in one shot; the thinking organism learned WHEN
to use those behaviours. Both are trained here on CPU (`mechsteer organism train`). Two pairs
ship: grammar v1 in ``weights/base`` and ``weights/thinking`` (model specs ``organism-base``,
``organism-thinking``), grammar v3 (timing matters mid-trace; see grammar.py) in ``weights/v3/``
(``organism-v3-base``, ``organism-v3-thinking``), grammar v4 (a realistic base, two situations that need
different behaviours, and a negative-control base; see grammar_v4.py) in ``weights/v4/``
(``organism-v4-base``, ``organism-v4-thinking``, ``organism-v4-negative_base``).
"""

from __future__ import annotations

from pathlib import Path

ORGANISM_NAMES: tuple[str, ...] = ("base", "thinking")
# v4's negative-control base: it never learned carrying, and pairs with v4's thinking organism.
NEGATIVE_BASE = "negative_base"
WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
# The shipped pairs: grammar -> folder under WEIGHTS_ROOT ("" for v1, shipped first).
SHIPPED_PAIRS: dict[str, str] = {"v1": "", "v3": "v3", "v4": "v4"}
# Organisms a grammar's shipped set holds beyond base and thinking.
EXTRA_ORGANISMS: dict[str, tuple[str, ...]] = {"v4": (NEGATIVE_BASE,)}


def organism_names(grammar: str = "v1") -> tuple[str, ...]:
    """The organisms of ``grammar``'s shipped set: base, thinking and any extra (v4: the negative base)."""
    return ORGANISM_NAMES + EXTRA_ORGANISMS.get(grammar, ())


def model_spec(name: str, grammar: str = "v1") -> str:
    """The registered model spec of a shipped organism: ``organism-base``, ``organism-v3-thinking`` ..."""
    return f"organism-{name}" if grammar == "v1" else f"organism-{grammar}-{name}"


def weights_dir(name: str, grammar: str = "v1") -> Path:
    """The shipped folder (config, safetensors, tokenizer) of organism ``name`` of ``grammar``'s pair."""
    if name not in organism_names(grammar):
        raise ValueError(f"organism name must be one of {organism_names(grammar)} for grammar {grammar}, got {name!r}")
    if grammar not in SHIPPED_PAIRS:
        raise ValueError(f"no shipped organism pair of grammar {grammar!r}; shipped: {sorted(SHIPPED_PAIRS)}")
    folder = WEIGHTS_ROOT / SHIPPED_PAIRS[grammar] / name
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        negative = " --negative-base" if name == NEGATIVE_BASE else ""
        raise FileNotFoundError(
            f"organism weights missing in {folder}; train them with "
            f"`mechsteer organism train --grammar {grammar}{negative} --out DIR` and copy DIR/{name} there"
        )
    return folder


__all__ = ["EXTRA_ORGANISMS", "NEGATIVE_BASE", "ORGANISM_NAMES", "SHIPPED_PAIRS", "WEIGHTS_ROOT", "model_spec",
           "organism_names", "weights_dir"]
