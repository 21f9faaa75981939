"""Builds a codec from its name and plain arguments (what YAML configs give)."""

from __future__ import annotations

from lightning_parallel.compression.codec import Codec
from lightning_parallel.compression.error_bounded import ErrorBoundedCodec
from lightning_parallel.compression.kbit import KBitCodec
from lightning_parallel.compression.passthrough import PassthroughCodec

__all__ = ["CODECS", "make_codec"]

CODECS = ("error_bounded", "kbit", "none")


def make_codec(
    name: str,
    *,
    bits: int = 2,
    group_size: int = 256,
    stochastic: bool = True,
    zero_mask: bool = True,
    error_bound: float = 1e-2,
    error_bound_mode: str = "relative",
    lossless: str = "none",
    seed: int = 0,
) -> Codec:
    """Returns the codec called ``name`` with the arguments that apply to it.

    Each value is validated once, by what consumes it (the codec's constructor, or here for the choice of
    codec and of the lossless stage); callers such as the precision plugin let that error through.

    Args:
        name: one of ``"error_bounded"``, ``"kbit"``, ``"none"``.
        bits: k-bit width (``kbit``): 1, 2, 4 or 8.
        group_size: elements per group (``kbit``).
        stochastic: stochastic rounding (``kbit``).
        zero_mask: keep exact zeros in a 1-bit mask (``kbit``, ``error_bounded``).
        error_bound: the error bound (``error_bounded``), > 0.
        error_bound_mode: ``"absolute"`` or ``"relative"`` (``error_bounded``).
        lossless: ``"none"`` or ``"zstd"`` (``error_bounded``).
        seed: seed of the stochastic rounding (``kbit``).
    """
    if lossless not in ("none", "zstd"):
        raise ValueError(f"`lossless` must be 'none' or 'zstd', got lossless={lossless!r}.")
    if lossless != "none" and name != "error_bounded":
        raise ValueError(
            f"`lossless={lossless!r}` applies to codec='error_bounded' only, got codec={name!r}; "
            "use lossless='none' or codec='error_bounded'."
        )
    if name == "kbit":
        return KBitCodec(bits, group_size=group_size, stochastic=stochastic, zero_mask=zero_mask, seed=seed)
    if name == "error_bounded":
        if error_bound_mode not in ("absolute", "relative"):
            raise ValueError(
                f"`error_bound_mode` must be 'absolute' or 'relative', got error_bound_mode={error_bound_mode!r}."
            )
        return ErrorBoundedCodec(
            error_bound,
            mode=error_bound_mode,  # type: ignore[arg-type]
            zero_mask=zero_mask,
            lossless=lossless,  # type: ignore[arg-type]
        )
    if name == "none":
        return PassthroughCodec()
    raise ValueError(f"`codec` must be one of {CODECS}, got codec={name!r}.")
