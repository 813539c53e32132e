"""Models from the field's zoos: ``torchvision:NAME`` (a classification builder of
``torchvision.models``) and ``timm:NAME`` (``timm.create_model``), untrained, with ``num_classes`` set;
grey images go to a 3-channel torchvision stem repeated over its channels. Each is used where its
package is installed; elsewhere the name is a one-line error saying what to install."""
from __future__ import annotations

import importlib
from typing import Any, Sequence

from torch import Tensor, nn

ZOOS = ("torchvision", "timm")


def _three_channels(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: a 1-channel batch repeated over 3 channels."""
    x, *rest = args
    return (x.expand(-1, 3, *x.shape[2:]), *rest) if isinstance(x, Tensor) and x.shape[1] == 1 else args


def zoo_model(name: str, input_shape: Sequence[int], num_classes: int, activation: str | None = None,
              bias: bool | None = None) -> nn.Module:
    source, _, arch = name.partition(":")
    if activation is not None or bias is not None:
        raise ValueError(f"model {name} keeps its own activations and biases: drop activation and bias")
    try:
        package = importlib.import_module(source)
    except Exception as err:  # noqa: BLE001 - not installed, or installed but broken (a mismatched torch)
        raise ValueError(f"model {name} needs {source}, which does not import here ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): pip install {source}") from None
    if source == "timm":
        if arch not in package.list_models():
            raise ValueError(f"timm has no model {arch!r} (timm.list_models() lists them)")
        return package.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=input_shape[0])
    models = importlib.import_module("torchvision.models")
    names = models.list_models(module=models)
    if arch not in names:
        raise ValueError(f"torchvision has no classification model {arch!r}: choose one of {', '.join(names)}")
    options: dict[str, Any] = dict(weights=None, num_classes=num_classes)
    if arch in ("googlenet", "inception_v3"):
        options.update(aux_logits=False, init_weights=True)  # one output, trained from scratch
    model = models.get_model(arch, **options)
    if input_shape[0] == 1:
        model.register_forward_pre_hook(_three_channels)
    return model
