"""The interface every activation codec implements.

Design: a codec turns a tensor into an immutable *encoded* object and back. Encoded objects
report the bytes they hold (``nbytes``) so that the saved-tensor hooks can account for real
memory, and ``decode`` may be called any number of times on the same object (autograd may
unpack a saved tensor more than once), so decoding never mutates or frees the encoded data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

from torch import Tensor

__all__ = ["Codec", "Encoded", "tensor_nbytes"]


def tensor_nbytes(t: Tensor | None) -> int:
    """Bytes held by the elements of ``t`` (0 for ``None``)."""
    return 0 if t is None else t.numel() * t.element_size()


class Encoded(Protocol):
    """What a codec returns: anything that knows how many bytes it holds."""

    @property
    def nbytes(self) -> int:
        """Bytes held by this encoded tensor."""
        ...


class Codec(ABC):
    """Compresses floating-point tensors saved for backward.

    Subclasses are pure torch, run on CPU and CUDA, and keep the shape, dtype and device of the
    input. ``error_bound`` lets a caller (the adaptive controller) override the codec's own
    absolute error bound for one tensor; codecs without an error bound ignore it.
    """

    #: short name used in configs and logs
    name: str = ""

    @abstractmethod
    def encode(self, x: Tensor, *, error_bound: float | None = None) -> Any:
        """Compresses ``x``.

        Args:
            x: a floating-point tensor (any shape, any device).
            error_bound: absolute error bound overriding the codec's own for this tensor, or ``None``.
        """

    @abstractmethod
    def decode(self, encoded: Any) -> Tensor:
        """Restores a tensor from :meth:`encode`'s result; may be called several times."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this codec's random draws (empty for deterministic codecs)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        del state_dict  # deterministic codecs have no state

    def roundtrip(self, x: Tensor, *, error_bound: float | None = None) -> Tensor:
        """``decode(encode(x))``, for tests and gradient-error measurements.

        Args:
            x: the tensor to compress and restore.
            error_bound: as in :meth:`encode`.
        """
        return self.decode(self.encode(x, error_bound=error_bound))
