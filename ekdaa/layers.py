"""Building blocks shared by the learning rules.

* :class:`Sign`, the non-differentiable activation the package provides.
* Activations (:func:`is_activation`): every elementwise activation module of ``torch.nn`` and its
  subclasses, softmax-like ones along their dimension; :func:`activation_function` gives the pure
  function each computes.
* Weight layers (:func:`is_weight_layer`): ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (any groups,
  padding mode) and their subclasses that keep their forward. A rule turns one into its
  *feedback* class in place (:func:`to_feedback_layer`, so parameter names, objects and hooks stay):
  its forward is unchanged, its backward sends the error down through a *feedback tensor* of W's
  shape (EKDAA's error kernel E, FA's fixed B, ...) instead of W.
* Normalisation layers (:data:`NORMS`).

The weight-layer backward (``_FeedbackFn``), given the error map e at the layer's
output, returns

    d  = transposed conv / product of e with F   (the error sent down)
    dW = e (x) z_prev,  db = sum of e             (the usual local correlation)
    dF = dW                                       (only if F is learned: EKDAA, KP)

with one ``aten.convolution_backward`` call (d through F, dW from e and x: dW never reads W) in the
dtype of the arriving error. Where x is the output of EKDAA's error map, which keeps h anyway,
the layer keeps nothing and recomputes x = f(h) from the error map's h (:class:`ekdaa.memory.SavedInput`):
one saved activation per layer, as backprop keeps.
"""
from __future__ import annotations

import copy
import math
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory import SavedInput


class Sign(nn.Module):
    """z = sign(h) (sign(0) = 0). Its derivative is zero almost everywhere, so only rules
    that never evaluate f' (EKDAA) or replace it (``bp-ste``) can train through it."""

    def forward(self, h: Tensor) -> Tensor:
        return torch.sign(h)


class IdentityActivation(nn.Identity):
    """f(h) = h as a network's activation (a linear network): the rules treat it as an activation
    (EKDAA's error map is beta d there), unlike an ``nn.Identity`` placeholder, which passes the error on."""


#: Activation modules of torch.nn (and ours) that map a tensor to one of its shape, elementwise or
#: along one dimension (softmax); their subclasses are activations too. nn.GLU halves its input and
#: nn.MultiheadAttention is a layer: neither is one (a rule opens them into their parts).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.Softmax, nn.Softmin, nn.Softmax2d,
    nn.LogSoftmax, Sign, IdentityActivation)

#: The common activations by their pure function: what their modules compute, one call fewer.
_SIMPLE: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {
    nn.Tanh: torch.tanh, nn.ReLU: torch.relu, nn.Sigmoid: torch.sigmoid, Sign: torch.sign,
    IdentityActivation: lambda h: h}


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, ACTIVATIONS)


def stochastic(module: nn.Module) -> bool:
    """Whether the activation draws at random in training (RReLU's slopes)."""
    return isinstance(module, nn.RReLU)


def activation_function(module: nn.Module, mean: bool = False) -> Callable[[Tensor], Tensor]:
    """The pure (never in-place) function an activation module computes (``mean``: a stochastic one's
    mean, RReLU's slope (lower + upper) / 2, else as the module's mode says). A parametric one (PReLU)
    reads its parameters when called."""
    kind = type(module)
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    if stochastic(module):
        return lambda h: F.rrelu(h, module.lower, module.upper, module.training and not mean)
    if getattr(module, "inplace", False):
        module = copy.copy(module)  # shares its parameters: a pure view of the same activation
        module.inplace = False
    return module.forward


#: Normalisation layers: by default every rule keeps their autograd backward: their own scale and
#: shift learn from the error that reaches them (local), and the error passes on scaled per channel
#: (or per sample) by gamma / sigma, with the statistics' terms: a small, per-channel weight transport.
#: The rules' option ``norm_backward="inverse-std"`` divides it by sigma only (rules/calls.py).
NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORMS)


def tracks_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a norm with running statistics (BatchNorm, InstanceNorm with them)."""
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats


#: Weight layers a rule converts, with the forward each must keep to be converted by type.
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_weight_layer(module: nn.Module) -> bool:
    """An ``nn.Linear`` / ``nn.ConvNd`` (or subclass) whose forward is its base class's: the rule
    converts it by type. A subclass with a forward of its own (weight standardisation, say) is
    handled at its functional calls (rules/calls.py)."""
    base = next((b for b in WEIGHT_LAYERS if isinstance(module, b)), None)
    return base is not None and all(getattr(type(module), name, None) is getattr(base, name, None)
                                    for name in ("forward", "_conv_forward"))


def conv_geometry(kernel_size: tuple[int, ...], stride: Any, padding: Any, dilation: Any,
                  groups: int) -> tuple[list[int] | None, tuple]:
    """A convolution's arguments as ``aten.convolution_backward`` takes them: ``(pad, (stride,
    padding, dilation, groups))``; ``pad`` (F.pad's order) where the input must be padded first
    (padding='same' with an even extent), else None."""
    dims = len(kernel_size)
    as_list = lambda v: [v] * dims if isinstance(v, int) else list(v)  # noqa: E731
    stride, dilation = as_list(stride), as_list(dilation)
    pad = None
    if padding == "valid":
        padding = [0] * dims
    elif padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        padding = [t // 2 for t in totals]
        if any(t % 2 for t in totals):  # asymmetric: the extra row/column at the end, as torch does
            pad = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
            padding = [0] * dims
    else:
        padding = as_list(padding)
    return pad, (stride, padding, dilation, groups)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _FeedbackFn(torch.autograd.Function):
    """h = W * x + b forward; backward transmits through ``feedback`` (None: transmit
    nothing, as DFA's hidden layers do). The backward runs in the dtype of the error that
    arrives (bf16 under bf16 autocast, as backprop's does): x and the feedback are cast to it,
    and autograd casts the gradients to the parameters' dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None,
                conv: tuple | None) -> Tensor:
        ctx.conv = conv
        ctx.has_bias, ctx.has_feedback = bias is not None, feedback is not None
        ctx.set_materialize_grads(False)  # no error arrived (DFA, last-layer): no update at all
        ctx.x = SavedInput(x)  # nothing, where x is an error map's z: recomputed from its h (ekdaa.memory)
        ctx.save_for_backward(ctx.x.tensor(x), weight, feedback)
        if conv is None and x.dim() <= 2:
            return F.linear(x, weight, bias)
        if conv is None:  # F.linear's would be a view, which an in-place op after it may not modify
            out = torch.matmul(x, weight.t())
            return out if bias is None else out.add_(bias)
        return _CONV[weight.dim() - 2](x, weight, bias, *conv)

    @staticmethod
    def backward(ctx, e: Tensor | None):
        if e is None:
            return None, None, None, None, None
        need_x = ctx.needs_input_grad[0] and ctx.has_feedback
        need_w, need_b, need_f = ctx.needs_input_grad[1:4]
        if not (need_x or need_w or need_b or need_f):
            return None, None, None, None, None
        x, weight, feedback = ctx.saved_tensors
        x = ctx.x.load(x)
        # dW does not depend on the weight's values: one call sends e down through the feedback
        # and correlates it with x
        sender = weight if feedback is None else feedback
        if x.dtype != e.dtype:  # x: the input data, in float32 under autocast
            x = x.to(e.dtype)
        if sender.dtype != e.dtype:  # the feedback cast as autocast casts W
            sender = sender.to(e.dtype)
        if ctx.conv is None:
            d = e.matmul(sender) if need_x else None
            e2, x2 = (e, x) if e.dim() == 2 else (e.reshape(-1, e.shape[-1]), x.reshape(-1, x.shape[-1]))
            dw = e2.t().mm(x2) if need_w or need_f else None
            db = e2.sum(0) if need_b else None
        else:
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            stride, padding, dilation, groups = ctx.conv
            d, dw, db = torch.ops.aten.convolution_backward(
                e, x, sender, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups,
                [need_x, need_w or need_f, need_b])
        # dF = dW, the same tensor: autograd never lets two .grad share storage, and copies it only where
        # it must (into a .grad that is None; a cast to the parameters' dtype is a copy already). A tensor
        # hook on W and F, or torch.autograd.grad(loss, [W, F]), sees that one tensor twice.
        return d, dw if need_w else None, db, dw if need_f else None, None


def feedback_product(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None,
                     conv: tuple | None, pad: list[int] | None = None, pad_mode: str = "constant") -> Tensor:
    """``F.linear`` (``conv`` None) or ``F.convNd`` of ``x`` with W and b, whose backward sends the
    error down through ``feedback`` (W under autograd's own rules where ``pad`` pads x first)."""
    if pad is not None:
        x = F.pad(x, pad, mode=pad_mode)
    return _FeedbackFn.apply(x, weight, bias, feedback, conv)


class _FeedbackLayer:
    """Mixin: forward through ``_FeedbackFn`` with the feedback tensor the rule supplies."""

    rule: "object"  # the ekdaa.rules.Rule that converted this layer
    geometry: tuple | None = None  # (pad, pad mode, conv args) of a convolution, fixed at conversion

    def forward(self, x: Tensor) -> Tensor:
        rule, geometry = self.rule, self.geometry
        if rule.plain:  # the model as it is, with backprop's gradients (ekdaa.backprop)
            return type(self).__bases__[1].forward(self, x)
        x = rule.layer_input(self, x)
        if geometry is not None and geometry[0] is not None:
            x = F.pad(x, geometry[0], mode=geometry[1])
        out = _FeedbackFn.apply(x, self.weight, self.bias, rule.feedback(self), None if geometry is None else geometry[2])
        return rule.layer_output(self, out)

    def unconverted(self) -> nn.Module:
        """This layer as its nn class again (in place; ``ekdaa.unconvert``): W and b kept, what the
        rule added dropped."""
        for attr in ("rule", "geometry"):
            self.__dict__.pop(attr, None)
        return restored(self)


_FEEDBACK_CLASSES: dict[type, type] = {}


def subclass_for(mixin: type, kind: type, prefix: str, made: dict[type, type], module: str) -> type:
    """``class <prefix><Kind>(mixin, kind)``, made once per ``kind`` and named in ``module``, so that a
    converted model pickles (by name) like any other."""
    if kind not in made:
        name, taken = prefix + kind.__name__, 1
        while hasattr(sys.modules[module], name):  # two classes of one name (torchvision's and timm's ResNet)
            name, taken = f"{prefix}{kind.__name__}_{taken}", taken + 1
        cls = type(name, (mixin, kind), {"__module__": module, "__qualname__": name, "__doc__": kind.__doc__})
        setattr(sys.modules[module], name, cls)
        made[kind] = cls
    return made[kind]

#: The attribute listing what a rule added to a module (tensors, submodules, numbers), for remove_added.
ADDED = "ekdaa_added"


def add_to(module: nn.Module, name: str, value: Any, learned: bool | None = None) -> None:
    """Give ``module`` the rule's ``value`` under ``name``: a tensor as a buffer (``learned`` None: fixed)
    or a Parameter whose requires_grad is ``learned``; a module as a submodule; anything else as an
    attribute. :func:`remove_added` takes it away again."""
    if isinstance(value, Tensor):
        if learned is None:
            module.register_buffer(name, value)
        else:
            module.register_parameter(name, nn.Parameter(value, requires_grad=learned))
    else:
        setattr(module, name, value)
    module.__dict__.setdefault(ADDED, []).append(name)


def remove_added(module: nn.Module) -> None:
    """Undo every :func:`add_to` on ``module``."""
    for name in module.__dict__.pop(ADDED, []):
        for store in (module._parameters, module._buffers, module._modules, module.__dict__):
            store.pop(name, None)


def restored(module: nn.Module) -> nn.Module:
    """A module a rule turned into a subclass made for it (``Mixin, Cls``), in place: its own class
    again, without what the rule added (:func:`add_to`)."""
    remove_added(module)
    module.__class__ = type(module).__bases__[1]
    return module


def to_feedback_layer(layer: nn.Module, rule: Any) -> None:
    """Turn a weight layer (:func:`is_weight_layer`) into its feedback class in place."""
    kind = type(layer)
    if isinstance(layer, nn.modules.conv._ConvNd):
        pad, conv = conv_geometry(layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups)
        if layer.padding_mode != "zeros":
            pad, conv = layer._reversed_padding_repeated_twice, (conv[0], [0] * len(conv[0]), *conv[2:])
        layer.geometry = pad, "constant" if layer.padding_mode == "zeros" else layer.padding_mode, conv
    layer.__class__ = subclass_for(_FeedbackLayer, kind, "Feedback", _FEEDBACK_CLASSES, __name__)
    layer.rule = rule


def is_feedback_layer(module: nn.Module) -> bool:
    return isinstance(module, _FeedbackLayer)


def glorot_like(weight: Tensor) -> Tensor:
    """A fresh Glorot-uniform tensor of W's shape, drawn independently of W."""
    return nn.init.xavier_uniform_(torch.empty_like(weight, memory_format=torch.contiguous_format))


#: nn.Conv2d's and nn.Linear's own weight initialiser: kaiming_uniform_ with a = sqrt(5)
_LAYER_INIT_SLOPE = math.sqrt(5)


def layer_init_like(weight: Tensor) -> Tensor:
    """A fresh tensor of W's shape drawn as nn.Conv2d / nn.Linear draw their weight by default,
    independent of W."""
    fresh = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return nn.init.kaiming_uniform_(fresh, a=_LAYER_INIT_SLOPE)


def layer_init_std(weight: Tensor) -> float:
    """The standard deviation of :func:`layer_init_like`: 1 / sqrt(3 fan_in)."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    return nn.init.calculate_gain("leaky_relu", _LAYER_INIT_SLOPE) / math.sqrt(fan_in)


def glorot_std(weight: Tensor) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return (2.0 / (fan_in + fan_out)) ** 0.5


def weight_rms(weight: Tensor) -> float:
    """W's root-mean-square: the standard deviation of whatever zero-mean initialiser drew it (one number
    per layer, read once); :func:`layer_init_std` where W is all zero."""
    rms = weight.detach().float().square().mean().sqrt().item()
    return rms if rms > 0 else layer_init_std(weight)


def matched_like(weight: Tensor) -> Tensor:
    """A fresh uniform tensor of W's shape, independent of W's values, with W's RMS (:func:`weight_rms`)."""
    bound = math.sqrt(3) * weight_rms(weight)
    return torch.empty_like(weight, memory_format=torch.contiguous_format).uniform_(-bound, bound)
