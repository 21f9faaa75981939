"""Codecs and saved-tensor hooks for compressing activations (pure torch, no Lightning)."""

from lightning_parallel.compression.adaptive import AdaptiveErrorController, layer_error_bound
from lightning_parallel.compression.bitpack import pack_bits, packed_nbytes, unpack_bits
from lightning_parallel.compression.codec import Codec
from lightning_parallel.compression.error_bounded import ErrorBoundedCodec
from lightning_parallel.compression.factory import CODECS, make_codec
from lightning_parallel.compression.kbit import KBitCodec
from lightning_parallel.compression.masks import pack_mask, unpack_mask
from lightning_parallel.compression.passthrough import PassthroughCodec
from lightning_parallel.compression.saved_tensors import SavedTensorCompressor
from lightning_parallel.compression.stats import CompressionStats

__all__ = [
    "CODECS",
    "AdaptiveErrorController",
    "Codec",
    "CompressionStats",
    "ErrorBoundedCodec",
    "KBitCodec",
    "PassthroughCodec",
    "SavedTensorCompressor",
    "layer_error_bound",
    "make_codec",
    "pack_bits",
    "pack_mask",
    "packed_nbytes",
    "unpack_bits",
    "unpack_mask",
]
