"""Where models register (``@register_model``)."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}
#: Rule options a model recommends over the rules' defaults (``TrainConfig`` uses them where a run
#: leaves the option unset), e.g. ``{"beta": 0.1}``.
RECOMMENDED: dict[str, dict[str, Any]] = {}
#: What a run of each model gets where it leaves ``activation`` or ``bias`` unset.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_model(name: str, activation: str = "tanh", bias: bool = False, **recommended: Any):
    """Register a model builder under ``name``: a run that leaves them unset builds it with
    ``activation`` and ``bias``, and takes the rule options it ``recommended``."""
    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        RECOMMENDED[name] = recommended
        RUN_DEFAULTS[name] = dict(activation=activation, bias=bias)
        return fn
    return add
