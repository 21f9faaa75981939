"""A multi-layer perceptron classifier: the smallest model that implements the pipeline protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn
from typing_extensions import override

from lightning_parallel.models.base import OptimizerName, PipelineClassifier, SchedulerName

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLPClassifier(PipelineClassifier):
    """MLP over flattened inputs; one block per hidden layer (Linear + activation), then the output Linear.

    Args:
        in_features: size of a flattened input (64 for 8x8 digits).
        hidden: widths of the hidden layers; each is one pipeline block. Default ``(128, 128, 128)``.
        num_classes: number of classes. Default 10.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        lr: learning rate. Default 1e-3.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        weight_decay: optimizer weight decay. Default 0.
        momentum: SGD momentum. Default 0.9.
        scheduler: ``"none"`` or ``"cosine"``.
        init_seed: seed of the initial weights; ``None`` (default) draws it from torch's random stream.
        build_in_configure_model: build the blocks in ``configure_model()`` instead of in ``__init__``.
            Default False.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 128, 128),
        num_classes: int = 10,
        *,
        activation: Literal["relu", "tanh", "gelu"] = "relu",
        lr: float = 1e-3,
        optimizer: OptimizerName = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerName = "none",
        init_seed: int | None = None,
        build_in_configure_model: bool = False,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            momentum=momentum,
            scheduler=scheduler,
            init_seed=init_seed,
            build_in_configure_model=build_in_configure_model,
        )
        if in_features < 1:
            raise ValueError(f"in_features={in_features} must be positive (64 for 8x8 digits).")
        if any(width < 1 for width in hidden):
            raise ValueError(f"hidden={list(hidden)} must list positive widths, e.g. [128, 128].")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(_ACTIVATIONS)}.")
        self.save_hyperparameters()
        self.widths = [in_features, *hidden]
        self.activation = activation
        self._build_unless_deferred()

    @override
    def build_blocks(self) -> nn.Sequential:
        widths = self.widths
        layers: list[list[nn.Module]] = [
            [nn.Linear(widths[i], widths[i + 1]), _ACTIVATIONS[self.activation]()] for i in range(len(widths) - 1)
        ]
        layers.append([nn.Linear(widths[-1], self.num_classes)])
        # The first block flattens, so images (B, 1, 8, 8) and vectors (B, 64) both work.
        layers[0].insert(0, nn.Flatten())
        return nn.Sequential(*(nn.Sequential(*layer) for layer in layers))

