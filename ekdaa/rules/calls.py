"""Activations applied as functions (``F.relu(x)``, ``torch.tanh(x)``, ``x.sigmoid_()``) inside a
module's own ``forward``.

A rule converts activation *modules* (EKDAA's error map, DFA's hub, bp-ste's straight-through
sign); one applied as a function stays plain autograd, so under such a rule the network would train
by another rule at that point, silently. :func:`activation_calls` finds them before conversion: on the
example input, one forward under a :class:`~torch.overrides.TorchFunctionMode` that sees every
torch function and Tensor method, with the module that applied it; without an example input, from
an FX trace of each module's own forward (its submodules left as calls).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from ..layers import ACTIVATIONS, FEEDBACK_CLASSES, NORMS, PASSTHROUGH

#: (module path, module, call name)
Call = tuple[str, nn.Module, str]

#: Elementwise nonlinearities, by the name their functional, torch and Tensor-method forms share
#: (an in-place form's trailing underscore dropped).
ACTIVATION_CALLS = frozenset({
    "relu", "relu6", "tanh", "sigmoid", "hardtanh", "leaky_relu", "gelu", "silu", "mish", "elu", "selu",
    "celu", "softplus", "hardswish", "hardsigmoid", "sign", "clamp", "clamp_min", "clamp_max", "clip",
    "threshold", "prelu", "rrelu", "logsigmoid", "softsign", "tanhshrink", "hardshrink", "softshrink"})

#: The module form of each call that has one.
MODULE_FORM = {"relu": "nn.ReLU()", "relu6": "nn.ReLU6()", "tanh": "nn.Tanh()", "sigmoid": "nn.Sigmoid()",
               "hardtanh": "nn.Hardtanh()", "leaky_relu": "nn.LeakyReLU()", "sign": "ekdaa.Sign()",
               "clamp": "nn.Hardtanh(min, max) or nn.ReLU()", "clamp_min": "nn.ReLU()", "clip": "nn.Hardtanh(min, max)"}

#: Module types a rule handles itself (or refuses): a call inside one of them is its business.
_KNOWN = (*FEEDBACK_CLASSES, *ACTIVATIONS, *PASSTHROUGH, *NORMS)


def call_name(func: Any) -> str | None:
    """The activation a torch function, Tensor method or method name applies, else None."""
    name = func if isinstance(func, str) else getattr(func, "__name__", "")
    name = name.rstrip("_") if name and not name.startswith("_") else name
    return name if name in ACTIVATION_CALLS else None


def _checked(module: nn.Module) -> bool:
    """Whether calls in ``module``'s own forward are a rule's concern: not a module type it
    converts or refuses by itself, and not one of torch's own (which a rule refuses by type)."""
    return type(module) not in _KNOWN and not type(module).__module__.startswith("torch.")


class _Watch(TorchFunctionMode):
    """Notes each activation call made while a checked module is the innermost running."""

    def __init__(self, stack: list[tuple[str, nn.Module]], found: list[Call]):
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = call_name(func)
        if name and self.stack and _checked(self.stack[-1][1]):
            self.found.append((*self.stack[-1], name))
        return func(*args, **(kwargs or {}))


def _run(model: nn.Module, example_input: Tensor) -> list[Call]:
    """Activation calls of one eval-mode forward of ``example_input``, with the module applying each."""
    stack: list[tuple[str, nn.Module]] = []
    found: list[Call] = []
    def enter(module: nn.Module, args: Any, path: str) -> None:
        stack.append((path, module))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    hooks = []
    for path, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(lambda m, a, p=path: enter(m, a, p)))
        hooks.append(module.register_forward_hook(leave))
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), _Watch(stack, found):
            model.eval()(example_input)  # eval: a BatchNorm's running statistics stay as they are
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.train(training)
    return found


class _OwnForward(fx.Tracer):
    """Traces one module's own forward: every submodule stays a call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _trace(model: nn.Module) -> tuple[list[Call], list[Call]]:
    """Activation calls read from each checked module's FX-traced forward, and the modules that
    could not be traced (with why)."""
    found, untraced = [], []
    for path, module in model.named_modules():
        if not _checked(module) or type(module).forward in (nn.Sequential.forward, nn.Module.forward):
            continue
        try:
            graph = _OwnForward().trace(module)
        except Exception as err:  # noqa: BLE001 - any failure means: not readable this way
            untraced.append((path, module, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
            continue
        for node in graph.nodes:
            name = call_name(node.target) if node.op in ("call_function", "call_method") else None
            if name:
                found.append((path, module, name))
    return found, untraced


def activation_calls(model: nn.Module, example_input: Tensor | None) -> tuple[list[Call], list[Call]]:
    """Activations applied as functions in ``model``'s modules' own forwards, as (module path,
    module, call name); and, without ``example_input``, the modules whose forward FX could not
    trace (with why, in place of the name)."""
    return (_run(model, example_input), []) if example_input is not None else _trace(model)
