"""Quantized training as a Lightning precision plugin: QAT, frozen bitsandbytes weights, 8-bit optimizers.

Design decisions:

- Not a subclass of Lightning's ``BitsandbytesPrecision``: that plugin refuses non-CUDA accelerators and
  leaves the optimizer alone. This one runs on CPU and CUDA and only imports bitsandbytes for the modes
  that need it (``bnb-int8``, ``bnb-nf4``, ``optimizer="adam8bit"``).
- It wraps an *inner* precision (``"32-true"``, ``"bf16-mixed"``, ...) and forwards every numeric hook
  (autocast context, backward, optimizer step, gradient clipping, scaler state) to it, so it composes with
  mixed precision and can itself be the inner precision of another wrapper. ``convert_module`` converts in
  place (DDP ignores its return value) and is idempotent.
- ``connect`` swaps each optimizer for its bitsandbytes 8-bit counterpart (same parameter groups and
  hyperparameters) and re-points LR schedulers at the new optimizer. It also converts the model if the
  strategy never called ``convert_module``.
- Gradient clipping is forwarded through ``clip_grad_by_norm`` / ``clip_grad_by_value`` (not
  ``clip_gradients``), so a strategy that replaces those methods on the plugin still takes effect.
- Checkpoints: quantizer step sizes live outside the module ``state_dict`` (whose keys stay those of the
  float model) and inside this plugin's ``state_dict`` together with the mode and settings. Resuming with
  ``trainer.fit(ckpt_path=...)`` therefore works in Lightning's order (model weights restored, then the model
  converted, then the plugin state, which restores the step sizes); loading a checkpoint written in another
  mode raises. :func:`load_quantized_checkpoint` rebuilds the quantized model from a checkpoint alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_parallel.plugins._wrapping import WrappingPrecision
from lightning_parallel.quantization.convert import convert_to_qat, converted_coverage, is_converted
from lightning_parallel.quantization.state import load_quantizer_state_dict, quantizer_state_dict

QuantizationMode = Literal["qat-int8", "qat-int4", "bnb-int8", "bnb-nf4"]
MODES = ("qat-int8", "qat-int4", "bnb-int8", "bnb-nf4")
OPTIMIZERS = ("adam8bit",)
_STATE_KEY = "quantization_mode"


class QuantizationPrecision(WrappingPrecision):
    """Quantization-aware training, frozen low-bit weights and 8-bit optimizers for any Lightning model.

    Args:
        mode: ``"qat-int8"`` (fake-quantized int8 weights per output channel and int8 activations per tensor,
            LSQ step sizes), ``"qat-int4"`` (int4 weights per group of ``group_size``, int8 activations),
            ``"bnb-int8"`` / ``"bnb-nf4"`` (Linear weights frozen and stored by bitsandbytes in int8 / NF4, the
            other parameters train), or ``None`` to only swap the optimizer. Default ``"qat-int8"``.
        optimizer: ``"adam8bit"`` swaps ``Adam``/``AdamW``/``SGD`` (momentum) for bitsandbytes' 8-bit
            counterpart with the same hyperparameters; ``None`` keeps the optimizer. Default ``None``.
        inner: the precision doing the arithmetic: ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``,
            ``"bf16-true"``, ``"16-true"`` or a ``Precision`` instance. Default ``"32-true"``.
        act_bits: activation bit width in the QAT modes (2 to 8), or ``None`` for weight-only QAT. Default 8.
        group_size: weights per step size in ``"qat-int4"`` (and for layers given 4 bits or fewer in
            ``module_bits``). Default 64.
        ignore_modules: ``fnmatch`` patterns of module names (as in ``model.named_modules()``) to keep in float,
            for example ``["blocks.0.conv", "head"]``. Default none.
        module_bits: ``{pattern: weight bits}`` overriding the mode's weight bit width per module in the QAT
            modes; the first matching pattern wins. Default none.
        int8_threshold: LLM.int8 outlier threshold in ``"bnb-int8"`` (0 disables outlier handling). Default 0.
    """

    def __init__(
        self,
        mode: QuantizationMode | None = "qat-int8",
        *,
        optimizer: Literal["adam8bit"] | None = None,
        inner: str | Precision = "32-true",
        act_bits: int | None = 8,
        group_size: int = 64,
        ignore_modules: list[str] | None = None,
        module_bits: dict[str, int] | None = None,
        int8_threshold: float = 0.0,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; use one of {MODES} or None (optimizer only).")
        if optimizer is not None and optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {OPTIMIZERS} or None.")
        if mode is None and optimizer is None:
            raise ValueError(
                "mode=None and optimizer=None leave nothing to quantize; set mode or optimizer='adam8bit'."
            )
        if act_bits is not None and (not isinstance(act_bits, int) or not 2 <= act_bits <= 8):
            raise ValueError(f"act_bits={act_bits!r} is not supported; use an integer from 2 to 8, or None.")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} must be a positive integer, for example 64.")
        for pattern, bits in (module_bits or {}).items():
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(
                    f"module_bits[{pattern!r}]={bits!r} is not supported; use an integer from 2 to 8."
                )
        if module_bits and mode not in ("qat-int8", "qat-int4"):
            raise ValueError(
                f"module_bits applies to the qat modes only, but mode={mode!r}; drop it or use a qat mode."
            )
        if int8_threshold < 0:
            raise ValueError(f"int8_threshold={int8_threshold} must be >= 0 (0 disables outlier handling).")
        if optimizer is not None or mode in ("bnb-int8", "bnb-nf4"):
            from lightning_parallel.quantization.bnb import require_bitsandbytes

            require_bitsandbytes(f"QuantizationPrecision(mode={mode!r}, optimizer={optimizer!r})")
        self.mode = mode
        self.optimizer = optimizer
        super().__init__(inner)
        self.act_bits = act_bits
        self.group_size = group_size
        self.ignore_modules = list(ignore_modules or [])
        self.module_bits = dict(module_bits or {})
        self.int8_threshold = int8_threshold
        self._module: nn.Module | None = None
        self._pending_quantizers: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- settings and checkpoints
    def settings(self) -> dict[str, Any]:
        """The constructor arguments that shape the converted model (saved in checkpoints)."""
        return {
            "mode": self.mode,
            "optimizer": self.optimizer,
            "act_bits": self.act_bits,
            "group_size": self.group_size,
            "ignore_modules": list(self.ignore_modules),
            "module_bits": dict(self.module_bits),
            "int8_threshold": self.int8_threshold,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        quantizers = {}
        if self._module is not None and self.mode in ("qat-int8", "qat-int4"):
            quantizers = quantizer_state_dict(self._module)
        return {
            _STATE_KEY: self.mode,
            "settings": self.settings(),
            "quantizers": quantizers,
            "inner": self.inner.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("settings", {})
        mine = self.settings()
        for key in ("mode", "act_bits", "group_size", "ignore_modules", "module_bits"):
            if key in saved and saved[key] != mine[key]:
                raise ValueError(
                    f"the checkpoint was written with QuantizationPrecision({key}={saved[key]!r}) but this plugin has "
                    f"{key}={mine[key]!r}; resume with the same settings, or load the weights into a float model."
                )
        self.inner.load_state_dict(state_dict.get("inner", {}))
        quantizers = state_dict.get("quantizers") or {}
        if not quantizers:
            return
        if self._module is None:
            self._pending_quantizers = dict(quantizers)
        else:
            load_quantizer_state_dict(self._module, quantizers)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], **kwargs: Any) -> QuantizationPrecision:
        """A plugin with the settings saved in ``state_dict`` (this plugin's entry of a checkpoint).

        Args:
            state_dict: the output of :meth:`state_dict`.
            kwargs: overrides of constructor arguments (for example ``inner``).
        """
        settings = {**state_dict["settings"], **kwargs}
        return cls(settings.pop("mode"), **settings)

    # ----------------------------------------------------------------- model and optimizers
    def _is_converted(self, module: nn.Module) -> bool:
        return any(is_converted(sub) for sub in module.modules())

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        if self.mode is not None and not self._is_converted(module):
            if self.mode in ("qat-int8", "qat-int4"):
                bits = 8 if self.mode == "qat-int8" else 4
                module = convert_to_qat(
                    module,
                    weight_bits=bits,
                    act_bits=self.act_bits,
                    group_size=self.group_size,
                    ignore_modules=self.ignore_modules,
                    module_bits=self.module_bits,
                )
            else:
                from lightning_parallel.quantization.bnb import convert_to_bnb

                module = convert_to_bnb(
                    module,
                    quant_type="int8" if self.mode == "bnb-int8" else "nf4",
                    ignore_modules=self.ignore_modules,
                    threshold=self.int8_threshold,
                )
            converted_coverage(module, f"QuantizationPrecision(mode={self.mode!r})").report(
                rank_zero_info, rank_zero_warn
            )
        self._module = module
        if self._pending_quantizers is not None:
            load_quantizer_state_dict(module, self._pending_quantizers)
            self._pending_quantizers = None
        return self.inner.convert_module(module)

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        if self.mode is not None and self._module is None:
            # A strategy whose ``setup`` skips ``convert_module`` (Lightning's own strategies call it first).
            self.convert_module(model)
        if self.optimizer is not None:
            from lightning_parallel.quantization.bnb import retarget_scheduler, to_8bit_optimizer

            swapped = []
            for old in optimizers:
                new = to_8bit_optimizer(old)
                for config in lr_schedulers:
                    retarget_scheduler(
                        config.scheduler if isinstance(config, LRSchedulerConfig) else config, old, new
                    )
                swapped.append(new)
            optimizers = swapped
        return self.inner.connect(model, optimizers, lr_schedulers)

    # Every other hook is handed to the inner precision by WrappingPrecision.


def find_plugin_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """This plugin's state in a checkpoint dict, also when a wrapping precision nests it; ``None`` if absent.

    Args:
        checkpoint: a loaded Lightning checkpoint (or any nested mapping).
    """
    if _STATE_KEY in checkpoint and "settings" in checkpoint:
        return dict(checkpoint)
    for value in checkpoint.values():
        if isinstance(value, Mapping):
            found = find_plugin_state(value)
            if found is not None:
                return found
    return None


def load_quantized_checkpoint(
    model_class: type[pl.LightningModule], checkpoint_path: str, **kwargs: Any
) -> pl.LightningModule:
    """Load a checkpoint written under :class:`QuantizationPrecision` into a model converted the same way.

    ``model_class.load_from_checkpoint(path)`` alone gives the float model with the trained (latent) weights;
    this helper then converts it in the saved mode and restores the quantizer step sizes, so its outputs match
    the model at the time of saving. Export it with :func:`lightning_parallel.quantization.export_quantized`.

    Args:
        model_class: the LightningModule class.
        checkpoint_path: path of the ``.ckpt`` file.
        kwargs: passed to ``model_class.load_from_checkpoint`` (for example ``map_location``).
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = find_plugin_state(checkpoint)
    if state is None:
        raise ValueError(
            f"checkpoint_path={checkpoint_path!r} holds no QuantizationPrecision state; it was not written by a "
            "Trainer using QuantizationPrecision. Load it with model_class.load_from_checkpoint instead."
        )
    model = model_class.load_from_checkpoint(checkpoint_path, **kwargs)
    plugin = (
        QuantizationPrecision.from_state_dict(state, optimizer=None) if state["settings"]["mode"] else None
    )
    if plugin is None:
        return model
    converted = plugin.convert_module(model)
    plugin.load_state_dict(state)
    return converted  # type: ignore[return-value]
