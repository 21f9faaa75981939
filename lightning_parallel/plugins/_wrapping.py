"""The base of our precision plugins: each wraps an inner precision and hands it every numeric hook.

Lightning accepts one precision plugin per Trainer, so ours nest: ``CompressedActivationPrecision`` around
``QuantizationPrecision`` around ``"bf16-mixed"``, for example. A subclass overrides only the hooks where it
adds something and calls ``self.inner`` there too.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

INNER_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


def make_inner_precision(inner: str | Precision) -> Precision:
    """The precision plugin named by ``inner`` (a ``Precision`` instance is returned as it is).

    Raises:
        ValueError: for a name outside ``INNER_PRECISIONS``.
    """
    if isinstance(inner, Precision):
        return inner
    if inner in ("32-true", "32"):
        return Precision()
    if inner in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(inner, "cuda" if torch.cuda.is_available() else "cpu")  # type: ignore[arg-type]
    if inner in ("bf16-true", "16-true"):
        return HalfPrecision(inner)  # type: ignore[arg-type]
    raise ValueError(
        f"inner={inner!r} is not a supported precision; use one of {INNER_PRECISIONS} or a Precision instance."
    )


class WrappingPrecision(Precision):
    """A precision plugin that delegates every hook to ``inner``.

    Args:
        inner: the wrapped precision, a name from ``INNER_PRECISIONS`` or a ``Precision`` instance.
    """

    def __init__(self, inner: str | Precision) -> None:
        self.inner = make_inner_precision(inner)
        self.precision = self.inner.precision

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return self.inner.convert_module(module)

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        return self.inner.connect(model, optimizers, lr_schedulers)

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return self.inner.tensor_init_context()

    @override
    def module_init_context(self) -> AbstractContextManager:
        return self.inner.module_init_context()

    @override
    def forward_context(self) -> AbstractContextManager:
        return self.inner.forward_context()

    @override
    @contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        with self.inner.train_step_context():
            yield

    @override
    @contextmanager
    def val_step_context(self) -> Generator[None, None, None]:
        with self.inner.val_step_context():
            yield

    @override
    @contextmanager
    def test_step_context(self) -> Generator[None, None, None]:
        with self.inner.test_step_context():
            yield

    @override
    @contextmanager
    def predict_step_context(self) -> Generator[None, None, None]:
        with self.inner.predict_step_context():
            yield

    @override
    def convert_input(self, data: Any) -> Any:
        return self.inner.convert_input(data)

    @override
    def convert_output(self, data: Any) -> Any:
        return self.inner.convert_output(data)

    @override
    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        return self.inner.pre_backward(tensor, module)

    @override
    def backward(  # type: ignore[override]
        self, tensor: Tensor, model: pl.LightningModule, optimizer: Any, *args: Any, **kwargs: Any
    ) -> None:
        self.inner.backward(tensor, model, optimizer, *args, **kwargs)

    @override
    def post_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        return self.inner.post_backward(tensor, module)

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        return self.inner.optimizer_step(optimizer, model=model, closure=closure, **kwargs)

    # Precision.clip_gradients dispatches to these two, so a strategy that replaces them on the outermost
    # plugin (global-norm clipping across pipeline stages) is honoured.
    @override
    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: int | float) -> None:
        self.inner.clip_grad_by_value(optimizer, clip_val)

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        self.inner.clip_grad_by_norm(optimizer, clip_val)

    @property
    def scaler(self) -> Any:
        """The inner precision's gradient scaler (``None`` without one)."""
        return getattr(self.inner, "scaler", None)

    @override
    def main_params(self, optimizer: Optimizer) -> Any:
        return self.inner.main_params(optimizer)

    @override
    def unscale_gradients(self, optimizer: Optimizer) -> None:
        self.inner.unscale_gradients(optimizer)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.inner.on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.inner.on_load_checkpoint(checkpoint)

    @override
    def teardown(self) -> None:
        self.inner.teardown()
