"""The config keys' listings are generated from their declarations (mechsteer.experiment.keydocs):
docs/config.md's table is the freshly rendered one, each key appears once with what its declaration
says, and the generated part of a document is found and replaced between its markers."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.keydocs import (
    KEY_TABLE_BEGIN,
    KEY_TABLE_END,
    key_docs,
    key_listing,
    key_table_in,
    key_table_markdown,
    with_key_table,
)
from mechsteer.experiment.keys import HYBRID, key

CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_the_docs_key_table_is_the_generated_one():
    table = key_table_in(CONFIG_DOC.read_text(encoding="utf-8"), str(CONFIG_DOC))
    assert table == key_table_markdown(RunConfig), (
        "docs/config.md's key table is stale; regenerate it: mechsteer info --keys --write docs/config.md")


def test_every_key_is_listed_once_with_its_declaration():
    names = [field.name for field in dataclasses.fields(RunConfig)]
    docs = {doc.name: doc for doc in key_docs(RunConfig)}
    assert sorted(docs) == sorted(names)
    table, listing = key_table_markdown(RunConfig), key_listing(RunConfig)
    for name in names:
        assert len(re.findall(rf"^\| `{name}` \|", table, flags=re.M)) == 1, name
        assert len(re.findall(rf"^  {name} = ", listing, flags=re.M)) == 1, name
    assert (docs["device"].digest, docs["device"].flag, docs["device"].read_by) == ("no (placement)", "--device", "none")
    assert (docs["dtype"].default, docs["dtype"].digest, docs["dtype"].read_by) == ("auto", "unless at its default",
                                                                                   "every stage")
    assert docs["dtype"].choices == ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
    assert docs["engine_model_thinking"].flag == "--engine-model"  # its dest is engine_model
    assert (docs["name"].default, docs["name"].sweep) == ("required", "no")
    assert (docs["coefficients"].default, docs["coefficients"].sweep) == ("[1.0]", "downstream")
    assert docs["coefficients"].read_by == "hybrid, ablations"
    assert docs["max_new_tokens"].read_by == "train traces, tuning, evaluations, ablations"
    # optimisation, added after run folders existed, leaves the digest at its default (empty)
    assert docs["optimisation"].digest == "unless at its default"
    assert docs["windows"].help in table and docs["windows"].help in listing
    assert "| str \\| None |" in table  # a cell's | is escaped
    assert f"hybrid: {', '.join(HYBRID)}" in table


def test_a_key_without_section_or_help_is_refused():
    @dataclasses.dataclass
    class Bare:
        size: int = key(1, section="data", help="how many")
        other: int = 2

    with pytest.raises(ValueError, match=r"Bare.other declares no section or help"):
        key_docs(Bare)


def test_the_generated_part_is_replaced_between_its_markers():
    document = f"# Keys\n\nprose\n\n{KEY_TABLE_BEGIN}\nold table\n{KEY_TABLE_END}\n\nmore prose\n"
    assert key_table_in(document, "doc.md") == "old table"
    updated = with_key_table(document, "new table", "doc.md")
    assert updated == document.replace("old table", "new table")
    assert key_table_in(updated, "doc.md") == "new table"
    with pytest.raises(ValueError, match=r"notes.md has no generated key table"):
        key_table_in("# no markers\n", "notes.md")
