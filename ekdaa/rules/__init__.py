"""The learning-rule registry: ``RULES[name]`` is a :class:`~ekdaa.rules.base.Rule`
subclass. Adding a rule = one new file in this package + one line below."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers import ADDED

from .base import ConversionError, Option, Rule, backprop, unconvert
from .bp import BP
from .dfa import DirectFeedbackAlignment
from .ekdaa import EKDAA
from .fa import FeedbackAlignment
from .kolen_pollack import KolenPollack
from .last_layer import LastLayer
from .sign_symmetry import SignSymmetry
from .straight_through import StraightThroughBP

RULES: dict[str, type[Rule]] = {
    "bp": BP,
    "bp-ste": StraightThroughBP,
    "fa": FeedbackAlignment,
    "dfa": DirectFeedbackAlignment,
    "sign-symmetry": SignSymmetry,
    "kolen-pollack": KolenPollack,
    "ekdaa": EKDAA,
    "last-layer": LastLayer,
}


def make_rule(rule: str, **options: Any) -> Rule:
    """Instantiate a registered rule, with a clear error for unknown names/options."""
    if rule not in RULES:
        raise ConversionError(f"unknown rule {rule!r}: choose one of {', '.join(RULES)}")
    return RULES[rule](**options)


def convert(model: nn.Module, rule: str = "ekdaa", example_input: Tensor | None = None,
            **options: Any) -> nn.Module:
    """Convert ``model`` *in place* so that ``loss.backward()`` fills every ``.grad``
    with ``rule``'s update; the forward output is unchanged. Returns the model.

    ``options`` are the rule's (e.g. ``beta``, ``gamma`` for ``ekdaa``); ``example_input``
    is one input batch, needed by ``dfa``. Feedback tensors are drawn from torch's
    global RNG: seed it for reproducible conversions. Build the optimizer with
    :func:`param_groups` so learned feedback gets its learning rate.
    """
    return make_rule(rule, **options).convert(model, example_input)


#: Inductor options for converted models: torch 2.13's peak-memory reordering can schedule a max-pool
#: backward's scatter after the kernel that reads it (seen on CPU in a converted sign-symmetry CNN: hidden
#: layers' .grad silently zero; ``benchmarks/compile_check.py`` shows it with these options left out).
COMPILE_OPTIONS: dict[str, Any] = {"reorder_for_peak_memory": False}


def compile(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``torch.compile(model, **kwargs)``, with :data:`COMPILE_OPTIONS` for the Inductor backend (a
    ``mode`` is passed as the options it stands for). A converted model compiles to one graph under
    every rule (a routed module, whose own forward applies weights or activations as functions, runs
    eagerly inside it); its ``.grad`` match eager."""
    if kwargs.get("backend", "inductor") == "inductor":
        mode = kwargs.pop("mode", None)
        modes = torch._inductor.list_mode_options(mode) if mode else {}
        kwargs["options"] = {**modes, **COMPILE_OPTIONS, **kwargs.get("options", {})}
    return torch.compile(model, **kwargs)


def param_groups(model: nn.Module, lr: float, **group_options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a converted model.

    Learned feedback tensors (EKDAA's error kernels, Kolen-Pollack's B) get the
    learning rate ``lr * rule.feedback_lr_scale`` (gamma for EKDAA, 1 for KP); every
    other parameter gets ``lr``. ``group_options`` (e.g. ``weight_decay``) apply to
    all groups. Use as ``torch.optim.SGD(ekdaa.param_groups(model, lr=0.01), lr=0.01)``.
    """
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper
    rule = getattr(model, "ekdaa_rule", None)
    feedback = _learned_feedback(model, rule)
    ids = {id(p) for p in feedback}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [dict(params=rest, lr=lr, **group_options)]
    if feedback:
        groups.append(dict(params=feedback, lr=lr * rule.feedback_lr_scale, **group_options))
    return groups


def _learned_feedback(model: nn.Module, rule: Rule | None) -> list[nn.Parameter]:
    """The parameters the rule added to the model (learned feedback: EKDAA's error kernels, KP's B)."""
    if rule is None:
        return []
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name in module.__dict__.get(ADDED, ()):
            p = module._parameters.get(name)
            if p is not None:
                seen[id(p)] = p
    return list(seen.values())


__all__ = ["COMPILE_OPTIONS", "RULES", "Option", "Rule", "ConversionError", "backprop", "compile", "convert",
           "make_rule", "param_groups", "unconvert"]
