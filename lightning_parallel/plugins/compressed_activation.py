"""Precision plugin that compresses the activations saved for backward.

Design decisions:

- Lightning accepts one precision plugin, so this one wraps an *inner* precision (``"32-true"``,
  ``"bf16-mixed"``, ``"16-mixed"`` or any ``Precision`` instance, e.g. ``QuantizationPrecision``)
  and delegates every precision duty to it: autocast, loss scaling, optimizer step, clipping,
  module conversion, checkpoint state.
- The compression hooks (:class:`~lightning_parallel.compression.SavedTensorCompressor`) are
  installed in ``train_step_context``, inside the inner one, so they see exactly the training
  forward (and the loss); validation, test and prediction run under ``no_grad`` and are left
  alone. Backward runs outside the context, which is what unpacks the saved tensors.
- The module given to ``convert_module`` is registered so that its parameters and buffers are
  never compressed, and (with ``adaptive=True``) its Linear and Conv layers are hooked by the
  :class:`~lightning_parallel.compression.AdaptiveErrorController`, which recalibrates after
  backward every ``adapt_interval`` steps. Its state, and the codec's (the k-bit stochastic
  rounding generators), go into the checkpoint through ``state_dict``/``load_state_dict``, next to
  the inner precision's, so a run resumed mid-epoch draws the same rounding noise.
- After every training forward the step's accounting (compression ratio, raw and packed bytes
  over unique storages, peak saved bytes) is logged as ``compression/<name>`` and kept in
  :attr:`last_stats`. If the first training step saved tensors and compressed none (every one below
  ``min_numel``, or kept exact), a warning says so once, with the counts.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Generator
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.compression import (
    AdaptiveErrorController,
    CompressionStats,
    SavedTensorCompressor,
    make_codec,
)
from lightning_parallel.plugins._wrapping import WrappingPrecision

__all__ = ["CompressedActivationPrecision"]



class CompressedActivationPrecision(WrappingPrecision):
    """Compresses every tensor autograd saves during the training forward.

    Args:
        inner: the precision to wrap: ``"32-true"`` (default), ``"bf16-mixed"``, ``"16-mixed"`` or a
            ``Precision`` instance. Mixed precision strings use CUDA when available, else the CPU;
            pass a ``MixedPrecision`` instance to choose.
        codec: ``"kbit"`` (default, ActNN-style), ``"error_bounded"`` (COMET-style) or ``"none"``.
        bits: k-bit width, one of 1, 2, 4, 8 (``kbit``). Default 2.
        group_size: elements sharing a minimum and scale (``kbit``). Default 256.
        stochastic: stochastic rounding (``kbit``). Default ``True``.
        zero_mask: keep exact zeros in a 1-bit mask (``kbit``, ``error_bounded``). Default ``True``.
        error_bound: error bound (``error_bounded``), > 0; absolute, or a fraction of each tensor's
            value range with ``error_bound_mode="relative"``. Default 1e-2.
        error_bound_mode: ``"relative"`` (default) or ``"absolute"``.
        lossless: ``"none"`` (default) or ``"zstd"`` after error-bounded coding on CPU (``zstd`` extra);
            ``"zstd"`` with another codec is refused.
        min_numel: tensors with fewer elements are kept as they are. Default 1024.
        compress_masks: store boolean and 0/1 integer tensors in 1 bit. Default ``True``.
        adaptive: choose per-layer error bounds from gradient statistics (``error_bounded``).
            Default ``False``.
        target_error: relative weight-gradient error the adaptive bounds aim at, per layer. Default 0.3
            (measured whole-model gradient cosine 0.995 on the digits ResNet, 0.992 on the GPT).
        adapt_interval: steps between adaptive recalibrations. Default 100.
        log_stats: log the compression accounting every training step. Default ``True``.
        seed: seed of the stochastic rounding noise. Default 0.
    """

    def __init__(
        self,
        inner: str | Precision = "32-true",
        *,
        codec: Literal["kbit", "error_bounded", "none"] = "kbit",
        bits: int = 2,
        group_size: int = 256,
        stochastic: bool = True,
        zero_mask: bool = True,
        error_bound: float = 1e-2,
        error_bound_mode: Literal["relative", "absolute"] = "relative",
        lossless: Literal["none", "zstd"] = "none",
        min_numel: int = 1024,
        compress_masks: bool = True,
        adaptive: bool = False,
        target_error: float = 0.3,
        adapt_interval: int = 100,
        log_stats: bool = True,
        seed: int = 0,
    ) -> None:
        # codec, bits, error_bound, lossless, min_numel, target_error ... are validated once, by the codec,
        # the compressor and the controller that consume them; their errors reach the caller unchanged
        if adaptive and codec != "error_bounded":
            raise ValueError(f"`adaptive=True` needs codec='error_bounded', got codec={codec!r}.")
        super().__init__(inner)
        self.codec_name = codec
        self.log_stats = log_stats
        self.controller: AdaptiveErrorController | None = None
        if adaptive:
            self.controller = AdaptiveErrorController(
                target_error=target_error, adapt_interval=adapt_interval
            )
        self.compressor = SavedTensorCompressor(
            make_codec(
                codec,
                bits=bits,
                group_size=group_size,
                stochastic=stochastic,
                zero_mask=zero_mask,
                error_bound=error_bound,
                error_bound_mode=error_bound_mode,
                lossless=lossless,
                seed=seed,
            ),
            min_numel=min_numel,
            compress_masks=compress_masks,
            policy=self.controller,
        )
        self.last_stats = CompressionStats()
        self._module: pl.LightningModule | None = None
        self._checked_coverage = False

    # ---- compression ----------------------------------------------------------------------------

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        module = self.inner.convert_module(module)
        self.compressor.exclude(module)
        if self.controller is not None:
            self.controller.attach(module)
        if isinstance(module, pl.LightningModule):
            self._module = module
        return module

    @contextlib.contextmanager
    def compression_context(self) -> Generator[None, None, None]:
        """Compresses what autograd saves inside it (the training step uses it)."""
        if self.controller is not None:
            self.controller.begin_step()
        watch = self.controller.forward_context() if self.controller is not None else contextlib.nullcontext()
        with watch, self.compressor:
            yield
        self.last_stats = copy.copy(self.compressor.stats)
        self._warn_if_nothing_compressed()
        self._log()

    def _warn_if_nothing_compressed(self) -> None:
        """Warns once when a training step saved tensors and none of them was compressed."""
        stats = self.last_stats
        if self._checked_coverage or stats.tensors == 0:
            return
        self._checked_coverage = True
        if stats.compressed_tensors > 0:
            return
        rank_zero_warn(
            f"CompressedActivationPrecision compressed none of the {stats.tensors} tensors saved in a training "
            f"step ({stats.raw_bytes} bytes): {stats.small_tensors} have fewer than min_numel="
            f"{self.compressor.min_numel} elements, the other {stats.tensors - stats.small_tensors} are kept "
            "exact (softmax outputs, per-row statistics, non-float tensors). Lower `min_numel` to compress "
            "small activations; the compression ratio is 1.0."
        )

    def _log(self) -> None:
        module = self._module
        if not self.log_stats or module is None or module._current_fx_name != "training_step":
            return
        try:
            module.trainer  # noqa: B018
        except RuntimeError:
            return
        stats = {f"compression/{k}": v for k, v in self.last_stats.as_dict().items()}
        module.log_dict(stats, on_step=True, on_epoch=False, batch_size=1)

    @override
    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        with self.inner.train_step_context(), self.compression_context():
            yield

    @override
    def post_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        out = self.inner.post_backward(tensor, module)
        if self.controller is not None:
            self.controller.end_step()
        return out

    # ---- checkpoint -----------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "codec": self.compressor.codec.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("inner"):
            self.inner.load_state_dict(state_dict["inner"])
        if self.controller is not None and state_dict.get("controller") is not None:
            self.controller.load_state_dict(state_dict["controller"])
        if state_dict.get("codec"):
            self.compressor.codec.load_state_dict(state_dict["codec"])

    # ---- every other hook is handed to the inner precision by WrappingPrecision ------------------

    @override
    def teardown(self) -> None:
        if self.controller is not None:
            self.controller.detach()
        super().teardown()
