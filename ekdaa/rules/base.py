"""What every learning rule shares: walking a model, routing the calls its modules' own forwards
make, and attaching feedback tensors to weights.

A rule subclasses :class:`Rule` and overrides only the hooks it needs:

* ``convert_weight(path, module, name)``: usually ``self.attach_feedback(module, name, ...)`` for the
  parameter ``name`` (a weight layer's ``weight``, or one a module applies as a weight itself);
* ``convert_activation(path, module)`` / ``convert_pool(path, module)``: return a
  replacement module (default: the module itself, i.e. plain autograd);
* ``feedback(module, name)``: the tensor the error is sent down through instead of that parameter
  (default: the tensor attached for it);
* ``layer_input(layer, x)`` / ``layer_output(layer, h)``: a look at a weight's input and output (DFA);
* ``unconvert(model)``: undo what ``convert`` did to the model itself (hooks, frozen parameters).

What each kind of module does under each rule (README: "What each module does"): weight layers and
weights applied as functions send the error down through the rule's feedback; activations (modules,
or functions routed to a module made for them, rules/calls.py) are the rule's business; everything
else (norms by default, residual sums, products of activations such as attention's, parameters a
module holds, pooling, reshapes) passes the error on as autograd does, and its parameters learn from
the error that reaches them.

A module a rule puts in place of another (or turns into) has ``unconverted()``, which returns the
plain module again: :func:`unconvert` walks the model with it.

A rule's options are declared once, in ``OPTIONS``: ``Rule.__init__`` checks and sets
them, and ``TrainConfig``, ``ekdaa train``'s flags and the suites take them from there.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..layers import (WEIGHT_LAYERS, Sign, add_to, subclass_for, glorot_like, glorot_std, is_activation, is_feedback_layer,
                      is_norm, is_weight_layer, layer_init_like, layer_init_std, matched_like, to_feedback_layer,
                      weight_rms)
from .calls import ACTIVATION_CALLS, Called, Call, Discovery, Router, Table, discover, route, tensor_arguments


class ConversionError(ValueError):
    """A model (or option) a rule cannot handle; the message names the module path."""


@dataclass(frozen=True)
class Option:
    """One option (of a rule, or a field of ``TrainConfig``): its default (which fixes its type, where
    it is not None), what it does, its allowed values (``choices``, a tuple or a function giving one, or
    a number above ``above``, or at least ``at_least``), and whether ``ekdaa train`` offers a rule's
    option (``train=False``: for users who write their own loop)."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | Callable[[], Any] | None = None
    above: float | None = None
    at_least: float | None = None
    train: bool = True

    def refusal(self, value: Any, name: str | None = None) -> str | None:
        """What is wrong with ``value`` (its choices, its bounds; not its type), or None."""
        name = name or self.name
        choices = self.choices() if callable(self.choices) else self.choices
        if choices is not None and value not in choices:
            return f"invalid {name} {value!r}: choose one of {', '.join(map(str, choices))}"
        if self.above is not None and not value > self.above:
            return f"{name} must be > {self.above:g}, got {value}"
        if self.at_least is not None and not value >= self.at_least:
            return f"{name} must be >= {self.at_least:g}, got {value}"
        return None

    def check(self, value: Any) -> Any:
        """``value`` as this option's type, or a ConversionError saying what is allowed."""
        kind = type(self.default)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ConversionError(f"option {self.name} = {value!r} should be a {kind.__name__}, "
                                  f"like its default {self.default!r}")
        value = kind(value)
        refusal = self.refusal(value)
        if refusal:
            raise ConversionError(refusal)
        return value


#: The option of the rules that avoid weight transport (not bp), for what crosses a normalisation layer.
NORM_BACKWARD = Option(
    "norm_backward", "autograd", "through BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm: autograd: "
    "their own backward (the error scaled by gamma/sigma, with the statistics' terms: a small, per-channel "
    "weight transport); inverse-std: divided by sigma only", choices=("autograd", "inverse-std"))

#: The option of the rules with a random feedback tensor (fa, kolen-pollack; sign-symmetry's scale).
FEEDBACK_INIT = Option(
    "feedback_init", "auto", "auto: matched in a network with normalisation layers, glorot in one without; "
    "glorot: Glorot-uniform, independent of W; layer-init: a fresh draw of the layer's own initialiser "
    "(nn.Conv2d/nn.Linear's default), independent of W but on its initial scale; matched: uniform with W's own "
    "RMS at conversion, independent of W's values (through a norm, which divides by about W's scale, Glorot "
    "feedback amplifies the error at every layer; W's own scale keeps it as backprop's, whatever W's "
    "initialiser)", choices=("auto", "glorot", "layer-init", "matched"))

#: How each ``feedback_init`` (and EKDAA's ``error_kernel_init``, whose Glorot draw is called ``random``)
#: draws a feedback tensor like W, and the standard deviation of that draw (sign symmetry's scale).
FEEDBACK_DRAWS = {"glorot": glorot_like, "random": glorot_like, "layer-init": layer_init_like,
                  "matched": matched_like}
FEEDBACK_STDS = {"glorot": glorot_std, "layer-init": layer_init_std, "matched": weight_rms}


def random_feedback(weight: Tensor, init: str) -> Tensor:
    """A feedback tensor of ``weight``'s shape, independent of W's values, drawn as ``init``
    says (a key of :data:`FEEDBACK_DRAWS`)."""
    return FEEDBACK_DRAWS[init](weight.detach())


def feedback_attribute(param: str, kind: str) -> str:
    """Where a rule keeps its ``kind`` of tensor (e.g. ``error_kernel``) for a module's parameter ``param``:
    ``kind`` itself for a weight layer's ``weight``, ``in_proj_error_kernel`` for ``in_proj_weight``."""
    return param[:-len("weight")] + kind if param.endswith("weight") else f"{param}_{kind}"


def _outside_package() -> int:
    """The ``stacklevel`` of the innermost caller outside this package, for a warning raised by
    the function that calls this one."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "ekdaa":
        frame, level = frame.f_back, level + 1
    return level


def _where(path: str) -> str:
    return path or "<root>"


class Rule:
    """A learning rule: a choice of backward pass for an ordinary model."""

    name: ClassVar[str]
    #: state_dict name of the tensor the error travels down through, and what figures call it
    feedback_name: ClassVar[str] = "feedback"
    feedback_label: ClassVar[str] = "feedback B"
    #: True if the rule evaluates f'(h) at every activation, Sign's included (then Sign cannot train)
    uses_derivative: ClassVar[bool] = True
    #: activations applied as functions that the rule treats as their module form (routed to a module made
    #: for each call, rules/calls.py); the rules that use autograd's derivative at activations route none
    routed_activations: ClassVar[frozenset[str]] = frozenset()
    #: whether weights applied as functions (F.linear(x, self.W)) send the error through the rule's feedback;
    #: False for the rules that send it through W (bp) or nowhere below the output (last-layer)
    routes_weights: ClassVar[bool] = True
    #: learning-rate multiplier of learned feedback tensors (see ekdaa.param_groups)
    feedback_lr_scale: float = 1.0
    #: the rule's options (keyword arguments of ``ekdaa.convert``), each set as an attribute
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    #: the option choosing how a random feedback tensor is drawn (``feedback_init``), if the rule has one,
    #: and what its ``auto`` means in a network without normalisation layers
    init_option: ClassVar[str | None] = None
    glorot: ClassVar[str] = "glorot"

    #: True while the converted model runs as the plain model, with backprop's gradients (:func:`backprop`)
    plain: bool = False

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

    # -- hooks ---------------------------------------------------------------
    def prepare(self, model: nn.Module, discovery: Discovery) -> None:
        """Called once before conversion with what :func:`~ekdaa.rules.calls.discover` found (DFA reads
        the example forward's graph)."""

    def convert_weight(self, path: str, module: nn.Module, name: str = "weight") -> None:
        pass

    def convert_activation(self, path: str, module: nn.Module) -> nn.Module:
        return module

    def convert_pool(self, path: str, module: nn.Module) -> nn.Module:
        return module

    def feedback(self, module: nn.Module, name: str = "weight") -> Tensor | None:
        return getattr(module, feedback_attribute(name, self.feedback_name))

    def layer_input(self, layer: Any, x: Tensor) -> Tensor:
        """A weight's input, before the product (``layer``: the weight layer, or (module, k) for the
        k-th weight call of a module's own forward)."""
        return x

    def layer_output(self, layer: Any, h: Tensor) -> Tensor:
        """A weight's output h = W x + b, as it leaves (``layer`` as in :meth:`layer_input`)."""
        return h

    def start_forward(self, args: tuple) -> None:
        """Called by the converted model's forward pre-hook, where the rule asks for one (``wants_start``)."""

    def unconvert(self, model: nn.Module) -> None:
        """Called on the plain copy :func:`unconvert` makes, after its modules are plain again."""

    # -- machinery -----------------------------------------------------------
    def attach_feedback(self, module: nn.Module, name: str, tensor: Tensor | None, learned: bool | None) -> None:
        """Give ``module``'s parameter ``name`` a feedback tensor: a weight layer's ``weight`` turns the
        layer into its feedback class in place. ``tensor`` is registered (under
        :func:`feedback_attribute`) as a buffer if ``learned is None`` (fixed), else as a Parameter whose
        requires_grad is ``learned``; None registers nothing (the rule computes or skips it)."""
        if name == "weight" and is_weight_layer(module):
            to_feedback_layer(module, self)
        if tensor is not None:
            add_to(module, feedback_attribute(name, self.feedback_name), tensor, learned)

    def convert(self, model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
        if getattr(model, "ekdaa_rule", None) is not None:
            raise ConversionError(
                f"model is already converted to rule {model.ekdaa_rule.name!r}; "
                "convert a fresh copy of the original model instead")
        if self.init_option and getattr(self, self.init_option) == "auto":  # fixed here, for this model
            setattr(self, self.init_option, "matched" if any(is_norm(m) for m in model.modules()) else self.glorot)
        discovery = discover(model, example_input)
        self.check_calls(discovery)
        self.prepare(model, discovery)
        model = self._convert(model, "")
        self.router = Router(self)
        paths = {m: p for p, m in model.named_modules()}
        for owner, calls in discovery.own_calls().items():
            self._route(owner, paths[owner], calls)
        model.ekdaa_rule = self
        if self.wants_start():
            model.register_forward_pre_hook(_start_forward)
        model.__class__ = subclass_for(_Converted, type(model), "Converted", _CONVERTED_CLASSES, __name__)
        return model

    def wants_start(self) -> bool:
        """Whether the converted model's forward pre-hook should call :meth:`start_forward`."""
        return False

    def check_calls(self, discovery: Discovery) -> None:
        """Refuses what the model's modules apply as functions that this rule cannot train as it says:
        a parameter used as a matrix outside F.linear/F.convNd (weight transport), an activation with
        tensor arguments (no module form), a sign under a rule that uses the derivative (it is 0)."""
        for call in discovery.calls:
            if call.module_form:
                continue
            if call.kind == "transport" and self.routes_weights:
                raise ConversionError(
                    f"{call.where} applies {call.name} to its parameter '{call.weight[2]}': that sends the error "
                    f"down through it (weight transport), which rule {self.name!r} replaces only for weights "
                    "applied by F.linear/F.conv1d/2d/3d (or nn.Linear/nn.ConvNd): write it so, or use rule 'bp'")
            if call.kind == "weight" and call.weight is None and self.routes_weights and not (
                    isinstance(call.owner, WEIGHT_LAYERS) and not is_weight_layer(call.owner)):
                raise ConversionError(
                    f"{call.where} applies {call.name} with a weight it computes: rule {self.name!r} needs the "
                    "weight to be a parameter (or a view of one) to give it feedback; use rule 'bp'")
            if call.kind != "activation":
                continue
            if call.name == "sign" and self.uses_derivative:
                raise ConversionError(
                    f"{call.where} applies sign as a function in its forward: sign's derivative is 0 almost "
                    f"everywhere, so under rule {self.name!r} nothing below it would learn; use rule 'ekdaa' or "
                    "'bp-ste'")
            if call.name in self.routed_activations and tensor_arguments(call):
                raise ConversionError(
                    f"{call.where} applies {call.name} with a tensor argument as a function in its forward: rule "
                    f"{self.name!r} treats activations its own way, and this one has no module form it can make; "
                    f"use an activation module ({'nn.PReLU()' if call.name == 'prelu' else 'e.g. nn.Hardtanh'})")
        if discovery.untraced:
            path, module, why = discovery.untraced[0]
            message = (f"rule {self.name!r}: could not read the forward of module '{_where(path)}' "
                       f"({type(module).__name__}) to find the activations and weights it applies as functions "
                       f"({why}); pass example_input= (one batch) to ekdaa.convert so they are found on it")
            if self.routed_activations >= ACTIVATION_CALLS - {"sign"} or self.routes_weights:
                raise ConversionError(message)
            if self.routed_activations or self.uses_derivative:  # a functional sign would matter
                warnings.warn(message, stacklevel=_outside_package())

    def _route(self, owner: nn.Module, path: str, calls: list[Call]) -> None:
        """Make ``owner``'s own calls go to this rule's treatment of their module form."""
        table = Table([], [], activations=bool(self.routed_activations),
                      norms=getattr(self, "norm_backward", "autograd") == "inverse-std")
        for call in calls:
            if call.kind == "activation":
                site = None
                if call.name in self.routed_activations:
                    name = f"ekdaa_{call.name}{call.index}"
                    called = Called(call.name, call.func, call.args, call.kwargs)
                    called.key = (owner, call.index)
                    add_to(owner, name, self._convert(called, f"{path}.{name}" if path else name))
                    site = owner._modules[name]
                table.sites.append(site)
            elif call.kind == "weight" and self.routes_weights:
                if call.weight is None:
                    if not table.own_weight:
                        table.own_weight = True
                        self.convert_weight(path, owner, "weight")
                    continue
                param_path, holder, name = call.weight
                param = getattr(holder, name)
                if any(entry[0] is param for entry in table.weights):
                    continue
                if not (name == "weight" and is_feedback_layer(holder)) and not self._has_feedback(holder, name):
                    self.convert_weight(param_path.rpartition(".")[0], holder, name)
                table.weights.append((param, holder, name))
        has_norms = table.norms and any(call.kind == "norm" for call in calls)
        if any(site is not None for site in table.sites) or table.weights or table.own_weight or has_norms:
            route(owner, self.router, table)

    def _has_feedback(self, module: nn.Module, name: str) -> bool:
        return feedback_attribute(name, self.feedback_name) in module.__dict__.get("ekdaa_added", ())

    def _convert(self, module: nn.Module, path: str) -> nn.Module:
        if is_weight_layer(module):
            self.convert_weight(path, module, "weight")
            return module
        if is_activation(module) or isinstance(module, Called):
            if (isinstance(module, Sign) or getattr(module, "name", None) == "sign") and self.uses_derivative:
                raise ConversionError(
                    f"rule {self.name!r} uses the activation derivative, and Sign at '{_where(path)}' has "
                    "derivative 0 almost everywhere: nothing below it would learn; use rule 'ekdaa'")
            return self.convert_activation(path, module)
        if type(module) in (nn.MaxPool2d, nn.AvgPool2d):
            return self.convert_pool(path, module)
        for name, child in list(module.named_children()):
            new = self._convert(child, f"{path}.{name}" if path else name)
            if new is not child:
                setattr(module, name, new)
        return module


@contextlib.contextmanager
def backprop(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, a converted ``model`` is the plain model: its forward as always, its backward
    backprop's, every gradient (input's and parameters') the true one; its rule's again after. What an
    input-gradient method on a converted model gets without asking (see :class:`_Converted`), with the
    parameters' true gradients too."""
    rule = _root(model, "backprop").ekdaa_rule
    previous, rule.plain = rule.plain, True
    try:
        yield model
    finally:
        rule.plain = previous


def _root(model: nn.Module, caller: str) -> nn.Module:
    """The converted model inside a DistributedDataParallel or torch.compile wrapper."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if getattr(model, "ekdaa_rule", None) is None:
        raise ConversionError(f"{caller}: the model is not converted (ekdaa.convert gives one)")
    return model


def _wants_input_gradient(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(a, Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


class _Converted:
    """Mixin on a converted model: a forward whose input requires grad (an attack, a saliency map, the
    inner loop of adversarial training) runs the plain model, so the input's gradient is the true one,
    with the parameters detached, so that no parameter gets backprop's gradient from it without asking
    (``ekdaa.backprop`` asks). A training step, whose input requires no grad, runs the rule (in train
    or eval mode alike); a converted part behind a trainable module would not, so whole networks are
    converted."""

    ekdaa_rule: Rule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rule = self.__dict__.get("ekdaa_rule")  # absent on a slice (model[:3]): the parts act on their own
        if rule is None or rule.plain or not torch.is_grad_enabled() or not _wants_input_gradient(args, kwargs):
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        with backprop(self):
            detached = {name: p.detach() for name, p in self.named_parameters()}
            return torch.func.functional_call(self, detached, args, kwargs)


_CONVERTED_CLASSES: dict[type, type] = {}


def _start_forward(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook on a converted model whose rule asks for one (:meth:`Rule.wants_start`)."""
    model.ekdaa_rule.start_forward(args)


def unconvert(model: nn.Module) -> nn.Module:
    """A plain PyTorch copy of a converted ``model`` (a DistributedDataParallel or compiled one
    included): the same modules as before conversion, with the trained W, b and normalisation
    state, feedback tensors dropped, so its ``state_dict`` loads into the original class. The
    converted model is left as it is."""
    model = _root(model, "unconvert")
    rule, plain = model.ekdaa_rule, copy.deepcopy(model)
    del plain.ekdaa_rule
    plain.__class__ = type(plain).__bases__[1]  # its own class (or the routed one) again: see Rule.convert
    for key, hook in list(plain._forward_pre_hooks.items()):
        if hook is _start_forward:
            del plain._forward_pre_hooks[key]
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
    init_option = FEEDBACK_INIT.name
