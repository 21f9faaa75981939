"""Error-bounded lossy codec (COMET-style uniform quantization).

Design decisions:

- Bins have width ``step = 2 * eb'``, so the bin centre is within ``eb'`` of ``x``. With
  ``zero_mask`` (default) the bins are mid-rise, ``x_hat = (floor(x / step) + 0.5) * step``:
  no non-zero value decodes to zero and every sign is kept, so ReLU's backward mask stays
  exact (with mid-tread bins a small positive ReLU output rounds to 0 and drops its gradient,
  which measured 10x the target gradient error on an MLP); exact zeros go to a 1-bit mask
  (ReLU outputs) or, when rare, to the exceptions. Without it the bins are mid-tread,
  ``x_hat = round(x / step) * step``, which keeps zeros exact by itself. Codes are offset by
  the smallest code and bit-packed in the fewest bits covering the range.
- The bound is guaranteed in the terms of the *original dtype*: ``x_hat`` is rounded back to
  bf16/fp16/fp32, which adds up to half an ulp, so the quantizer uses ``eb' = eb - margin`` with
  ``margin`` about half an ulp of ``max|x|``, then every element is checked (in the work dtype
  against a bound shrunk by 2**-20, which absorbs the rounding of the check). Elements that
  still miss the bound (and NaN, +-inf) are stored exactly as exceptions (index, value), the
  way SZ stores unpredictable values. The bound therefore holds for every element, whatever the
  shape, dtype, constant, denormal or non-finite input.
- When the range needs more than 24 bits, or the encoding is not smaller than the raw tensor,
  the tensor is stored as is.
- An optional zstd stage compresses the packed codes on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_parallel.compression.bitpack import pack_bits, unpack_bits
from lightning_parallel.compression.codec import Codec, tensor_nbytes
from lightning_parallel.compression.lossless import ZstdBytes, zstd_compress, zstd_decompress
from lightning_parallel.compression.masks import PackedMask, compact, exact_values, pack_mask, restore_dense

__all__ = ["ErrorBoundedCodec", "ErrorBoundedEncoded"]

_MAX_CODE_BITS = 24
_MAX_ABS_CODE = 2.0**30
_MIN_FAST_CHECK_BOUND = 1e-30
ErrorBoundMode = Literal["absolute", "relative"]
Lossless = Literal["none", "zstd"]


@dataclass(frozen=True)
class ErrorBoundedEncoded:
    """A tensor compressed by :class:`ErrorBoundedCodec`.

    Args:
        shape: original shape.
        dtype: original dtype.
        step: bin width (``x_hat = (code + qmin + offset) * step``).
        offset: 0.5 for mid-rise bins (signs kept, zeros masked), 0.0 for mid-tread bins.
        qmin: the smallest code, added back on decode.
        bits: bits per code.
        count: number of codes (elements not covered by the zero mask).
        payload: packed codes, or their zstd frame.
        nonzero: 1-bit mask of the coded elements, or ``None`` when every element is coded.
        exc_index: flat indices of elements stored exactly, or ``None``.
        exc_value: their values, or ``None``.
        raw: the tensor itself when compression would not help, else ``None``.
    """

    shape: torch.Size
    dtype: torch.dtype
    step: float
    offset: float
    qmin: int
    bits: int
    count: int
    payload: Tensor | ZstdBytes | None
    nonzero: PackedMask | None
    exc_index: Tensor | None
    exc_value: Tensor | None
    raw: Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the encoded tensor."""
        if self.raw is not None:
            return tensor_nbytes(self.raw)
        payload = self.payload.nbytes if isinstance(self.payload, ZstdBytes) else tensor_nbytes(self.payload)
        mask = self.nonzero.nbytes if self.nonzero is not None else 0
        return payload + mask + tensor_nbytes(self.exc_index) + tensor_nbytes(self.exc_value)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _raw(x: Tensor) -> ErrorBoundedEncoded:
    return ErrorBoundedEncoded(x.shape, x.dtype, 1.0, 0.0, 0, 0, 0, None, None, None, None, raw=x.detach())


class ErrorBoundedCodec(Codec):
    """Uniform quantization with ``|x_hat - x| <= eb`` for every element.

    Args:
        error_bound: the bound ``eb`` (> 0). Absolute, or a fraction of each tensor's finite value
            range (``max - min``) when ``mode="relative"``. Default 1e-2.
        mode: ``"absolute"`` or ``"relative"`` (default).
        zero_mask: mid-rise bins that keep signs, with exact zeros in a 1-bit mask (or stored as
            exceptions when rare); ``False``: mid-tread bins. Default ``True``.
        lossless: ``"none"`` (default) or ``"zstd"``: zstd over the packed codes of CPU tensors
            (needs the ``zstd`` extra).
        zstd_level: zstd compression level, default 1.
    """

    name = "error_bounded"

    def __init__(
        self,
        error_bound: float = 1e-2,
        *,
        mode: ErrorBoundMode = "relative",
        zero_mask: bool = True,
        lossless: Lossless = "none",
        zstd_level: int = 1,
    ) -> None:
        if isinstance(error_bound, bool) or not isinstance(error_bound, (int, float)):
            raise TypeError(f"`error_bound` must be a number, e.g. 1e-2, got error_bound={error_bound!r}.")
        if not error_bound > 0 or error_bound == float("inf"):
            raise ValueError(f"`error_bound` must be a finite number > 0, got error_bound={error_bound!r}.")
        if mode not in ("absolute", "relative"):
            raise ValueError(f"`mode` must be 'absolute' or 'relative', got mode={mode!r}.")
        if lossless not in ("none", "zstd"):
            raise ValueError(f"`lossless` must be 'none' or 'zstd', got lossless={lossless!r}.")
        self.error_bound = float(error_bound)
        self.mode: ErrorBoundMode = mode
        self.zero_mask = zero_mask
        self.lossless: Lossless = lossless
        self.zstd_level = zstd_level

    def absolute_bound(self, x: Tensor) -> float:
        """The absolute bound this codec applies to ``x`` (resolving ``mode="relative"``).

        Args:
            x: the tensor to be compressed.
        """
        if self.mode == "absolute":
            return self.error_bound
        lo, hi = _finite_range(x.reshape(-1).to(_work_dtype(x.dtype)))
        return self.error_bound * (hi - lo)

    def encode(self, x: Tensor, *, error_bound: float | None = None) -> ErrorBoundedEncoded:
        """Compresses ``x`` within the error bound.

        Args:
            x: a floating-point tensor.
            error_bound: absolute bound for this tensor, overriding the codec's own; must be >= 0.
        """
        if error_bound is not None and not error_bound >= 0:
            raise ValueError(f"`error_bound` must be >= 0, got error_bound={error_bound!r}.")
        flat = x.detach().reshape(-1)
        n = flat.numel()
        if n == 0:
            return _raw(x)
        work = _work_dtype(x.dtype)
        xw = flat.to(work)
        lo_t, hi_t = torch.aminmax(xw)
        lo, hi = float(lo_t), float(hi_t)
        all_finite = math.isfinite(lo) and math.isfinite(hi)  # NaN propagates through aminmax
        vals = xw
        if not all_finite:
            finite = torch.isfinite(xw)
            vals = torch.where(finite, xw, torch.zeros((), dtype=work, device=xw.device))
            lo, hi = _finite_range(xw)
        if error_bound is not None:
            eb = float(error_bound)
        elif self.mode == "absolute":
            eb = self.error_bound
        else:
            eb = self.error_bound * (hi - lo)
        amax = max(abs(lo), abs(hi))
        # mid-rise bins (x_hat = (floor(x / step) + 0.5) * step) never decode a non-zero to zero
        # and keep every sign, so ReLU's backward mask stays exact; zeros are then kept exactly
        # by a mask or as exceptions. Mid-tread bins (round) keep zeros exact by themselves.
        offset = 0.5 if self.zero_mask else 0.0
        if hi == lo:
            # constant finite part: one mid-tread code reproduces it exactly
            step, offset = (amax if amax > 0 else 1.0), 0.0
        else:
            # half an ulp of the output dtype, a few ulps of the work dtype, half a subnormal step,
            # and room for the check below, which accepts errors up to eb * (1 - 2**-20)
            fin, fw = torch.finfo(x.dtype), torch.finfo(work)
            margin = amax * (fin.eps / 2 + 4 * fw.eps) + fin.smallest_normal * fin.eps / 2 + eb * 2.0**-19
            if eb - margin <= 0:
                return _raw(x)
            step = 2.0 * (eb - margin)
        step = float(torch.tensor(step, dtype=work))
        if not 0 < step < float("inf") or amax / step >= _MAX_ABS_CODE:
            return _raw(x)
        # x * (1 / step) may differ from x / step by an ulp, which can move a value on a bin edge to the
        # next bin: its error is then half a step plus an ulp, still within eb (eb' leaves a margin)
        inv = 1.0 / step
        q = vals.mul(inv) if inv <= torch.finfo(work).max else vals.div(step)  # subnormal steps
        q = q.floor_() if offset else q.round_()
        qmin_t, qmax_t = torch.aminmax(q)
        qmin, qmax = int(qmin_t), int(qmax_t)
        bits = (qmax - qmin).bit_length()
        if bits > _MAX_CODE_BITS:
            return _raw(x)
        xhat = q.add(offset).mul_(step)
        if x.dtype != work:
            xhat = xhat.to(x.dtype).to(work)
        if eb >= _MIN_FAST_CHECK_BOUND:
            # |x_hat - x| in the work dtype is off by at most a 2**-24 relative rounding (results in
            # the subnormal range are exact), so a bound shrunk by 2**-20 proves the true bound
            err, bound = xhat.sub_(xw).abs_(), eb * (1.0 - 2.0**-20)
        else:
            err, bound = (xhat.double() - flat.double()).abs(), eb
        # the element-wise test only when the largest error (NaN for non-finite input) fails it
        bad: Tensor | None = None
        if not all_finite or not float(err.amax()) <= bound:
            bad = ~(err <= bound)
        nonzero: PackedMask | None = None
        keep: Tensor | None = None
        kept = n
        if offset:
            zero = flat == 0
            zeros = int(torch.count_nonzero(zero))
            if zeros:
                # a mask costs n bits and saves the zeros' codes; exceptions cost index + value each
                if n - zeros * bits <= zeros * 8 * (4 + x.element_size()):
                    keep = ~zero
                    kept = n - zeros
                    nonzero = pack_mask(keep)
                    if bad is not None:
                        bad &= keep
                else:
                    bad = zero if bad is None else bad | zero
        exc_index = exc_value = None
        if bad is not None and bool(bad.any()):
            exc_index, exc_value = exact_values(flat, bad)
        if keep is not None:
            q = compact(q, keep, kept)
        codes = q.sub_(qmin).to(torch.int32)
        count = codes.numel()
        packed = pack_bits(codes, bits)
        payload: Tensor | ZstdBytes = packed
        if self.lossless == "zstd" and packed.device.type == "cpu" and packed.numel() > 0:
            payload = zstd_compress(packed, self.zstd_level)
        enc = ErrorBoundedEncoded(
            x.shape, x.dtype, step, offset, qmin, bits, count, payload, nonzero, exc_index, exc_value
        )
        if enc.nbytes >= tensor_nbytes(x):
            return _raw(x)
        return enc

    def decode(self, encoded: ErrorBoundedEncoded) -> Tensor:
        """Restores the tensor; every element is within the bound of the original.

        Args:
            encoded: the result of :meth:`encode`.
        """
        if encoded.raw is not None:
            return encoded.raw
        payload = encoded.payload
        assert payload is not None
        packed = zstd_decompress(payload) if isinstance(payload, ZstdBytes) else payload
        codes = unpack_bits(packed, encoded.bits, encoded.count)
        work = _work_dtype(encoded.dtype)
        vals = (((codes.to(torch.int32) + encoded.qmin).to(work) + encoded.offset) * encoded.step).to(
            encoded.dtype
        )
        return restore_dense(vals, encoded.nonzero, encoded.exc_index, encoded.exc_value, encoded.shape)


def _finite_range(vals: Tensor) -> tuple[float, float]:
    """(min, max) over the finite entries of ``vals``; (0, 0) when there are none."""
    if vals.numel() == 0:
        return 0.0, 0.0
    if not bool(torch.isfinite(vals).all()):
        vals = vals[torch.isfinite(vals)]
        if vals.numel() == 0:
            return 0.0, 0.0
    lo, hi = torch.aminmax(vals)
    return float(lo), float(hi)
