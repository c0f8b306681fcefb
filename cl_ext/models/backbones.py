"""Backbones and the incremental network that wraps them.

Every cl-ext model is an :class:`IncrementalNet`: ``features(x)`` gives the penultimate
features (used by herding, NME, UCIR's less-forget loss) and ``classifier`` is a head that
grows with the classes. Models read their input shape and initial class count from the
benchmark, so swapping the data is one recipe override.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule
from pydantic import Field
from torch import nn

from cl_ext.context import BuildContext
from cl_ext.errors import RecipeError
from cl_ext.registry import register


class IncrementalNet(nn.Module):
    # submodules (nn.Module.__getattr__ would type them Tensor | Module)
    backbone: nn.Module
    classifier: nn.Module

    def __init__(self, backbone: nn.Module, feature_dim: int, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.classifier = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MultiHeadNet(IncrementalNet, MultiTaskModule):
    """An :class:`IncrementalNet` with one head per task label (task-incremental benchmarks).

    Being a ``MultiTaskModule``, it receives the minibatch's task labels from Avalanche's
    ``avalanche_forward``; the model adaptation adds a head for each new task.
    """

    # Avalanche's MultiTaskModule.forward takes the task labels, which IncrementalNet.forward does not.
    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | int | None) -> torch.Tensor:  # type: ignore[override]
        return self.classifier(self.features(x), task_labels)


def linear_head(feature_dim: int, initial_classes: int) -> IncrementalClassifier:
    # Labels are remapped to 0..C-1 in learning order, so the head never has unseen units
    # to mask.
    return IncrementalClassifier(feature_dim, initial_out_features=initial_classes, masking=False)


class MLP(nn.Module):
    """Fully connected layers with ReLU; each ReLU is its own module (SLNID hooks onto them)."""

    def __init__(self, in_features: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = width
        self.layers = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, last_relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.last_relu = last_relu
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.relu(out) if self.last_relu else out


class ResNet(nn.Module):
    """ResNet with BasicBlocks; ``last_relu=False`` drops the final block's ReLU (LUCIR, Sec. 4)."""

    def __init__(
        self,
        blocks: list[int],
        widths: list[int],
        in_channels: int,
        small_input: bool,
        last_relu: bool = True,
    ):
        super().__init__()
        stem: list[nn.Module]
        if small_input:  # 32x32 inputs: 3x3 stem, no max-pool
            stem = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        else:
            stem = [nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)]
        stem += [nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        if not small_input:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for stage, (n_blocks, width) in enumerate(zip(blocks, widths)):
            layers = []
            for b in range(n_blocks):
                stride = 2 if (b == 0 and stage > 0) else 1
                is_last = stage == len(blocks) - 1 and b == n_blocks - 1
                layers.append(BasicBlock(in_planes, width, stride, last_relu=last_relu or not is_last))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


def _channels(ctx: BuildContext) -> int:
    shape = ctx.info.input_shape
    if len(shape) != 3:
        raise ValueError(
            f"model needs image input (C, H, W), but benchmark {ctx.info.name!r} gives shape {shape}; "
            "use model.name=mlp for flat inputs"
        )
    return shape[0]


LastReLU = Annotated[
    bool,
    Field(
        description="ReLU after the last block; UCIR removes it (false) so that features and cosines can be negative"
    ),
]


@register("model", "mlp")
def build_mlp(
    ctx: BuildContext,
    hidden: Annotated[list[int], Field(description="width of each hidden layer (at least one, each >= 1)")] = [
        256,
        256,
    ],
    dropout: Annotated[float, Field(ge=0, lt=1, description="dropout probability after each hidden layer")] = 0.0,
    multihead: Annotated[
        bool, Field(description="a head per task label (task-incremental benchmarks such as permuted_mnist)")
    ] = False,
) -> IncrementalNet:
    """Multi-layer perceptron on flattened inputs (any benchmark); multihead: a head per task label."""
    if not hidden or min(hidden) < 1:
        raise RecipeError(f"model.options.hidden: give at least one layer, each of width >= 1, got {list(hidden)}")
    backbone = MLP(math.prod(ctx.info.input_shape), list(hidden), dropout)
    if multihead:
        head = MultiHeadClassifier(backbone.out_features, initial_out_features=ctx.info.initial_classes)
        return MultiHeadNet(backbone, backbone.out_features, head)
    return IncrementalNet(backbone, backbone.out_features, linear_head(backbone.out_features, ctx.info.initial_classes))


@register("model", "resnet32")
def build_resnet32(
    ctx: BuildContext,
    last_relu: LastReLU = True,
    blocks: Annotated[
        int,
        Field(ge=1, description="blocks per stage: 5 is ResNet-32; fewer make a cheaper CIFAR ResNet (1: ResNet-8)"),
    ] = 5,
    width: Annotated[
        int, Field(ge=1, description="channels of the first stage (the others: 2x, 4x); 16 is ResNet-32's")
    ] = 16,
) -> IncrementalNet:
    """CIFAR ResNet-32 (3 stages x 5 blocks, 16/32/64 channels, 64-d features); blocks/width shrink it."""
    backbone = ResNet(
        [blocks] * 3, [width, 2 * width, 4 * width], _channels(ctx), small_input=True, last_relu=last_relu
    )
    return IncrementalNet(backbone, backbone.out_features, linear_head(backbone.out_features, ctx.info.initial_classes))


@register("model", "resnet18")
def build_resnet18(
    ctx: BuildContext,
    last_relu: LastReLU = True,
    small_input: Annotated[
        bool | None, Field(description="3x3 stem without max-pool (null: for inputs of 64 px or less)")
    ] = None,
) -> IncrementalNet:
    """ResNet-18 (512-d features); 3x3 stem without max-pool for inputs of 64 px or less."""
    if small_input is None:
        small_input = ctx.info.input_shape[-1] <= 64
    backbone = ResNet([2, 2, 2, 2], [64, 128, 256, 512], _channels(ctx), small_input, last_relu=last_relu)
    return IncrementalNet(backbone, backbone.out_features, linear_head(backbone.out_features, ctx.info.initial_classes))
