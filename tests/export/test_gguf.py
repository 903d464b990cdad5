"""``mechsteer export --to gguf``: a direction set's steering vector as a llama.cpp control vector,
read back with ``gguf``'s own reader (architecture, keys, tensor names, shapes, values).

What llama.cpp expects (its ``common_control_vector_load_one`` and ``llama_adapter_cvec``; repeng's
``ControlVector.export_gguf`` writes the same): ``general.architecture`` = ``controlvector``,
``controlvector.model_hint`` (string), ``controlvector.layer_count`` (uint32), one F32 1-D tensor
``direction.<N>`` per layer with N >= 1, added to the output of block N (mechsteer's
``blocks.N.hook_resid_post``, so N is the set's own layer).

No steered generation through llama.cpp here: the package registry serves llama-cpp-python only as
a source distribution (no prebuilt wheel), and building llama.cpp is beyond a test's time.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mechsteer.cli import main
from mechsteer.experiment.layout import RunPaths
from mechsteer.export.gguf import (
    BIAS_ONLY_ID,
    behaviour_choice,
    control_vector,
    read_control_vector,
    write_control_vector,
)
from mechsteer.hybrid.generator import behaviour_vectors
from mechsteer.hybrid.timing import BIAS_ONLY
from mechsteer.steering.direction_set import DirectionSet

D_MODEL = 16
LAYER = 3


def direction_set(layer: int = LAYER, with_bias: bool = True) -> DirectionSet:
    generator = torch.Generator().manual_seed(0)
    return DirectionSet(
        model_name="org/base-model", d_model=D_MODEL, n_layers=6, layer=layer, site="resid_post", method="mean",
        behaviour_ids=[2, 5, 7], titles=["plan", "verify", "answer"],
        directions=torch.randn(3, D_MODEL, generator=generator),
        bias=torch.randn(D_MODEL, generator=generator) if with_bias else None,
    )


def read(path: Path) -> tuple[gguf.GGUFReader, dict[str, object]]:
    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def test_the_file_is_a_llama_cpp_control_vector_of_what_the_hybrid_adds(tmp_path):
    directions = direction_set()
    path = write_control_vector(control_vector(directions, 5, 2.5), tmp_path / "verify.gguf")
    reader, fields = read(path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "org/base-model"
    assert fields["controlvector.layer_count"] == 1
    assert [tensor.name for tensor in reader.tensors] == [f"direction.{LAYER}"]
    tensor = reader.tensors[0]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    assert [int(n) for n in tensor.shape] == [D_MODEL] and tensor.n_elements == D_MODEL
    values = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    # coefficient x (direction + bias), exactly as the hybrid builds its steering vector
    hybrid = 2.5 * behaviour_vectors(directions, torch.tensor([5]))[0]
    assert torch.equal(values, hybrid)
    assert torch.equal(values, (2.5 * (directions.direction(5) + directions.bias)).float())
    assert fields["mechsteer.behaviour_id"] == 5 and fields["mechsteer.behaviour_title"] == "verify"
    assert fields["mechsteer.includes_bias"] is True and fields["mechsteer.hook_name"] == "blocks.3.hook_resid_post"
    assert fields["mechsteer.coefficient"] == pytest.approx(2.5)


def test_without_bias_and_the_bias_alone(tmp_path):
    directions = direction_set()
    plain = read_control_vector(write_control_vector(control_vector(directions, 7, -1.5, with_bias=False),
                                                     tmp_path / "plain.gguf"))
    assert not plain.includes_bias
    assert torch.equal(plain.directions[LAYER], (-1.5 * directions.direction(7)).float())
    bias = read_control_vector(write_control_vector(control_vector(directions, None, 4.0), tmp_path / "bias.gguf"))
    assert bias.behaviour_id == BIAS_ONLY_ID and bias.behaviour_title == "bias"
    assert torch.equal(bias.directions[LAYER], 4.0 * behaviour_vectors(directions, torch.tensor([BIAS_ONLY]))[0])
    # A set without a bias exports the direction alone (what the hybrid adds then), and has no bias to export.
    no_bias = direction_set(with_bias=False)
    assert torch.equal(control_vector(no_bias, 2, 1.0).directions[LAYER], no_bias.direction(2))
    with pytest.raises(ValueError, match="no bias"):
        behaviour_choice(no_bias, "bias")


def test_behaviours_are_chosen_by_id_or_title_and_layer_zero_is_refused():
    directions = direction_set()
    assert behaviour_choice(directions, "5") == 5 and behaviour_choice(directions, "answer") == 7
    assert behaviour_choice(directions, "bias") is None
    with pytest.raises(ValueError, match="2='plan'"):
        behaviour_choice(directions, "planning")
    with pytest.raises(ValueError, match="unknown behaviour id 4"):
        behaviour_choice(directions, "4")
    with pytest.raises(ValueError, match="layer 0"):
        control_vector(direction_set(layer=0), 2, 1.0)


def test_the_command_reads_a_run_folder_or_a_directions_folder(tmp_path, capsys):
    directions = direction_set()
    run = RunPaths(tmp_path / "run")
    directions.save(run.directions)
    run.config_file.write_text("{}")
    out = tmp_path / "exports" / "plan.gguf"
    assert main(["export", str(run.root), "--to", "gguf", "--behaviour", "plan", "--coefficient", "3",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["from"] == str(run.directions) and summary["tensor"] == f"direction.{LAYER}"
    assert torch.equal(read_control_vector(out).directions[LAYER], 3 * (directions.direction(2) + directions.bias))
    assert main(["export", str(run.directions), "--to", "gguf", "--behaviour", "2", "--coefficient", "3",
                 "--without-bias", "--out", str(out)]) == 0
    assert torch.equal(read_control_vector(out).directions[LAYER], 3 * directions.direction(2))


@pytest.mark.parametrize(("extra", "code", "message"), [
    (["--behaviour", "plan", "--coefficient", "1", "--out", "x.txt"], 2, "name it *.gguf"),
    (["--coefficient", "1", "--out", "x.gguf"], 2, "needs --behaviour"),
    (["--behaviour", "bias", "--coefficient", "1", "--without-bias", "--out", "x.gguf"], 2, "leave nothing"),
    (["--behaviour", "nope", "--coefficient", "1", "--out", "x.gguf"], 1, "no behaviour titled 'nope'"),
])
def test_refused_arguments_are_one_line(tmp_path, capsys, extra, code, message):
    direction_set().save(tmp_path / "directions")
    argv = ["export", str(tmp_path / "directions"), "--to", "gguf", *extra]
    argv[-1] = str(tmp_path / argv[-1])
    assert main(argv) == code
    assert message in capsys.readouterr().err


def test_a_folder_that_is_neither_is_refused(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--to", "gguf", "--behaviour", "1", "--coefficient", "1",
                 "--out", str(tmp_path / "x.gguf")]) == 1
    assert "neither a directions folder" in capsys.readouterr().err
    run = RunPaths(tmp_path / "run")
    run.root.mkdir()
    run.config_file.write_text("{}")
    assert main(["export", str(run.root), "--to", "gguf", "--behaviour", "1", "--coefficient", "1",
                 "--out", str(tmp_path / "x.gguf")]) == 1
    assert "has no directions yet" in capsys.readouterr().err
