"""What every learning rule shares: walking a model, refusing what it cannot train,
and attaching feedback tensors to weight layers.

A rule subclasses :class:`Rule` and overrides only the hooks it needs:

* ``convert_weight(path, layer)``: usually ``self.attach_feedback(layer, ...)``;
* ``convert_activation(path, module)`` / ``convert_pool(path, module)``: return a
  replacement module (default: the module itself, i.e. plain autograd);
* ``feedback(layer)``: the tensor the error is sent down through (default: the
  tensor attached under ``feedback_name``);
* ``layer_output(layer, h)``: a last look at a converted layer's output (DFA's hub);
* ``unconvert(model)``: undo what ``convert`` did to the model itself (hooks, frozen parameters).

A module a rule puts in place of another (or turns into) has ``unconverted()``, which returns the
plain module again: :func:`unconvert` walks the model with it.

A rule's options are declared once, in ``OPTIONS``: ``Rule.__init__`` checks and sets
them, and ``TrainConfig``, ``ekdaa train``'s flags and the suites take them from there.
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..layers import (ACTIVATIONS, FEEDBACK_CLASSES, INVERSE_STD_NORMS, NORMS, PASSTHROUGH, Sign, conv_args,
                      glorot_like, glorot_std, layer_init_like, layer_init_std, matched_like, weight_rms)
from .calls import ACTIVATION_CALLS, MODULE_FORM, activation_calls


class ConversionError(ValueError):
    """A model (or option) a rule cannot handle; the message names the module path."""


@dataclass(frozen=True)
class Option:
    """One option of a rule: its default (which fixes its type), what it does, its allowed
    values (``choices``, or a number above ``above``, or at least ``at_least``), and whether
    ``ekdaa train`` offers it (``train=False``: for users who write their own loop)."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    above: float | None = None
    at_least: float | None = None
    train: bool = True

    def check(self, value: Any) -> Any:
        """``value`` as this option's type, or a ConversionError saying what is allowed."""
        kind = type(self.default)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ConversionError(f"option {self.name} = {value!r} should be a {kind.__name__}, "
                                  f"like its default {self.default!r}")
        value = kind(value)
        if self.choices is not None and value not in self.choices:
            raise ConversionError(f"invalid {self.name} {value!r}: choose one of "
                                  f"{', '.join(map(str, self.choices))}")
        if self.above is not None and not value > self.above:
            raise ConversionError(f"{self.name} must be > {self.above:g}, got {value}")
        if self.at_least is not None and not value >= self.at_least:
            raise ConversionError(f"{self.name} must be >= {self.at_least:g}, got {value}")
        return value


#: The option of the rules that avoid weight transport (not bp), for what crosses a BatchNorm.
NORM_BACKWARD = Option(
    "norm_backward", "autograd", "through BatchNorm: autograd: its own backward (the error scaled per channel "
    "by gamma/sigma, with the batch-statistics terms: a small weight transport); inverse-std: divided by "
    "sigma only", choices=("autograd", "inverse-std"))

#: The option of the rules with a random feedback tensor (fa, kolen-pollack; sign-symmetry's scale).
FEEDBACK_INIT = Option(
    "feedback_init", "glorot", "glorot: Glorot-uniform, independent of W; layer-init: a fresh draw of the layer's "
    "own initialiser (nn.Conv2d/nn.Linear's default), independent of W but on its initial scale (through "
    "BatchNorm, which divides by about W's scale, Glorot feedback amplifies the error at every layer); matched: "
    "uniform with W's own RMS at conversion, independent of W's values (a model with its own initialisation, "
    "e.g. Kaiming's, gets feedback on that scale)", choices=("glorot", "layer-init", "matched"))

#: How each ``feedback_init`` (and EKDAA's ``error_kernel_init``, whose Glorot draw is called ``random``)
#: draws a feedback tensor like W, and the standard deviation of that draw (sign symmetry's scale).
FEEDBACK_DRAWS = {"glorot": glorot_like, "random": glorot_like, "layer-init": layer_init_like,
                  "matched": matched_like}
FEEDBACK_STDS = {"glorot": glorot_std, "layer-init": layer_init_std, "matched": weight_rms}


def random_feedback(layer: nn.Module, init: str) -> Tensor:
    """A feedback tensor of ``layer.weight``'s shape, independent of W's values, drawn as ``init``
    says (a key of :data:`FEEDBACK_DRAWS`)."""
    return FEEDBACK_DRAWS[init](layer.weight.detach())


def _outside_package() -> int:
    """The ``stacklevel`` of the innermost caller outside this package, for a warning raised by
    the function that calls this one."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "ekdaa":
        frame, level = frame.f_back, level + 1
    return level


class Rule:
    """A learning rule: a choice of backward pass for an ordinary model."""

    name: ClassVar[str]
    #: state_dict name of the tensor the error travels down through
    feedback_name: ClassVar[str] = "feedback"
    #: True if the rule evaluates f'(h) at every activation, Sign's included (then Sign cannot train)
    uses_derivative: ClassVar[bool] = True
    #: True if the rule can train any module through plain autograd (bp)
    accepts_any_module: ClassVar[bool] = False
    #: learning-rate multiplier of learned feedback tensors (see ekdaa.param_groups)
    feedback_lr_scale: float = 1.0
    #: the rule's options (keyword arguments of ``ekdaa.convert``), each set as an attribute
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    #: options whose defaults were chosen on networks without BatchNorm: converting one with BatchNorm
    #: while any of them is left unset warns, with ``batchnorm_advice``
    batchnorm_choices: ClassVar[tuple[str, ...]] = ()
    batchnorm_advice: ClassVar[str] = ""
    #: the option choosing how a random feedback tensor is drawn (``feedback_init``), if the rule has one
    init_option: ClassVar[str | None] = None
    #: activations that, applied as functions in a forward (``F.relu(x)``), would train otherwise than this
    #: rule says: refused at conversion (sign: its derivative is 0, as for the Sign module)
    refused_calls: ClassVar[frozenset[str]] = frozenset({"sign"})

    def __init__(self, **options: Any):
        known = {o.name: o for o in self.OPTIONS}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConversionError(f"rule {self.name!r} does not take options {unknown}: its options are "
                                  f"{', '.join(known) or 'none'}")
        for name, option in known.items():
            setattr(self, name, option.check(options.get(name, option.default)))
        self.given = frozenset(options)

    def options(self) -> dict[str, Any]:
        """The rule's options, as passed to ``ekdaa.convert``."""
        return {o.name: getattr(self, o.name) for o in self.OPTIONS}

    def batchnorm_defaults(self) -> dict[str, Any]:
        """This rule's values of ``batchnorm_choices``, to pass explicitly to ``ekdaa.convert``."""
        return {name: getattr(self, name) for name in self.batchnorm_choices}

    # -- hooks ---------------------------------------------------------------
    def prepare(self, model: nn.Module, example_input: Tensor | None) -> None:
        """Called once before conversion (DFA uses it to trace the model)."""

    def convert_weight(self, path: str, layer: nn.Module) -> None:
        pass

    def convert_activation(self, path: str, module: nn.Module) -> nn.Module:
        return module

    def convert_pool(self, path: str, module: nn.Module) -> nn.Module:
        return module

    def feedback(self, layer: nn.Module) -> Tensor | None:
        return getattr(layer, self.feedback_name)

    def layer_output(self, layer: nn.Module, h: Tensor) -> Tensor:
        return h

    def unconvert(self, model: nn.Module) -> None:
        """Called on the plain copy :func:`unconvert` makes, after its modules are plain again."""

    # -- machinery -----------------------------------------------------------
    def attach_feedback(self, layer: nn.Module, tensor: Tensor | None, learned: bool | None) -> None:
        """Turn ``layer`` into its Feedback* class in place and register ``tensor``:
        as a buffer if ``learned is None`` (fixed), else as a Parameter whose
        requires_grad is ``learned``."""
        if isinstance(layer, nn.Conv2d):
            layer.conv_args = conv_args(layer)
        layer.__class__ = FEEDBACK_CLASSES[type(layer)]
        layer.rule = self
        if tensor is None:
            return
        if learned is None:
            layer.register_buffer(self.feedback_name, tensor)
        else:
            layer.register_parameter(self.feedback_name, nn.Parameter(tensor, requires_grad=learned))

    def convert(self, model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
        if getattr(model, "ekdaa_rule", None) is not None:
            raise ConversionError(
                f"model is already converted to rule {model.ekdaa_rule.name!r}; "
                "convert a fresh copy of the original model instead")
        unset = [name for name in self.batchnorm_choices if name not in self.given]
        if unset and any(type(m) in NORMS for m in model.modules()):
            warnings.warn(f"{self.name}: this network has BatchNorm, and the defaults of {', '.join(unset)} were "
                          f"chosen without it: {self.batchnorm_advice}; pass {', '.join(unset)} explicitly (the "
                          "defaults included) to silence this", stacklevel=_outside_package())
        self.check_calls(model, example_input)
        self.prepare(model, example_input)
        model = self._convert(model, "")
        model.ekdaa_rule = self
        return model

    def check_calls(self, model: nn.Module, example_input: Tensor | None) -> None:
        """Refuses a model whose modules apply, as a function, an activation in ``refused_calls``
        (found on ``example_input``, else in an FX trace of each module's forward)."""
        if not self.refused_calls:
            return
        found, untraced = activation_calls(model, example_input)
        found = [call for call in found if call[2] in self.refused_calls]
        if found:
            path, module, name = found[0]
            more = len({(p, n) for p, _, n in found}) - 1
            if name == "sign" and self.uses_derivative:
                why = (f"sign's derivative is 0 almost everywhere, so under rule {self.name!r} nothing below it "
                       "would learn; use rule 'ekdaa' or 'bp-ste' with the module ekdaa.Sign()")
            else:
                form = MODULE_FORM.get(name)
                why = (f"rule {self.name!r} treats activations its own way only as modules, so this one would "
                       "silently train by autograd's derivative instead; "
                       + (f"use the module form, {form}, one instance per use" if form else
                          f"{name} has no module form this rule trains: use one of "
                          f"{', '.join(t.__name__ for t in ACTIVATIONS)}"))
            raise ConversionError(f"module '{path or '<root>'}' ({type(module).__name__}) applies {name} as a "
                                  f"function in its forward{f' (and {more} more such calls)' if more else ''}: {why}")
        if untraced:
            path, module, why = untraced[0]
            message = (f"rule {self.name!r}: could not read the forward of module '{path or '<root>'}' "
                       f"({type(module).__name__}) to check it for activations applied as functions ({why}); "
                       "pass example_input= (one batch) to ekdaa.convert so the check runs on it")
            if self.refused_calls >= ACTIVATION_CALLS:
                raise ConversionError(message)
            warnings.warn(message, stacklevel=_outside_package())

    def _convert(self, module: nn.Module, path: str) -> nn.Module:
        where = path or "<root>"
        kind = type(module)
        if kind in FEEDBACK_CLASSES:
            if kind is nn.Conv2d and (module.groups != 1 or module.padding_mode != "zeros"):
                raise ConversionError(f"rule {self.name!r}: Conv2d at '{where}' needs groups=1 and "
                                      "padding_mode='zeros'")
            self.convert_weight(path, module)
            return module
        if kind in ACTIVATIONS:
            if kind is Sign and self.uses_derivative:
                raise ConversionError(
                    f"rule {self.name!r} uses the activation derivative, and Sign at '{where}' has "
                    "derivative 0 almost everywhere: nothing below it would learn; use rule 'ekdaa'")
            return self.convert_activation(path, module)
        if kind in PASSTHROUGH:
            return self.convert_pool(path, module)
        if kind in NORMS:
            if getattr(self, "norm_backward", "autograd") == "inverse-std":
                module.__class__ = INVERSE_STD_NORMS[kind]  # in place: parameter names stay
            return module
        children = list(module.named_children())
        own = [n for n, p in module.named_parameters(recurse=False)]
        if not self.accepts_any_module:
            if own:
                raise ConversionError(
                    f"rule {self.name!r} cannot train module '{where}' ({kind.__name__}): it holds "
                    f"parameters {own} itself; build the model from nn.Conv2d/nn.Linear layers")
            if not children and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                raise ConversionError(
                    f"rule {self.name!r} cannot handle module '{where}' ({kind.__name__}); supported: "
                    f"Conv2d, Linear, {', '.join(t.__name__ for t in ACTIVATIONS + PASSTHROUGH + NORMS)} "
                    "and modules whose children are these (e.g. a residual block adding two branches)")
        for name, child in children:
            new = self._convert(child, f"{path}.{name}" if path else name)
            if new is not child:
                setattr(module, name, new)
        return module


def unconvert(model: nn.Module) -> nn.Module:
    """A plain PyTorch copy of a converted ``model`` (a DistributedDataParallel or compiled one
    included): the same modules as before conversion, with the trained W, b and normalisation
    state, feedback tensors dropped, so its ``state_dict`` loads into the original class. The
    converted model is left as it is."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # torch.compile
    rule = getattr(model, "ekdaa_rule", None)
    if rule is None:
        raise ConversionError("unconvert: the model is not converted (ekdaa.convert gives one)")
    plain = copy.deepcopy(model)
    del plain.ekdaa_rule
    plain = _unconverted(plain)
    rule.unconvert(plain)
    return plain


def _unconverted(module: nn.Module) -> nn.Module:
    for name, child in list(module.named_children()):
        new = _unconverted(child)
        if new is not child:
            setattr(module, name, new)
    return module.unconverted() if hasattr(module, "unconverted") else module


class RandomFeedbackRule(Rule):
    """A rule that sends the error down through a feedback tensor drawn at random (or whose scale
    is), as its option ``feedback_init`` says: fa, kolen-pollack, sign-symmetry."""

    OPTIONS = (NORM_BACKWARD, FEEDBACK_INIT)
    batchnorm_choices = (FEEDBACK_INIT.name,)
    batchnorm_advice = ("through every norm Glorot feedback amplifies the error (README: \"Feedback scale\"); "
                        "'matched' keeps it on W's own scale whatever W's initialiser ('layer-init': on nn.Conv2d's "
                        "default scale)")
    init_option = FEEDBACK_INIT.name
