"""The ``none`` codec: keeps saved tensors as they are.

Design: it returns a detached alias of the input (no copy), so gradients are bitwise identical
to training without the plugin while the hooks still account for the bytes autograd holds.
Detaching avoids a reference cycle when autograd saves an op's own output.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lightning_parallel.compression.codec import Codec, tensor_nbytes

__all__ = ["PassthroughCodec", "PassthroughEncoded"]


@dataclass(frozen=True)
class PassthroughEncoded:
    """An uncompressed tensor.

    Args:
        tensor: the (detached) tensor itself.
    """

    tensor: Tensor

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensor."""
        return tensor_nbytes(self.tensor)


class PassthroughCodec(Codec):
    """Stores tensors unchanged (``codec="none"``)."""

    name = "none"

    def encode(self, x: Tensor, *, error_bound: float | None = None) -> PassthroughEncoded:
        """Wraps a detached alias of ``x``.

        Args:
            x: any tensor.
            error_bound: unused.
        """
        return PassthroughEncoded(x.detach())

    def decode(self, encoded: PassthroughEncoded) -> Tensor:
        """Returns the stored tensor.

        Args:
            encoded: the result of :meth:`encode`.
        """
        return encoded.tensor
