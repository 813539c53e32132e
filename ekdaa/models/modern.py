"""Small networks of this decade's families, for 28-32 px images on a laptop CPU (a few hundred
thousand parameters each), written with the blocks of their namesakes:

* ``mobilenet`` (MobileNetV3-style): inverted residuals with depthwise convolutions, squeeze-excitation
  gates (ReLU, Hardsigmoid) and Hardswish, BatchNorm, linear bottlenecks.
* ``convnext`` (ConvNeXt-style): depthwise 7x7 convolutions, LayerNorm (channels-last, and LayerNorm2d
  between stages), GELU, layer scale (a parameter the block holds).
* ``vit`` (ViT-style): 4x4 patches, a class token and position embedding (parameters the model holds),
  pre-norm encoder blocks with ``nn.MultiheadAttention`` and a GELU MLP.

Every rule trains each of them (README: "What each module does").
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model


def _activation(name: str) -> nn.Module:
    from . import activation_module
    return activation_module(name)


class SqueezeExcite(nn.Module):
    """x times a per-channel gate in (0, 1) computed from x's global average (Hu et al., 2018)."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeezed, 1), nn.ReLU(),
                                  nn.Conv2d(squeezed, channels, 1), nn.Hardsigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class InvertedResidual(nn.Module):
    """1x1 expansion, depthwise 3x3, optional squeeze-excitation, 1x1 linear projection (MobileNetV2/V3);
    the input is added back where the shape allows."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int, se: bool, activation: str):
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), _activation(activation)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   _activation(activation)]
        if se:
            layers.append(SqueezeExcite(hidden, max(8, hidden // 4)))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


#: (input channels, expanded, output channels, stride, squeeze-excitation) per block
_MOBILENET = ((16, 16, 16, 1, True), (16, 64, 24, 2, False), (24, 72, 24, 1, False), (24, 96, 40, 2, True),
              (40, 160, 40, 1, True), (40, 240, 80, 2, True), (80, 320, 80, 1, True))


@register_model("mobilenet", activation="hardswish")
def mobilenet(input_shape: Sequence[int], num_classes: int, activation: str = "hardswish",
              bias: bool = False) -> nn.Sequential:
    """MobileNetV3-style: a 3x3 stem (stride 1, for small images), seven inverted residuals (three of them
    downsampling), a 1x1 head to 256 channels, global pooling, linear output; 0.24 M parameters."""
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                               _activation(activation)]
    layers += [InvertedResidual(*block, activation) for block in _MOBILENET]
    layers += [nn.Conv2d(80, 256, 1, bias=False), nn.BatchNorm2d(256), _activation(activation),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, num_classes, bias=True)]
    return nn.Sequential(*layers)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor, as torchvision's ConvNeXt writes it: permuted
    to channels-last, normalised, permuted back."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm (channels-last), 1x1 expansion by 4 (as nn.Linear), activation, 1x1
    projection, layer scale, residual (Liu et al., 2022)."""

    def __init__(self, dim: int, activation: str, bias: bool, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=bias)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim, bias=bias)
        self.act = _activation(activation)
        self.pwconv2 = nn.Linear(4 * dim, dim, bias=bias)
        self.layer_scale = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.act(self.pwconv1(y))) * self.layer_scale
        return x + y.permute(0, 3, 1, 2)


@register_model("convnext", activation="gelu", bias=True)
def convnext(input_shape: Sequence[int], num_classes: int, activation: str = "gelu", bias: bool = True,
             dims: Sequence[int] = (32, 64, 128), depths: Sequence[int] = (2, 2, 2)) -> nn.Sequential:
    """ConvNeXt-style: a 2x2 stride-2 stem with LayerNorm2d, three stages of ConvNeXt blocks joined by
    LayerNorm2d + 2x2 stride-2 convolutions, global pooling, LayerNorm, linear output; 0.41 M parameters."""
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], dims[0], 2, 2, bias=bias), LayerNorm2d(dims[0])]
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        if i:
            layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2, bias=bias)]
        layers += [ConvNeXtBlock(dim, activation, bias) for _ in range(depth)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], num_classes)]
    return nn.Sequential(*layers)


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=bias), _activation(activation),
                                 nn.Linear(hidden, dim, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patches (a strided convolution), a class token and position embedding, encoder blocks, LayerNorm,
    a linear output on the class token (Dosovitskiy et al., 2021)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch: int, dim: int, depth: int,
                 heads: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        channels, height, width = input_shape
        if height < patch or width < patch:
            raise ValueError(f"input {tuple(input_shape)} is smaller than one {patch}x{patch} patch")
        self.patches = nn.Conv2d(channels, dim, patch, patch, bias=bias)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.empty(1, (height // patch) * (width // patch) + 1, dim).normal_(std=0.02))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, hidden, activation, bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patches(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.position
        return self.head(self.norm(self.blocks(x))[:, 0])


@register_model("vit", activation="gelu", bias=True)
def vit(input_shape: Sequence[int], num_classes: int, activation: str = "gelu", bias: bool = True,
        patch: int = 4, dim: int = 96, depth: int = 4, heads: int = 3, hidden: int = 192) -> VisionTransformer:
    """ViT-style: 4x4 patches (64 tokens and a class token on 32x32 images), 4 encoder blocks of width 96
    with 3 heads and an MLP of 192; 0.31 M parameters."""
    return VisionTransformer(input_shape, num_classes, patch, dim, depth, heads, hidden, activation, bias)
