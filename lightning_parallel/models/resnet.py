"""A CIFAR-style ResNet classifier whose blocks form the pipeline trunk.

Blocks, in order: the stem (3x3 conv, norm, ReLU), ``blocks_per_stage`` residual blocks per entry of
``widths`` (stride 2 at the first block of every stage but the first), and the head (global average pool,
linear). It works on 8x8 digits as on 32x32 inputs: the pool makes the head independent of resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.models.base import OptimizerName, PipelineClassifier, SchedulerName

NormName = Literal["batch", "group", "none"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=norm == "none")
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=norm == "none")
        self.norm2 = _norm(norm, out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=norm == "none"),
                _norm(norm, out_channels),
            )

    @override
    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetClassifier(PipelineClassifier):
    """CIFAR-style ResNet (He et al. 2016) for small images.

    Args:
        widths: channels of each stage; the number of stages is ``len(widths)``. Default ``(16, 32, 64)``.
        blocks_per_stage: residual blocks per stage (depth = 2 * blocks_per_stage * len(widths) + 2). Default 1.
        in_channels: input channels (1 for digits). Default 1.
        num_classes: number of classes. Default 10.
        norm: ``"batch"`` (BatchNorm2d), ``"group"`` (GroupNorm, independent of the batch: exact under
            micro-batching) or ``"none"``. Default ``"batch"``.
        lr: learning rate. Default 1e-3.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``. Default ``"adam"``.
        weight_decay: optimizer weight decay. Default 0.
        momentum: SGD momentum. Default 0.9.
        scheduler: ``"none"`` or ``"cosine"``.
        init_seed: seed of the initial weights; ``None`` (default) draws it from torch's random stream.
        build_in_configure_model: build the blocks in ``configure_model()`` instead of in ``__init__``.
            Default False.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        norm: NormName = "batch",
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
        widths = list(widths)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths={widths} must list one or more positive channel counts, e.g. [16, 32, 64].")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage={blocks_per_stage} must be >= 1.")
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels} must be >= 1 (1 for digits, 3 for RGB).")
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm={norm!r} is not one of ('batch', 'group', 'none').")
        self.save_hyperparameters()
        self.widths, self.blocks_per_stage, self.in_channels, self.norm = widths, blocks_per_stage, in_channels, norm
        self._build_unless_deferred()

    @override
    def build_blocks(self) -> nn.Sequential:
        blocks: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(self.in_channels, self.widths[0], 3, padding=1, bias=self.norm == "none"),
                _norm(self.norm, self.widths[0]),
                nn.ReLU(),
            )
        ]
        channels = self.widths[0]
        for stage, width in enumerate(self.widths):
            for index in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, self.norm))
                channels = width
        blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, self.num_classes)))
        return nn.Sequential(*blocks)
