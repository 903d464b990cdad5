"""A TorchFunctionMode that makes device faults of the per-token loops fail on a CPU-only machine.

On the CPU every tensor is on "the device", so a mask built on the host and mixed with model
outputs, a full-vocabulary logits copy to the host, or one ``.item()`` per row all pass unnoticed
there, and fail (or crawl) on a GPU. This mode watches torch calls made *from mechsteer's loop
modules* (the hybrid, the runner, plain generation) and records:

- a factory call (``torch.tensor``, ``zeros``, ``arange``...) that names no device, or names one by
  a string: on a GPU run it lands on the CPU by default;
- an operation mixing a tensor put on the host on purpose (created with ``device=HOST``, the one
  object :data:`mechsteer.core.models.HOST`, and whatever is computed from such tensors alone) with
  one that is not: a CPU/GPU mix that raises (or copies silently) on a GPU;
- every transfer to the host of a device tensor (``tolist``, ``item``, ``bool()``, ``int()``,
  ``float()``, ``cpu()``, ``numpy()``, ``.to("cpu")``), with its size: the syncs a step costs.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from mechsteer.core.models import HOST

PACKAGE = Path(__file__).resolve().parents[1] / "mechsteer"
LOOP_MODULES = (PACKAGE / "hybrid", PACKAGE / "interventions" / "runner.py",
                PACKAGE / "interventions" / "generation.py")
TORCH_ROOT = Path(torch.__file__).resolve().parent
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.rand,
             torch.randn, torch.randint, torch.linspace, torch.eye, torch.as_tensor}
SYNCS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
TRANSFERS = {"to", "copy_", "cpu", "tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__",
             "__format__", "__repr__", "__str__", "size", "dim", "shape", "__len__", "__get__", "element_size",
             "numel", "is_floating_point"}


@dataclass
class Transfer:
    where: str
    what: str
    numel: int


@dataclass
class DeviceDiscipline(TorchFunctionMode):
    """Records device faults and host transfers of the loop modules (module docstring)."""

    modules: tuple[Path, ...] = LOOP_MODULES  # the files whose torch calls are watched
    faults: list[str] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        self._host: dict[int, weakref.ref[torch.Tensor]] = {}  # host tensors by id

    def _caller(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            path = Path(frame.f_code.co_filename)
            if not path.is_relative_to(TORCH_ROOT) and path != Path(__file__):
                if any(path == module or path.is_relative_to(module) for module in self.modules):
                    return f"{path.name}:{frame.f_lineno}"
                return None
            frame = frame.f_back
        return None

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor  # an id can be reused once its tensor died

    def _mark_host(self, tensor: torch.Tensor) -> None:
        self._host[id(tensor)] = weakref.ref(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        where = self._caller()
        name = getattr(func, "__name__", str(func))
        tensors = [item for item in tree_flatten((args, kwargs))[0] if isinstance(item, torch.Tensor)]
        if where is not None:
            if func in FACTORIES:
                device = kwargs.get("device")
                if device is None:
                    self.faults.append(f"{where}: torch.{name} without a device")
                elif isinstance(device, str):
                    self.faults.append(f"{where}: torch.{name} on device {device!r} named by a string")
            elif name in SYNCS or (name == "to" and _to_host(args, kwargs)):
                if tensors and not self.is_host(tensors[0]):
                    self.transfers.append(Transfer(where, name, int(tensors[0].numel())))
            if name not in TRANSFERS:
                wide = [t for t in tensors if t.ndim > 0]
                hosts = [self.is_host(t) for t in wide]
                if any(hosts) and not all(hosts):
                    self.faults.append(f"{where}: {name} mixes host tensors with device tensors")
        result = func(*args, **kwargs)
        if name == "to" and _moves(args, kwargs) and not _to_host(args, kwargs) and tensors and result is tensors[0]:
            # On the CPU a move to the model's "device" returns the host tensor itself; here it
            # must become a device tensor, as it would on a GPU.
            result = result.clone()
        on_host = (func in FACTORIES and kwargs.get("device") is HOST) or (
            func not in FACTORIES and name not in ("to",) and bool(tensors) and all(self.is_host(t) for t in tensors))
        if name == "to" and tensors and ((self.is_host(tensors[0]) and not _moves(args, kwargs))
                                          or _to_host(args, kwargs)):
            on_host = True  # a dtype change of a host tensor, or a move to the host
        if name == "cpu":
            on_host = True
        if on_host:
            for item in tree_flatten(result)[0]:
                if isinstance(item, torch.Tensor):
                    self._mark_host(item)
        return result

    def host_transfers(self) -> int:
        return len(self.transfers)


def _device_argument(args, kwargs):
    if "device" in kwargs:
        return kwargs["device"]
    for item in args[1:]:
        if isinstance(item, str | torch.device):
            return item
    return None


def _moves(args, kwargs) -> bool:
    return _device_argument(args, kwargs) is not None


def _to_host(args, kwargs) -> bool:
    """``.to(HOST)`` or ``.to("cpu")``: a move to the host. (A model's own device object is a
    move within the device, even when it is the CPU, as in these tests.)"""
    device = _device_argument(args, kwargs)
    return device is HOST or (isinstance(device, str) and torch.device(device).type == "cpu")
