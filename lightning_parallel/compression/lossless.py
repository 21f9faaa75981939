"""Optional lossless stage: zstd over packed codes (CPU only).

Design: bit-packed codes of activations still hold redundancy (long runs of the code of 0,
repeated small codes); zstd at a low level removes much of it at a few hundred MB/s. The
``zstandard`` package is an optional extra, imported only when the stage is used, so that
``import lightning_parallel`` never needs it. CUDA tensors skip the stage (moving them to the
host would cost more than it saves).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ZstdBytes", "zstd_available", "zstd_compress", "zstd_decompress"]


@functools.lru_cache(maxsize=1)
def zstd_available() -> bool:
    """Whether the optional ``zstandard`` package can be imported."""
    try:
        import zstandard  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _zstd() -> Any:
    try:
        import zstandard
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "The lossless stage `lossless='zstd'` needs the `zstandard` package:"
            ' pip install "lightning-parallel[zstd]"'
        ) from err
    return zstandard


@dataclass(frozen=True)
class ZstdBytes:
    """A zstd frame holding a ``uint8`` tensor.

    Args:
        frame: the compressed bytes.
        numel: length of the original ``uint8`` tensor.
    """

    frame: bytes
    numel: int

    @property
    def nbytes(self) -> int:
        """Bytes held by the frame."""
        return len(self.frame)


def zstd_compress(data: Tensor, level: int = 1) -> ZstdBytes:
    """Compresses a CPU ``uint8`` tensor with zstd.

    Args:
        data: 1-D ``uint8`` tensor on the CPU.
        level: zstd level (1 is fast and already removes most runs).
    """
    zstandard = _zstd()
    raw = data.contiguous().numpy().tobytes()
    return ZstdBytes(zstandard.ZstdCompressor(level=level).compress(raw), data.numel())


def zstd_decompress(packed: ZstdBytes) -> Tensor:
    """Restores the ``uint8`` tensor compressed by :func:`zstd_compress`."""
    zstandard = _zstd()
    raw = zstandard.ZstdDecompressor().decompress(packed.frame, max_output_size=packed.numel)
    return (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if packed.numel
        else torch.empty(0, dtype=torch.uint8)
    )
