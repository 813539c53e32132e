"""Model registry: ``build_model(name, input_shape, num_classes, activation=..., bias=...)``.

* ``cnn``: the paper's CNNs, an MLP, CIFAR ResNets with BatchNorm and residual blocks;
* ``modern``: small networks of this decade's families (a MobileNetV3-, a ConvNeXt- and a ViT-style);
* ``torchvision:NAME`` / ``timm:NAME``: the field's zoos, when the package is installed (``zoo``).

Add a model with ``@register_model("name")`` on a function taking those arguments
(``@register_model("name", activation="gelu", bias=True, beta=0.1)``: what a run that leaves them unset
builds it with, and rule options the model recommends, used by runs that leave them unset).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from ..layers import IdentityActivation, Sign
from .registry import MODELS, RECOMMENDED, RUN_DEFAULTS, register_model

#: The activations a registered model may be built with, by name.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "leaky-relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "hardtanh": nn.Hardtanh,
    "sign": Sign, "identity": IdentityActivation, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish,
    "elu": nn.ELU, "mish": nn.Mish}

from . import cnn, modern  # noqa: E402,F401  (they register their models)
from .zoo import ZOOS, zoo_model  # noqa: E402


def is_zoo(name: str) -> bool:
    return name.partition(":")[0] in ZOOS and ":" in name


def model_defaults(name: str) -> dict[str, Any]:
    """What a run of model ``name`` gets where it leaves ``activation`` or ``bias`` unset (None: the
    model's own, as a zoo's models have)."""
    return RUN_DEFAULTS.get(name, dict(activation=None, bias=None))


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    if is_zoo(name):
        return zoo_model(name, input_shape, num_classes, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}, or torchvision:NAME / "
                         "timm:NAME")
    return MODELS[name](input_shape, num_classes, **kwargs)


def activation_module(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


__all__ = ["ACTIVATIONS", "MODELS", "RECOMMENDED", "activation_module", "build_model", "is_zoo", "model_defaults",
           "register_model"]
