"""Byte accounting of the tensors autograd saves for backward."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CompressionStats"]


@dataclass
class CompressionStats:
    """Counters over the unique storages saved in one step (reset by :meth:`reset_step`).

    Args:
        raw_bytes: bytes the saved storages would hold uncompressed.
        packed_bytes: bytes they hold after compression.
        tensors: unique saved storages.
        compressed_tensors: those a codec compressed (the rest stay as they are).
        small_tensors: those kept as they are because they have fewer than ``min_numel`` elements.
        live_bytes: packed bytes held right now (across steps, until autograd frees them).
        live_raw_bytes: raw bytes of the same tensors.
        peak_saved_bytes: highest ``live_bytes`` since the last reset.
        peak_raw_bytes: highest ``live_raw_bytes`` since the last reset.
    """

    raw_bytes: int = 0
    packed_bytes: int = 0
    tensors: int = 0
    compressed_tensors: int = 0
    small_tensors: int = 0
    live_bytes: int = 0
    live_raw_bytes: int = 0
    peak_saved_bytes: int = 0
    peak_raw_bytes: int = 0

    @property
    def compression_ratio(self) -> float:
        """``raw_bytes / packed_bytes`` of this step (1.0 when nothing was saved)."""
        return self.raw_bytes / self.packed_bytes if self.packed_bytes else 1.0

    def reset_step(self) -> None:
        """Starts a new step: zeroes the per-step counters; peaks restart from what is live."""
        self.raw_bytes = self.packed_bytes = self.tensors = self.compressed_tensors = self.small_tensors = 0
        self.peak_saved_bytes = self.live_bytes
        self.peak_raw_bytes = self.live_raw_bytes

    def add(self, raw: int, packed: int, compressed: bool) -> None:
        """Records a newly saved storage.

        Args:
            raw: its uncompressed bytes.
            packed: the bytes it holds.
            compressed: whether a codec compressed it.
        """
        self.raw_bytes += raw
        self.packed_bytes += packed
        self.tensors += 1
        self.compressed_tensors += int(compressed)
        self.live_bytes += packed
        self.live_raw_bytes += raw
        self.peak_saved_bytes = max(self.peak_saved_bytes, self.live_bytes)
        self.peak_raw_bytes = max(self.peak_raw_bytes, self.live_raw_bytes)

    def release(self, raw: int, packed: int) -> None:
        """Records that autograd freed a saved storage.

        Args:
            raw: its uncompressed bytes.
            packed: the bytes it held.
        """
        self.live_bytes -= packed
        self.live_raw_bytes -= raw

    def as_dict(self) -> dict[str, float]:
        """The figures worth logging, keyed by their log names."""
        return {
            "compression_ratio": self.compression_ratio,
            "raw_saved_bytes": float(self.raw_bytes),
            "packed_saved_bytes": float(self.packed_bytes),
            "peak_saved_bytes": float(self.peak_saved_bytes),
        }
