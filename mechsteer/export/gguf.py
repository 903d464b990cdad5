"""A direction set's steering vector as a llama.cpp control vector (GGUF).

The format (written by repeng's ``ControlVector.export_gguf``, read by llama.cpp's
``common_control_vector_load`` and by EasySteer): a GGUF file of architecture ``controlvector``
with one F32 1-D tensor ``direction.<layer>`` per steered layer and the keys
``controlvector.model_hint`` and ``controlvector.layer_count`` (the number of direction tensors,
as repeng counts it). llama.cpp adds ``strength * direction.<N>`` to the output of block N
(``build_cvec(cur, il)`` after the block's FFN residual add, ``l_out``), which is mechsteer's
``blocks.N.hook_resid_post``: the tensor is named with the set's own layer, no shift. (The loader
stores ``direction.N`` at offset ``n_embd * (N - 1)`` and ``llama_adapter_cvec::apply`` reads layer
``il`` from offset ``n_embd * (il - 1)``: the two minus-ones cancel.) ``direction.0`` is refused
by llama.cpp, so a set at layer 0 cannot be exported.

The file holds ``coefficient * (direction + bias)`` as the hybrid adds it (the bias only where the
set has one and it is not left out), or ``coefficient * bias`` alone; llama.cpp adds it at every
position. Keys under ``mechsteer.`` record what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from mechsteer.core.tensor_types import Float, Tensor
from mechsteer.steering.direction_set import DirectionSet

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = f"{ARCHITECTURE}.model_hint"
LAYER_COUNT_KEY = f"{ARCHITECTURE}.layer_count"
TENSOR_PREFIX = "direction."
BIAS_CHOICE = "bias"  # names the bias alone where a behaviour is chosen
BIAS_ONLY_ID = -1  # mechsteer.behaviour_id of the bias alone
BEHAVIOUR_ID_KEY = "mechsteer.behaviour_id"
BEHAVIOUR_TITLE_KEY = "mechsteer.behaviour_title"
COEFFICIENT_KEY = "mechsteer.coefficient"
INCLUDES_BIAS_KEY = "mechsteer.includes_bias"
HOOK_NAME_KEY = "mechsteer.hook_name"
METHOD_KEY = "mechsteer.method"


@dataclass(frozen=True)
class ControlVector:
    """What a control-vector file holds: one vector per llama.cpp layer index (= mechsteer's layer)."""

    model_hint: str
    directions: dict[int, Float[Tensor, " d_model"]]
    behaviour_id: int  # BIAS_ONLY_ID for the bias alone
    behaviour_title: str
    coefficient: float
    includes_bias: bool
    hook_name: str
    method: str


def behaviour_choice(directions: DirectionSet, text: str) -> int | None:
    """``text`` as a behaviour of the set: its id, its title, or ``"bias"`` (None: the bias alone)."""
    if text == BIAS_CHOICE:
        if directions.bias is None:
            raise ValueError(f"the direction set (method {directions.method!r}) has no bias to export; "
                             "choose a behaviour id or title")
        return None
    if text.lstrip("-").isdigit():
        behaviour_id = int(text)
        directions.index_of(behaviour_id)  # raises, listing the ids and titles
        return behaviour_id
    matches = [b for b, title in zip(directions.behaviour_ids, directions.titles, strict=True) if title == text]
    if len(matches) != 1:
        known = ", ".join(f"{b}={t!r}" for b, t in zip(directions.behaviour_ids, directions.titles, strict=True))
        what = "no behaviour" if not matches else f"{len(matches)} behaviours"
        raise ValueError(f"{what} titled {text!r}; choose an id or title of {known}, or {BIAS_CHOICE!r}")
    return matches[0]


def control_vector(directions: DirectionSet, behaviour_id: int | None, coefficient: float, *,
                   with_bias: bool = True) -> ControlVector:
    """``coefficient * (direction + bias)`` of ``behaviour_id`` (None: ``coefficient * bias``) at the set's layer.

    ``with_bias`` adds the bias where the set has one, as the hybrid does; False leaves it out.
    """
    if directions.layer < 1:
        raise ValueError("llama.cpp control vectors cannot steer layer 0 (its loader refuses direction.0); "
                         "make the directions at a layer >= 1")
    if behaviour_id is None:
        if directions.bias is None:
            raise ValueError("the direction set has no bias to export alone; choose a behaviour")
        vector, title, includes_bias = directions.bias, BIAS_CHOICE, True
    else:
        includes_bias = with_bias and directions.bias is not None
        vector = directions.steering_vector(behaviour_id, with_bias=includes_bias)
        title = directions.title(behaviour_id)
    return ControlVector(
        model_hint=directions.model_name, directions={directions.layer: (vector * coefficient).float()},
        behaviour_id=BIAS_ONLY_ID if behaviour_id is None else behaviour_id, behaviour_title=title,
        coefficient=float(coefficient), includes_bias=includes_bias, hook_name=directions.hook_name,
        method=directions.method,
    )


def write_control_vector(vector: ControlVector, path: str | Path) -> Path:
    """Write ``vector`` as a llama.cpp control-vector GGUF file (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    writer.add_string(MODEL_HINT_KEY, vector.model_hint)
    writer.add_uint32(LAYER_COUNT_KEY, len(vector.directions))
    writer.add_int32(BEHAVIOUR_ID_KEY, vector.behaviour_id)
    writer.add_string(BEHAVIOUR_TITLE_KEY, vector.behaviour_title)
    writer.add_float32(COEFFICIENT_KEY, vector.coefficient)
    writer.add_bool(INCLUDES_BIAS_KEY, vector.includes_bias)
    writer.add_string(HOOK_NAME_KEY, vector.hook_name)
    writer.add_string(METHOD_KEY, vector.method)
    for layer, direction in sorted(vector.directions.items()):
        writer.add_tensor(f"{TENSOR_PREFIX}{layer}", direction.detach().cpu().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _field(reader: gguf.GGUFReader, key: str, path: Path) -> gguf.ReaderField:
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"{path} has no {key!r}; not a control vector written by mechsteer export")
    return field


def read_control_vector(path: str | Path) -> ControlVector:
    """A control-vector file written by :func:`write_control_vector`, read with ``gguf``'s reader."""
    path = Path(path)
    reader = gguf.GGUFReader(path)
    architecture = _field(reader, "general.architecture", path).contents()
    if architecture != ARCHITECTURE:
        raise ValueError(f"{path} has architecture {architecture!r}, not {ARCHITECTURE!r}: not a control vector")
    directions: dict[int, Tensor] = {}
    for tensor in reader.tensors:
        if not tensor.name.startswith(TENSOR_PREFIX) or not tensor.name[len(TENSOR_PREFIX):].isdigit():
            raise ValueError(f"{path}: tensor {tensor.name!r} is not {TENSOR_PREFIX}<layer>")
        directions[int(tensor.name[len(TENSOR_PREFIX):])] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    return ControlVector(
        model_hint=str(_field(reader, MODEL_HINT_KEY, path).contents()), directions=directions,
        behaviour_id=int(_field(reader, BEHAVIOUR_ID_KEY, path).contents()),
        behaviour_title=str(_field(reader, BEHAVIOUR_TITLE_KEY, path).contents()),
        coefficient=float(_field(reader, COEFFICIENT_KEY, path).contents()),
        includes_bias=bool(_field(reader, INCLUDES_BIAS_KEY, path).contents()),
        hook_name=str(_field(reader, HOOK_NAME_KEY, path).contents()),
        method=str(_field(reader, METHOD_KEY, path).contents()),
    )


__all__ = ["ARCHITECTURE", "BIAS_CHOICE", "BIAS_ONLY_ID", "ControlVector", "LAYER_COUNT_KEY", "MODEL_HINT_KEY",
           "TENSOR_PREFIX", "behaviour_choice", "control_vector", "read_control_vector", "write_control_vector"]
