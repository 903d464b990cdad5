"""A model pair whose models are loaded when a stage first needs them and freed when a stage
does not: :class:`ResidentPair`.

Two bf16 32B models (~131 GB) do not fit one 80 GB GPU, and most stages need one model only
(traces and activations: the thinking model; directions: the base model). A stage calls
:meth:`ResidentPair.need` with the models it uses, which frees the others; ``pair.base`` and
``pair.thinking`` load on first use, on their devices. Shapes and names (for provenance and
layer checks) come from :meth:`ResidentPair.info` without loading any weights.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

import torch

from mechsteer.core.models import DeviceMap, DTypeChoice, load_model, resolve_spec
from mechsteer.core.vocab import tokenizers_compatible

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Role = Literal["base", "thinking"]
ROLES: tuple[Role, ...] = ("base", "thinking")


@dataclass
class ModelInfo:
    """What the checks between stages read of a model (``info.cfg.model_name``, ``d_model``,
    ``n_layers``), the way they read it of a bridge."""

    cfg: Any


class ResidentPair:
    """A base/thinking pair loaded lazily and freed per stage (see the module docstring)."""

    def __init__(
        self,
        base_spec: str,
        thinking_spec: str,
        *,
        device: str | torch.device | None = "auto",
        dtype: DTypeChoice | torch.dtype | None = "auto",
        base_device: str | torch.device | None = None,
        thinking_device: str | torch.device | None = None,
        device_map: DeviceMap | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.base_spec, self.thinking_spec = base_spec, thinking_spec
        self._specs = {"base": base_spec, "thinking": thinking_spec}
        self._devices = {"base": base_device or device, "thinking": thinking_device or device}
        self._dtype, self._device_map = dtype, device_map
        self._models: dict[Role, TransformerBridge] = {}
        self._infos: dict[Role, ModelInfo] = {}
        self._log = log
        self.loads: list[Role] = []  # every load, in order (what a stage cost)

    def model(self, role: Role) -> TransformerBridge:
        if role not in self._models:
            if self._log is not None:
                self._log(f"  loading the {role} model {self._specs[role]}")
            self._models[role] = load_model(self._specs[role], device=self._devices[role], dtype=self._dtype,
                                            device_map=self._device_map)
            self.loads.append(role)
        return self._models[role]

    @property
    def base(self) -> TransformerBridge:
        return self.model("base")

    @property
    def thinking(self) -> TransformerBridge:
        return self.model("thinking")

    @property
    def loaded(self) -> tuple[Role, ...]:
        return tuple(role for role in ROLES if role in self._models)

    @property
    def shares_tokenizer(self) -> bool:
        return tokenizers_compatible(self.base.tokenizer, self.thinking.tokenizer)

    def need(self, *roles: Role) -> None:
        """Free every loaded model not in ``roles`` (the others load when first used)."""
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown model roles {sorted(unknown)}; expected base or thinking")
        freed = [role for role in self.loaded if role not in roles]
        for role in freed:
            del self._models[role]
        if freed:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def release(self) -> None:
        self.need()

    def info(self, role: Role) -> ModelInfo:
        """The model's name, width and depth: from the loaded bridge, else from its config file."""
        if role in self._models:
            cfg = self._models[role].cfg
            return ModelInfo(SimpleNamespace(model_name=cfg.model_name, d_model=cfg.d_model, n_layers=cfg.n_layers))
        if role not in self._infos:
            resolved = resolve_spec(self._specs[role])
            source = str(resolved.folder) if resolved.folder is not None else self._specs[role]
            # heavy (seconds): imported when a model loads, so that the command line starts fast
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(source)
            text_config = getattr(hf_config, "text_config", None) or hf_config
            self._infos[role] = ModelInfo(SimpleNamespace(
                model_name=resolved.model_name, d_model=int(text_config.hidden_size),
                n_layers=int(text_config.num_hidden_layers)))
        return self._infos[role]


__all__ = ["ModelInfo", "ResidentPair", "Role"]
