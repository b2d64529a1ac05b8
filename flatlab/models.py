"""Model registry: every model is built from the data set's input shape and class count.

=========  ==========================================================================
``mlp``    fully connected ReLU network on the flattened input; ``hidden=(256, 256)``
``cnn1d``  MNIST-1D's convolutional baseline: 3 strided Conv1d layers + linear
``cnn``    small 2-D conv net: conv-ReLU-maxpool blocks, average pool, linear
``resnet`` CIFAR-style ResNet (He et al. 2016) with BatchNorm; ``depth=6n+2``, ``width``
=========  ==========================================================================

Any other model is ``"package.module:factory"`` (see :mod:`flatlab.factory`): the factory is
called with the user's keyword arguments and ``num_classes``, plus ``input_shape`` when its
signature names that parameter, and must return an ``nn.Module``. So
``torchvision.models:resnet18`` and ``timm:create_model`` (with ``model_name="resnet18"``) work
as they are. Importing the factory's module needs ``trust_code=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatlab.errors import FlatlabError
from flatlab.factory import call_arguments, import_factory, is_factory_name

MODELS: tuple[str, ...] = ("mlp", "cnn1d", "cnn", "resnet")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, /, *,
                trust_code: bool = False, **kwargs: Any) -> nn.Module:
    """Build registry model ``name`` (or ``"package.module:factory"``) for the given data shape.

    A factory's module is imported only with ``trust_code=True`` (the caller's consent);
    registry models never import anything.
    """
    try:
        input_shape = tuple(int(s) for s in input_shape)
        num_classes = int(num_classes)
    except (TypeError, ValueError, OverflowError):
        raise FlatlabError(f"bad data shape for a model: input_shape={input_shape!r}, "
                           f"num_classes={num_classes!r}") from None
    if not input_shape or min(input_shape) < 1 or num_classes < 1:
        raise FlatlabError(f"bad data shape for a model: input_shape={input_shape}, "
                           f"num_classes={num_classes}")
    if is_factory_name(name):
        factory = import_factory(name, what="model", trust_code=trust_code)
    elif name in _FACTORIES:
        factory = _FACTORIES[name]
    else:
        raise FlatlabError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} "
                           f"or 'package.module:factory'")
    arguments = call_arguments(factory, name, kwargs, always={"num_classes": num_classes},
                               if_named={"input_shape": input_shape}, what="model")
    try:
        model = factory(**arguments)
    except FlatlabError:
        raise
    except (TypeError, ValueError, OverflowError, RuntimeError) as err:
        # user input (names, sizes) is the usual cause; timm reports unknown names as RuntimeError
        raise FlatlabError(f"model {name!r} with {kwargs or 'default arguments'}: "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                           ) from None
    if not isinstance(model, nn.Module):
        raise FlatlabError(f"model factory {name!r} returned {type(model).__name__}, "
                           f"not a torch.nn.Module")
    return model


def is_registry_model(name: str) -> bool:
    """True for the built-in names of :data:`MODELS` (building them imports no user code)."""
    return name in _FACTORIES


# --------------------------------------------------------------------------- registry models

def mlp(*, input_shape: tuple[int, ...], num_classes: int,
        hidden: Sequence[int] = (256, 256)) -> nn.Module:
    """Flatten, then Linear-ReLU for each width in ``hidden``, then a linear classifier."""
    widths = [math.prod(input_shape), *(int(h) for h in hidden)]
    if min(widths) < 1:
        raise FlatlabError(f"mlp hidden sizes must be positive, got {list(hidden)}")
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


class ConvNet1d(nn.Module):
    """MNIST-1D's ``ConvBase``: Conv1d(k=5, s=2) then two Conv1d(k=3, s=2), ReLU, linear.

    ``norm="batch"``: each convolution (without bias) is followed by ``BatchNorm1d``, as in
    conv-BN ResNets; ``"none"`` (default) is the original network."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 25,
                 kernel_size: int = 5, norm: str = "none") -> None:
        super().__init__()
        if len(input_shape) not in (1, 2):
            raise FlatlabError(f"cnn1d needs 1-D input (L,) or (C, L), got {input_shape}")
        if norm not in ("none", "batch"):
            raise FlatlabError(f"cnn1d norm must be 'none' or 'batch', got {norm!r}")
        if channels < 1:
            raise FlatlabError(f"cnn1d channels must be positive, got {channels}")
        self.in_channels = 1 if len(input_shape) == 1 else input_shape[0]
        layers: list[nn.Module] = []
        for fan_in, kernel in ((self.in_channels, kernel_size), (channels, 3), (channels, 3)):
            layers.append(nn.Conv1d(fan_in, channels, kernel, stride=2, padding=1,
                                    bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(channels))
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            width = self.features(torch.zeros(1, self.in_channels, input_shape[-1])).shape[1]
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x.reshape(len(x), self.in_channels, -1)))


def cnn1d(*, input_shape: tuple[int, ...], num_classes: int, channels: int = 25,
          kernel_size: int = 5, norm: str = "none") -> nn.Module:
    """MNIST-1D's convolutional baseline (about 94% test accuracy on the standard split);
    ``channels`` is its width, ``norm="batch"`` adds BatchNorm after each convolution."""
    return ConvNet1d(input_shape, num_classes, int(channels), int(kernel_size), str(norm))


def cnn(*, input_shape: tuple[int, ...], num_classes: int,
        channels: Sequence[int] = (32, 64)) -> nn.Module:
    """Conv3x3-ReLU-MaxPool2 per entry of ``channels``, 2x2 average pool, linear classifier.

    Pooling stops halving once the feature map is 2x2, so 8x8 and 32x32 inputs both work.
    """
    if len(input_shape) != 3:
        raise FlatlabError(f"cnn needs image input (C, H, W), got {input_shape}")
    layers: list[nn.Module] = []
    in_ch, size = input_shape[0], min(input_shape[1:])
    for out_ch in (int(c) for c in channels):
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
        if size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(in_ch * 4, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: stem conv, three stages of ``(depth-2)/6`` blocks at width w, 2w, 4w."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int = 20,
                 width: int = 16) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise FlatlabError(f"resnet needs image input (C, H, W), got {input_shape}")
        if depth < 8 or (depth - 2) % 6:
            raise FlatlabError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56), "
                               f"got {depth}")
        if width < 1:
            raise FlatlabError(f"resnet width must be positive, got {width}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages: list[nn.Module] = []
        in_ch = width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(in_ch, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


def resnet(*, input_shape: tuple[int, ...], num_classes: int, depth: int = 20,
           width: int = 16) -> nn.Module:
    """CIFAR-style ResNet-``depth`` with BatchNorm (ResNet-20 with width 16 by default)."""
    return ResNet(input_shape, num_classes, int(depth), int(width))


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp, "cnn1d": cnn1d, "cnn": cnn, "resnet": resnet,
}
