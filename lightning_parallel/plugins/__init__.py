from lightning_parallel.plugins.compressed_activation import (
    CompressedActivationPrecision as CompressedActivationPrecision,
)
from lightning_parallel.plugins.quantization import QuantizationPrecision as QuantizationPrecision
