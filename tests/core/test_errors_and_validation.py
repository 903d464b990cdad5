"""Corrupt artefacts name their file (and line), and settings are checked by their type hints."""

import dataclasses
from typing import Annotated, Any, Literal

import pytest
import torch
from safetensors.torch import save_file

from mechsteer.core.artefacts import ArtefactFormat, load_artefact, save_artefact
from mechsteer.core.errors import ArtefactError
from mechsteer.core.store import append_jsonl, read_json, read_jsonl
from mechsteer.core.validation import NonEmpty, Range, check_fields


def test_a_torn_line_in_the_middle_of_a_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "traces.jsonl"
    append_jsonl(path, [{"i": 0}, {"i": 1}, {"i": 2}])
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:5] + "\n" + lines[2])
    with pytest.raises(ArtefactError, match=r"traces.jsonl, line 2: not a JSON record .*delete line 2"):
        read_jsonl(path)


def test_a_torn_last_line_is_still_tolerated_for_resumption(tmp_path):
    path = tmp_path / "traces.jsonl"
    append_jsonl(path, [{"i": 0}, {"i": 1}])
    with path.open("a") as handle:
        handle.write('{"i": 2, "tru')
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}]
    append_jsonl(path, [{"i": 2}])  # the torn tail is cut before appending
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_a_jsonl_line_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"i": 0}\n[1, 2]\n')
    with pytest.raises(ArtefactError, match=r"x.jsonl, line 2: a list, not a JSON object"):
        read_jsonl(path)


def test_corrupt_json_and_safetensors_name_the_file(tmp_path):
    (tmp_path / "stages.json").write_text('{"stages": ')
    with pytest.raises(ArtefactError, match=r"stages.json is corrupt .*it should hold the run record"):
        read_json(tmp_path / "stages.json", "run record")
    with pytest.raises(ArtefactError, match=r"missing.json not found"):
        read_json(tmp_path / "missing.json", "run record")
    fmt = ArtefactFormat(name="test.artefact", version=1, json_file="a.json", tensors_file="a.safetensors", kind="A")
    save_artefact(tmp_path / "art", fmt, {"x": 1}, {"t": torch.ones(4, 4)})
    tensors = tmp_path / "art" / "a.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:20])  # truncated
    with pytest.raises(ArtefactError, match=r"a.safetensors is corrupt"):
        load_artefact(tmp_path / "art", fmt)
    save_file({"t": torch.ones(2)}, str(tensors))  # a whole file again loads
    assert load_artefact(tmp_path / "art", fmt)[0]["x"] == 1


@dataclasses.dataclass
class FutureConfig:
    """Keys as another helper might add them: validated by their annotations alone."""

    name: str
    engine: Literal["hf", "vllm"] = "hf"
    gpu_fraction: Annotated[float, Range(min=0, max=1)] = 0.9
    layers: Annotated[list[Annotated[int, Range(min=0)]], NonEmpty()] = dataclasses.field(default_factory=lambda: [1])
    device: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile: bool = False


@pytest.mark.parametrize(("values", "message", "kind"), [
    ({"engine": "vlm"}, "unknown engine 'vlm'; expected one of 'hf', 'vllm'", "value"),
    ({"engine": 1}, "engine = 1 is not one of 'hf', 'vllm'", "type"),
    ({"gpu_fraction": 1.5}, "gpu_fraction = 1.5 must be <= 1", "value"),
    ({"gpu_fraction": "0.5"}, "gpu_fraction = '0.5' is not a number", "type"),
    ({"gpu_fraction": True}, "gpu_fraction = True is not a number", "type"),
    ({"layers": 3}, "layers = 3 is not a list[int]", "type"),
    ({"layers": []}, "layers = [] must not be empty", "value"),
    ({"layers": [1, -2]}, "layers[1] = -2 must be >= 0", "value"),
    ({"layers": ["1"]}, "layers[0] = '1' is not an int", "type"),
    ({"device": 0}, "device = 0 is not a str | None", "type"),
    ({"extra": []}, "extra = [] is not a dict[str, any value]", "type"),
    ({"compile": "no"}, "compile = 'no' is not a bool", "type"),
    ({"compile": 0}, "compile = 0 is not a bool", "type"),
    ({"enigne": "hf"}, "unknown keys ['enigne']", "type"),
])
def test_fields_are_checked_by_their_annotations(values, message, kind):
    [problem] = check_fields(FutureConfig, {"name": "x", **values})
    assert message in problem.message and problem.kind == kind


def test_valid_values_and_missing_required_keys():
    assert check_fields(FutureConfig, {"name": "x", "gpu_fraction": 1, "device": None, "layers": [0, 3]}) == []
    [problem] = check_fields(FutureConfig, {})
    assert "missing required keys ['name']" in problem.message
    assert check_fields(FutureConfig, {}, partial=True) == []
