"""Model registry: plain ``nn.Sequential`` networks any rule can convert (CNNs, an MLP,
CIFAR ResNets with BatchNorm and residual blocks).

``build_model(name, input_shape, num_classes, activation=...)``; add a model with
``@register_model("name")`` on a function taking those arguments (``@register_model("name",
beta=0.1)``: rule options the model recommends, used by runs that leave them unset).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from .layers import Sign

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky-relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
    "hardtanh": nn.Hardtanh,
    "sign": Sign,
    "identity": nn.Identity,
}

MODELS: dict[str, Callable[..., nn.Sequential]] = {}
#: Rule options a model recommends over the rules' defaults (``TrainConfig`` uses them where a run
#: leaves the option unset), e.g. ``{"beta": 0.1}``.
RECOMMENDED: dict[str, dict[str, Any]] = {}


def register_model(name: str, **recommended: Any):
    """Register a model builder under ``name``, with the rule options it recommends."""
    def add(fn: Callable[..., nn.Sequential]) -> Callable[..., nn.Sequential]:
        MODELS[name] = fn
        RECOMMENDED[name] = recommended
        return fn
    return add


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


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


# EKDAA's beta: BatchNorm's backward divides the error by sigma (about W's scale) at every layer,
# and Glorot error kernels are larger than these layers' W, so d grows toward the input (ResNet-20
# at initialisation, digits: RMS 0.04 at the top, 2.2 at the bottom; in paper-cnn it stays below
# 0.11) and beta 0.9 drives tanh targets into their flat tails; a small beta compensates by
# compounding. Digits, 5 epochs, tanh, Adam 1e-3, seeds 0-4: beta 0.9 71.6 / 76.3 % (seeds 0, 1),
# 0.3 93.3 % (mean), 0.1 95.1 %, 0.03 about 94 % (seeds 2-4). error_kernel_init "layer-init" keeps d
# flat instead (README, "Feedback scale"), but under Adam it does no better (93.9 % at beta 0.1,
# 91.5 % at 0.9). Under SGD (lr 0.05, momentum 0.9, cosine, ReLU) the error map's size, about
# beta f'(h) d, sets the step: there beta 0.1 gave 80.4 %, beta 0.9 with error_norm "max" 95.6 %
# (seeds 0-2) and beta 0.9 with layer-init kernels 98.1 % (seeds 0-4; bp 98.6 %), which the
# resnet-cpu suite runs beside its other EKDAA rows. The recommendation is for `ekdaa train`'s
# default optimizer, Adam.
_BN_RESNET = dict(beta=0.1)


@register_model("resnet20", **_BN_RESNET)
def resnet20(input_shape: Sequence[int], num_classes: int, activation: str = "relu",
             bias: bool = False) -> nn.Sequential:
    """ResNet-20 for CIFAR (He et al., 2016): 3 stages x 3 blocks, 0.27 M parameters."""
    return _resnet(3, input_shape, num_classes, activation, bias)


@register_model("resnet56", **_BN_RESNET)
def resnet56(input_shape: Sequence[int], num_classes: int, activation: str = "relu",
             bias: bool = False) -> nn.Sequential:
    """ResNet-56 for CIFAR (He et al., 2016): 3 stages x 9 blocks, 0.85 M parameters."""
    return _resnet(9, input_shape, num_classes, activation, bias)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Sequential:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](input_shape, num_classes, **kwargs)
