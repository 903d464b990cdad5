"""The config keys as a person reads them, rendered from their declarations
(:mod:`mechsteer.experiment.keys`): the listing at the end of ``mechsteer run --help``, the help of
its override flags, and the key table of docs/config.md (``mechsteer info --keys``), so that no
list of keys is written by hand.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from mechsteer.core.validation import describe, field_hints
from mechsteer.experiment.keys import (
    COMPARISON_EVALS,
    CORRECTION_EVALS,
    CORRECTION_STEERED,
    EVALS,
    HYBRID,
    PLAIN_EVALS,
    STAGES,
    TRAIN_TRACES,
    KeyInfo,
    KeySection,
    key_defaults,
    key_infos,
)

# Groups of stages a key's "read by" names at once, tried in this order (the larger first).
STAGE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("evaluations", EVALS), ("hybrid", HYBRID), ("controls and baselines", COMPARISON_EVALS),
    ("correction evaluations", CORRECTION_EVALS), ("correction evaluations but the ceiling", CORRECTION_STEERED),
    ("train traces", TRAIN_TRACES), ("plain evaluations", PLAIN_EVALS))

REQUIRED = "required"  # the default column of a key without a default

# docs/config.md's generated part sits between these lines.
KEY_TABLE_BEGIN = "<!-- config keys: generated from mechsteer/experiment/config.py by `mechsteer info --keys --write docs/config.md` -->"
KEY_TABLE_END = "<!-- end of the generated config keys -->"


@dataclass(frozen=True)
class KeyDoc:
    """One key as the listings show it."""

    name: str
    section: KeySection
    default: str  # as written in a config file (REQUIRED when it has none)
    type: str  # mechsteer.core.validation.describe of its annotation
    digest: str  # "yes", "unless at its default" (a key added later), or "no (<kind>)"
    read_by: str  # the stages whose results depend on it, groups named once
    sweep: str  # "downstream", "yes", or "no" (a sweep sets it itself)
    flag: str | None  # the `mechsteer run` option that overrides it
    help: str
    choices: tuple[Any, ...] | None  # the Literal's choices, if its annotation is one


def key_docs(config_class: type) -> list[KeyDoc]:
    """Every key of ``config_class``, by section (in :data:`KeySection`'s order), then as declared."""
    defaults = key_defaults(config_class)
    hints = field_hints(config_class)
    docs = []
    for name, info in key_infos(config_class).items():
        if info.section is None or not info.help:
            raise ValueError(f"{config_class.__name__}.{name} declares no section or help; "
                             "declare it with mechsteer.experiment.keys.key(..., section=..., help=...)")
        docs.append(KeyDoc(name=name, section=info.section, default=_default_text(defaults[name]),
                           type=describe(hints[name]), digest=_digest_text(info), read_by=_read_by_text(info),
                           sweep="downstream" if info.downstream else ("yes" if info.in_sweeps else "no"),
                           flag=None if info.flag is None else "--" + info.flag.replace("_", "-"),
                           help=info.help, choices=literal_choices(hints[name])))
    order = get_args(KeySection)
    return sorted(docs, key=lambda doc: order.index(doc.section))


def literal_choices(hint: Any) -> tuple[Any, ...] | None:
    """The choices of a ``Literal`` annotation (inside ``Annotated`` or ``| None`` too); None otherwise."""
    origin = get_origin(hint)
    if origin is Annotated:
        return literal_choices(get_args(hint)[0])
    if origin is Literal:
        return get_args(hint)
    if origin in (typing.Union, types.UnionType):
        found = [choices for arg in get_args(hint) if (choices := literal_choices(arg)) is not None]
        return found[0] if len(found) == 1 else None
    return None


def key_listing(config_class: type) -> str:
    """Plain text for a terminal: each section's keys, with default, type, digest membership and help."""
    lines = []
    section = None
    for doc in key_docs(config_class):
        if doc.section != section:
            section = doc.section
            lines.append(f"{section}:")
        digest = "in the digest" if doc.digest == "yes" else (
            "in the digest unless at its default" if doc.digest.startswith("unless") else f"not in the digest{doc.digest[2:]}")
        flag = f"; {doc.flag}" if doc.flag else ""
        lines.append(f"  {doc.name} = {doc.default}  ({doc.type}; {digest}{flag})")
        lines.append(f"      {doc.help}")
    return "\n".join(lines)


def key_table_markdown(config_class: type) -> str:
    """docs/config.md's table: one per section, then what the stage groups stand for."""
    lines = []
    section = None
    for doc in key_docs(config_class):
        if doc.section != section:
            if section is not None:
                lines.append("")
            section = doc.section
            lines += [f"### {section}", "",
                      "| key | default | type | in digest | read by | in a sweep | `mechsteer run` flag | meaning |",
                      "|---|---|---|---|---|---|---|---|"]
        default = doc.default if doc.default == REQUIRED else f"`{doc.default}`"
        cells = [f"`{doc.name}`", default, doc.type, doc.digest, doc.read_by, doc.sweep,
                 f"`{doc.flag}`" if doc.flag else "", doc.help]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", "Stage groups in *read by*: " + "; ".join(
        f"{group}: {', '.join(stages)}" for group, stages in STAGE_GROUPS) + "."]
    return "\n".join(lines)


def key_table_in(document: str, source: str) -> str:
    """The generated part of ``document`` (between :data:`KEY_TABLE_BEGIN` and :data:`KEY_TABLE_END`)."""
    begin, end = _marker_offsets(document, source)
    return document[begin:end].strip("\n")


def with_key_table(document: str, table: str, source: str) -> str:
    """``document`` with its generated part replaced by ``table``."""
    begin, end = _marker_offsets(document, source)
    return document[:begin] + "\n" + table + "\n" + document[end:]


def _marker_offsets(document: str, source: str) -> tuple[int, int]:
    begin, end = document.find(KEY_TABLE_BEGIN), document.find(KEY_TABLE_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{source} has no generated key table; put the lines {KEY_TABLE_BEGIN!r} and "
                         f"{KEY_TABLE_END!r} where it goes")
    return begin + len(KEY_TABLE_BEGIN), end


def _default_text(value: Any) -> str:
    if value is MISSING:
        return REQUIRED
    return value if isinstance(value, str) else json.dumps(value)


def _digest_text(info: KeyInfo) -> str:
    if info.kind != "computed":
        return f"no ({info.kind})"
    return "unless at its default" if info.later else "yes"


def _read_by_text(info: KeyInfo) -> str:
    if info.read_by is None:
        return "every stage"
    if not info.read_by:
        return "none"
    left = set(info.read_by)
    named: dict[str, str] = {}  # first stage of a part -> its text
    for group, stages in STAGE_GROUPS:
        if set(stages) <= left:
            left -= set(stages)
            named[min(stages, key=STAGES.index)] = group
    named.update({stage: stage for stage in left})
    return ", ".join(named[stage] for stage in sorted(named, key=STAGES.index))


__all__ = ["KEY_TABLE_BEGIN", "KEY_TABLE_END", "REQUIRED", "STAGE_GROUPS", "KeyDoc", "key_docs", "key_listing",
           "key_table_in", "key_table_markdown", "literal_choices", "with_key_table"]
