"""Saved-tensor hooks that compress what autograd keeps for backward.

Design decisions:

- ``torch.autograd.graph.saved_tensors_hooks``: pack compresses, unpack decompresses. Unpack may
  run several times for one saved tensor, so it never frees or mutates the packed data; autograd
  drops the packed object when it no longer needs it, which is what frees the memory.
- Parameters, buffers and what is computed from parameters alone (autocast's bf16 copy of a
  weight, its transpose, a fake-quantized weight) are never compressed: a tensor is skipped when
  it is an ``nn.Parameter``, when its storage is the storage of a parameter or buffer of a
  registered module (compared by ``data_ptr``), or when its autograd history, up to 4 ops
  deep, reaches parameters and no other tensor requiring grad, and it has the shape of one of
  those parameters (or is a transposed view of that shape). The data, which needs no gradient, is invisible in
  the history, so the shape tells a first layer's output from a weight copy; a rare square
  coincidence leaves one activation uncompressed, never the reverse.
- A storage saved several times (a ReLU output saved by the ReLU and again as the next layer's
  input, or the 2-D view of a 3-D input that ``linear`` saves) is compressed once and shared.
  A dense tensor (any permutation of a contiguous block) is keyed by its block of storage and
  restored with ``as_strided``, so transposed and reshaped views of one block share an entry.
  Keys hold a weak reference to the storage (``StorageWeakRef``), which keeps the storage's
  identity from being reused while the key lives, so a freed and reallocated buffer can never
  be mistaken for a saved one. The table is cleared when the context exits.
- Tiny tensors (fewer than ``min_numel`` elements) and non-float tensors stay as they are,
  except boolean and 0/1 integer tensors, stored as 1 bit per element. Outputs of softmax,
  log-softmax and exp also stay exact: their backward exponentiates them, so any absolute
  error becomes a relative error of the loss gradient (2-bit log-probabilities of a GPT's
  cross-entropy made training diverge to NaN).
- Statistics an op saves next to its input stay exact too: a floating tensor with no autograd
  history whose shape is that of a tensor saved earlier in the same forward with its last
  dimension removed or set to 1 (the log-sum-exp of ``scaled_dot_product_attention``, the
  mean and reciprocal standard deviation of ``layer_norm``). They are small (one value per row)
  and their errors are amplified: the attention backward computes ``exp(s - lse)``, so an
  error in the log-sum-exp scales every probability of its row. Measured on the GPT after 120
  steps: compressing only the first layer's log-sum-exp at 5% of its range gave a whole-model
  gradient cosine of 0.50. The data input of a model has the same lack of history but is the
  first tensor of its shape family, so it is still compressed.
- Accounting covers every unique activation storage held (compressed or not, parameters
  excluded): raw and packed bytes per step, and the peak of the bytes alive at once.
- Hooks do not fire under ``no_grad``/``inference_mode``, so evaluation is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from lightning_parallel.compression.codec import Codec, tensor_nbytes
from lightning_parallel.compression.masks import is_binary, pack_mask, unpack_mask
from lightning_parallel.compression.passthrough import PassthroughEncoded
from lightning_parallel.compression.stats import CompressionStats

__all__ = ["ErrorBoundPolicy", "SavedTensorCompressor"]

_CAST_CHAIN_DEPTH = 4
_CAST_CHAIN_NODES = 16
# outputs whose backward exponentiates them: an error of eb becomes a factor exp(eb)
_EXACT_OUTPUTS = frozenset({"LogSoftmaxBackward0", "SoftmaxBackward0", "ExpBackward0"})


class ErrorBoundPolicy(Protocol):
    """Chooses the error bound of each saved tensor (the adaptive controller implements it)."""

    def bound(self, slot: int, x: Tensor) -> float | None:
        """Absolute error bound for the ``slot``-th compressed storage of a forward, or ``None``."""
        ...

    def observe(self, slot: int) -> None:
        """Called on every save of the ``slot``-th storage (first save and shared saves)."""
        ...


class _Entry:
    """One packed storage, shared by every save of it; releases its bytes from the stats when freed.

    Each save holds a :class:`_Saved`; the first of them to unpack decodes and keeps the result until every
    other save has unpacked it too (a ReLU output is read by the ReLU's and the next layer's backward, one
    after the other), so a shared storage is decoded once per backward, not once per save.
    """

    __slots__ = ("cached", "decode", "encoded", "packed", "raw", "saves", "stats", "unpacks")

    def __init__(
        self, encoded: Any, decode: Callable[[Any], Tensor], raw: int, stats: CompressionStats
    ) -> None:
        self.encoded = encoded
        self.decode = decode
        self.raw = raw
        self.packed = int(encoded.nbytes)
        self.stats = stats
        self.saves = 0
        self.unpacks = 0
        self.cached: Tensor | None = None

    def restore(self) -> Tensor:
        """The decoded block, decoded once per round of unpacks by its saves."""
        base = self.cached if self.cached is not None else self.decode(self.encoded)
        self.unpacks += 1
        # keep it for the other saves of this round, drop it after the last one
        self.cached = base if self.unpacks % self.saves else None
        return base

    def __del__(self) -> None:
        self.stats.release(self.raw, self.packed)


class _Saved:
    """What autograd holds: an entry, and how to view the restored block as the saved tensor."""

    __slots__ = ("entry", "size", "stride")

    def __init__(self, entry: _Entry, size: torch.Size | None, stride: tuple[int, ...] | None) -> None:
        self.entry = entry
        self.size = size
        self.stride = stride
        entry.saves += 1

    def restore(self) -> Tensor:
        base = self.entry.restore()
        if self.size is None or self.stride is None:
            return base
        # a decoded block starts at offset 0; a kept block is the saved view, starting at the block
        return base.as_strided(self.size, self.stride, base.storage_offset())


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers a contiguous block of its storage exactly once (any dim order)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _passthrough_decode(encoded: PassthroughEncoded) -> Tensor:
    return encoded.tensor


class SavedTensorCompressor:
    """A context manager compressing the tensors autograd saves inside it.

    Args:
        codec: the codec for floating-point activations.
        min_numel: tensors with fewer elements stay uncompressed. Default 1024.
        compress_masks: store boolean and 0/1 integer tensors in 1 bit per element. Default ``True``.
        policy: chooses a per-tensor error bound (adaptive control), or ``None`` for the codec's own.
    """

    def __init__(
        self,
        codec: Codec,
        *,
        min_numel: int = 1024,
        compress_masks: bool = True,
        policy: ErrorBoundPolicy | None = None,
    ) -> None:
        if isinstance(min_numel, bool) or not isinstance(min_numel, int):
            raise TypeError(f"`min_numel` must be an integer number of elements, got min_numel={min_numel!r}.")
        if min_numel < 0:
            raise ValueError(f"`min_numel` must be >= 0, got min_numel={min_numel!r}.")
        self.codec = codec
        self.min_numel = min_numel
        self.compress_masks = compress_masks
        self.policy = policy
        self.stats = CompressionStats()
        self._modules: list[nn.Module] = []
        self._excluded: set[int] = set()
        self._cache: dict[tuple[Any, ...], tuple[StorageWeakRef, _Entry, int]] = {}
        self._slot = 0
        self._reduced_shapes: set[tuple[int, ...]] = set()
        self._hooks: Any = None

    def exclude(self, module: nn.Module) -> None:
        """Never compress the parameters and buffers of ``module`` (refreshed on every enter).

        Args:
            module: the model whose parameters and buffers are not activations.
        """
        if all(m is not module for m in self._modules):
            self._modules.append(module)

    def __enter__(self) -> SavedTensorCompressor:
        if self._hooks is not None:
            raise RuntimeError("SavedTensorCompressor is not re-entrant: exit it before entering it again.")
        self._excluded = {
            t.untyped_storage().data_ptr()
            for m in self._modules
            for t in (*m.parameters(), *m.buffers())
            if t.numel() > 0
        }
        self._cache.clear()
        self._slot = 0
        self._reduced_shapes.clear()
        self.stats.reset_step()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        hooks, self._hooks = self._hooks, None
        self._cache.clear()
        hooks.__exit__(*exc)

    def _is_parameter_like(self, t: Tensor) -> bool:
        if isinstance(t, nn.Parameter) or t.untyped_storage().data_ptr() in self._excluded:
            return True
        if t.grad_fn is None:
            return False
        shapes = self._parameter_shapes(t.grad_fn)
        if shapes is None:
            return False
        # a transposed weight (what `linear` saves) is a transposed view, not a contiguous tensor
        transposed = t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()
        return t.shape in shapes or (transposed and t.shape[::-1] in shapes)

    def _is_parameter(self, var: Tensor) -> bool:
        return isinstance(var, nn.Parameter) or var.untyped_storage().data_ptr() in self._excluded

    def _parameter_shapes(self, fn: Any) -> set[torch.Size] | None:
        """Shapes of the parameters a short autograd history reads, or ``None`` if it reads anything else.

        Edges without gradient (``None``: constants, or the data) are allowed; the caller also
        asks for the tensor to have the shape of one of the parameters, which tells a cast,
        transposed or fake-quantized weight from the first layer's output on a batch.
        """
        stack, seen, shapes = [(fn, 0)], 0, set()
        while stack:
            node, depth = stack.pop()
            if node is None:
                continue
            var = getattr(node, "variable", None)
            if var is not None:
                if not self._is_parameter(var):
                    return None
                shapes.add(var.shape)
                continue
            seen += 1
            if depth >= _CAST_CHAIN_DEPTH or seen > _CAST_CHAIN_NODES:
                return None
            stack.extend((nxt, depth + 1) for nxt, _ in node.next_functions)
        return shapes or None

    def _is_statistic(self, t: Tensor) -> bool:
        """Whether ``t`` is a per-row statistic of a tensor saved earlier (see the module notes); notes ``t``."""
        shape = tuple(t.shape)
        statistic = t.grad_fn is None and not t.requires_grad and shape in self._reduced_shapes
        if len(shape) >= 2 and not statistic:
            self._reduced_shapes.update((shape[:-1], (*shape[:-1], 1)))
        return statistic

    def _pack(self, t: Tensor) -> Any:
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.device.type == "meta":
            return t.detach()
        if self._is_parameter_like(t):
            return t.detach()
        ref = StorageWeakRef(t.untyped_storage())
        dense = _is_dense(t)
        if dense:
            key: tuple[Any, ...] = (ref.cdata, t.dtype, t._version, t.storage_offset(), t.numel())
        else:
            key = (ref.cdata, t.dtype, t._version, t.storage_offset(), t.shape, t.stride())
        size: torch.Size | None = t.shape if dense else None
        stride: tuple[int, ...] | None = t.stride() if dense else None
        floating = t.is_floating_point()
        statistic = floating and self._is_statistic(t)  # every save notes its shape, shared ones included
        hit = self._cache.get(key)
        if hit is not None:
            if self.policy is not None and hit[2] >= 0:
                self.policy.observe(hit[2])
            return _Saved(hit[1], size, stride)
        exact = statistic or (t.grad_fn is not None and t.grad_fn.name() in _EXACT_OUTPUTS)
        large = t.numel() >= self.min_numel and not exact
        binary = large and self.compress_masks and not floating and not t.is_complex() and is_binary(t)
        if not (large and floating) and not binary:
            # kept as is: no copy, the saved view itself
            entry = _Entry(PassthroughEncoded(t.detach()), _passthrough_decode, tensor_nbytes(t), self.stats)
            self.stats.add(entry.raw, entry.packed, False)
            self.stats.small_tensors += int(t.numel() < self.min_numel)
            self._cache[key] = (ref, entry, -1)
            return _Saved(entry, None, None)
        if dense:
            base = t.detach().as_strided((t.numel(),), (1,), t.storage_offset())
        else:
            base = t.detach().contiguous()
        slot = -1
        if floating:
            slot = self._slot
            self._slot += 1
            bound = None
            if self.policy is not None:
                self.policy.observe(slot)
                bound = self.policy.bound(slot, base)
            encoded: Any = self.codec.encode(base, error_bound=bound)
            decode: Callable[[Any], Tensor] = self.codec.decode
        else:
            encoded, decode = pack_mask(base), unpack_mask
        entry = _Entry(encoded, decode, tensor_nbytes(base), self.stats)
        self.stats.add(entry.raw, entry.packed, True)
        self._cache[key] = (ref, entry, slot)
        return _Saved(entry, size, stride)

    @staticmethod
    def _unpack(obj: Any) -> Tensor:
        return obj.restore() if isinstance(obj, _Saved) else obj
