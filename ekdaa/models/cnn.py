"""Plain ``nn.Sequential`` networks: the paper's CNNs, an MLP, and CIFAR ResNets with BatchNorm and
residual blocks (activation ``tanh`` and no biases unless a run says otherwise)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .registry import register_model


def _activation(name: str) -> nn.Module:
    from . import activation_module
    return activation_module(name)


def _cnn(plan: Sequence[int | str], hidden: Sequence[int], input_shape: Sequence[int],
         num_classes: int, activation: str, bias: bool) -> nn.Sequential:
    """Conv3x3 (padding 1) + activation for each int in ``plan``, 2x2 max-pool for
    each 'M', then fully connected ``hidden`` layers with activations and the output."""
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=bias), _activation(activation)]
            channels = int(item)
    if height < 1 or width < 1:
        raise ValueError(f"input {tuple(input_shape)} is too small for this model's pooling")
    layers.append(nn.Flatten())
    features = channels * height * width
    for width_ in hidden:
        layers += [nn.Linear(features, width_, bias=bias), _activation(activation)]
        features = width_
    layers.append(nn.Linear(features, num_classes, bias=bias))
    return nn.Sequential(*layers)


@register_model("paper-cnn")
def paper_cnn(input_shape: Sequence[int], num_classes: int, activation: str = "tanh",
              bias: bool = False) -> nn.Sequential:
    """The authors' CIFAR-10 network: conv 64, 64, pool, 64, 128, pool, 128, 128, pool, FC 128, FC out."""
    return _cnn([64, 64, "M", 64, 128, "M", 128, 128, "M"], [128], input_shape, num_classes,
                activation, bias)


@register_model("small-cnn")
def small_cnn(input_shape: Sequence[int], num_classes: int, activation: str = "tanh",
              bias: bool = False) -> nn.Sequential:
    """The authors' README example: conv 64, conv 64, pool, FC 128, FC out."""
    return _cnn([64, 64, "M"], [128], input_shape, num_classes, activation, bias)


@register_model("mlp")
def mlp(input_shape: Sequence[int], num_classes: int, activation: str = "tanh", bias: bool = False,
        widths: Sequence[int] = (256, 256)) -> nn.Sequential:
    """Fully connected: Flatten, then Linear + activation per width, then the output."""
    return _cnn([], widths, input_shape, num_classes, activation, bias)


class BasicBlock(nn.Module):
    """The CIFAR ResNet block (He et al., 2016): act(bn(conv(act(bn(conv(x))))) + shortcut(x)),
    3x3 convolutions; the shortcut is the identity, or a strided 1x1 convolution with
    BatchNorm where the shape changes (their option B). Every rule converts it: its children are
    supported modules and its forward only adds the two branches."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), _activation(activation),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = _activation(activation)

    def forward(self, x):
        return self.act(self.branch(x) + self.shortcut(x))


def _resnet(blocks: int, input_shape: Sequence[int], num_classes: int, activation: str,
            bias: bool) -> nn.Sequential:
    """conv3x3 16 + BN + act, three stages of ``blocks`` blocks (16, 32, 64 channels; the second
    and third start with stride 2), global average pool, linear output. Any input of at least 8x8."""
    channels, height, width = input_shape
    if height < 8 or width < 8:
        raise ValueError(f"input {tuple(input_shape)} is too small for a ResNet: it needs at least 8x8")
    layers: list[nn.Module] = [nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                               _activation(activation)]
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
        for i in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if stage and i == 0 else 1, activation))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes, bias=bias)]
    return nn.Sequential(*layers)


@register_model("resnet20")
def resnet20(input_shape: Sequence[int], num_classes: int, activation: str = "relu",
             bias: bool = False) -> nn.Sequential:
    """ResNet-20 for CIFAR (He et al., 2016): 3 stages x 3 blocks, 0.27 M parameters."""
    return _resnet(3, input_shape, num_classes, activation, bias)


@register_model("resnet56")
def resnet56(input_shape: Sequence[int], num_classes: int, activation: str = "relu",
             bias: bool = False) -> nn.Sequential:
    """ResNet-56 for CIFAR (He et al., 2016): 3 stages x 9 blocks, 0.85 M parameters."""
    return _resnet(9, input_shape, num_classes, activation, bias)
