"""Linear-like layers as K-FAC and quantization see them (pure torch, no Lightning, no optional package).

- :func:`register_layer_type` / :class:`LayerType` / :class:`LinearTarget`: the layer registry
  (:mod:`~lightning_parallel.layers.registry`); :func:`linear_target` builds the target of a layer with a
  ``weight`` and a ``bias``.
- :func:`weight_coverage`: how many of a model's weight parameters a feature covers.
- :func:`attention_forward`: ``nn.MultiheadAttention``'s forward with visible projections
  (:mod:`~lightning_parallel.layers.attention`).
"""

from lightning_parallel.layers.attention import add_projection_hook, attention_forward
from lightning_parallel.layers.registry import (
    Coverage,
    LayerType,
    LinearTarget,
    find_targets,
    layer_types,
    linear_target,
    register_layer_type,
    unregister_layer_type,
    weight_coverage,
)

__all__ = [
    "Coverage",
    "LayerType",
    "LinearTarget",
    "add_projection_hook",
    "attention_forward",
    "find_targets",
    "layer_types",
    "linear_target",
    "register_layer_type",
    "unregister_layer_type",
    "weight_coverage",
]
