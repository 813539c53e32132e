"""Building blocks shared by the learning rules.

* :class:`Sign`, the non-differentiable activation the package provides.
* ``ACTIVATIONS``: the elementwise activation modules a rule may meet, and
  ``activation_function`` giving the pure function each computes.
* :class:`FeedbackConv2d` / :class:`FeedbackLinear`: ``nn.Conv2d`` / ``nn.Linear``
  whose forward is unchanged but whose backward sends the error down through a
  *feedback tensor* of W's shape (EKDAA's error kernel E, FA's fixed B, ...)
  instead of W. A rule turns a layer into one in place (``attach_feedback``), so
  parameter names, objects and hooks stay; the rule supplies the feedback tensor.

The weight-layer backward (``_FeedbackFn``), given the error map e at the layer's
output, returns

    d  = transposed conv / product of e with F   (the error sent down)
    dW = e (x) z_prev,  db = sum of e             (the usual local correlation)
    dF = dW                                       (only if F is learned: EKDAA, KP)

with one ``aten.convolution_backward`` call (d through F, dW from e and x: dW never reads W) in the
dtype of the arriving error. Where x is the output of EKDAA's error map, which keeps h anyway,
the layer keeps nothing and recomputes x = f(h) from the error map's h (:func:`recomputable`): one
saved activation per layer, as backprop keeps.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Sign(nn.Module):
    """z = sign(h) (sign(0) = 0). Its derivative is zero almost everywhere, so only rules
    that never evaluate f' (EKDAA) or replace it (``bp-ste``) can train through it."""

    def forward(self, h: Tensor) -> Tensor:
        return torch.sign(h)


_SIMPLE: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {
    nn.Tanh: torch.tanh, nn.ReLU: torch.relu, nn.Sigmoid: torch.sigmoid,
    nn.Identity: lambda h: h, Sign: torch.sign,
}

#: The elementwise activation modules the rules understand (exact types).
ACTIVATIONS: tuple[type[nn.Module], ...] = (*_SIMPLE, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6)


def activation_function(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The pure (never in-place) elementwise function an activation module computes."""
    if isinstance(module, nn.LeakyReLU):
        slope = module.negative_slope
        return lambda h: F.leaky_relu(h, slope)
    if isinstance(module, nn.Hardtanh):
        lo, hi = module.min_val, module.max_val
        return lambda h: F.hardtanh(h, lo, hi)
    return _SIMPLE[type(module)]


#: Modules that carry no parameters and whose autograd backward is the routing every
#: rule wants: max-pool to the winner, avg-pool spread evenly, reshape, same mask.
PASSTHROUGH: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d)

#: Normalisation layers. By default every rule keeps their autograd backward: their own scale and
#: shift learn from the error that reaches them (local), and the error passes on scaled per channel
#: by gamma / sigma (with the batch-statistics terms), a small, per-channel weight transport; the
#: rules' option ``norm_backward="inverse-std"`` divides it by sigma only (``INVERSE_STD_NORMS``).
NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


class _InverseStdRouteFn(torch.autograd.Function):
    """Forward: the norm's output y (computed from a detached input). Backward: y gets the error,
    so the norm's scale and shift learn from it, and the input x gets it times 1 / sigma."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, inv_std: Tensor) -> Tensor:
        ctx.save_for_backward(inv_std)
        return y.clone()  # its own tensor: an in-place activation after it stays legal

    @staticmethod
    def backward(ctx, e: Tensor):
        (inv_std,) = ctx.saved_tensors
        return e, e * inv_std, None


class _InverseStdNorm:
    """Mixin for a BatchNorm: forward unchanged; the error reaches the input divided by sigma
    only (no gamma, no batch-statistics terms), so no weight travels backwards through it."""

    eps: float
    training: bool
    running_var: Tensor | None

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)  # type: ignore[misc]
        dims = (0, *range(2, x.dim()))  # every dimension but the channels
        use_batch = self.training or self.running_var is None
        var = x.detach().var(dims, unbiased=False) if use_batch else self.running_var
        inv_std = torch.rsqrt(var + self.eps).view(1, -1, *[1] * (x.dim() - 2))
        return _InverseStdRouteFn.apply(super().forward(x.detach()), x, inv_std)  # type: ignore[misc]


    def unconverted(self) -> nn.Module:
        """This norm as its nn class again (in place; ``ekdaa.unconvert``)."""
        self.__class__ = PLAIN_NORMS[type(self)]
        return self


class InverseStdBatchNorm1d(_InverseStdNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose error reaches its input divided by sigma only."""


class InverseStdBatchNorm2d(_InverseStdNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose error reaches its input divided by sigma only."""


INVERSE_STD_NORMS = {nn.BatchNorm1d: InverseStdBatchNorm1d, nn.BatchNorm2d: InverseStdBatchNorm2d}
PLAIN_NORMS = {v: k for k, v in INVERSE_STD_NORMS.items()}


def conv_args(layer: nn.Conv2d) -> tuple[list[int], list[int], list[int]]:
    """A convolution's stride, padding and dilation as ``aten.convolution_backward`` takes them."""
    padding = layer.padding
    if isinstance(padding, str):  # 'valid' or 'same' (odd kernels only)
        if padding == "valid":
            padding = (0, 0)
        elif all(k % 2 == 1 for k in layer.kernel_size):
            padding = tuple(d * (k - 1) // 2 for k, d in zip(layer.kernel_size, layer.dilation))
        else:
            raise ValueError("padding='same' with an even kernel is not supported; pad explicitly")
    return list(layer.stride), list(padding), list(layer.dilation)


#: The attribute by which an autograd node (a custom Function's ctx) says that its output is z = f(h)
#: with h its first saved tensor, and names f: EKDAA's error map, which keeps h for its own backward.
#: Such a node also has attributes ``h`` and ``z`` (None until this backward looks them up).
RECOMPUTE = "recompute_output"


def recomputable(x: Tensor) -> tuple[Any, tuple | None] | None:
    """``(node, view)`` when ``x`` is z = f(h), or a view of it (``view``: its size, stride and
    offset), made by a node that keeps h (:data:`RECOMPUTE`): a backward that needs x then keeps
    nothing and gets x back from :func:`recompute` (or h, for z's shape and layout, from
    :func:`kept_input`); else None."""
    if torch.compiler.is_compiling():  # the compiler chooses what to keep
        return None
    z = x if x._base is None else x._base
    if getattr(z.grad_fn, RECOMPUTE, None) is None:
        return None
    return z.grad_fn, None if z is x else (x.size(), x.stride(), x.storage_offset())


def kept_input(node: Any) -> Tensor:
    """The h a :data:`RECOMPUTE` node keeps, unpacked once per backward (saved-tensor hooks, such as
    activation checkpointing's, allow one unpack) and left on the node (``node.h``) for its own backward."""
    if node.h is None:
        node.h = node.saved_tensors[0]
    return node.h


def recompute(node: Any, view: tuple | None) -> Tensor:
    """The input x that :func:`recomputable` described: z = f(h), computed once per backward and
    left on the node (``node.z``) for the node's own backward and for z's other users."""
    z = node.z
    if z is None:
        node.z = z = getattr(node, RECOMPUTE)(kept_input(node))
    return z if view is None else z.as_strided(*view)  # f(h) is laid out as z was


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
        ctx.source = recomputable(x)
        ctx.save_for_backward(x if ctx.source is None else None, weight, feedback)
        if conv is None:
            return F.linear(x, weight, bias)
        stride, padding, dilation = conv
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, e: Tensor | None):
        if e is None:
            return None, None, None, None, None
        need_x = ctx.needs_input_grad[0] and ctx.has_feedback
        need_w, need_b, need_f = ctx.needs_input_grad[1:4]
        if not (need_x or need_w or need_b or need_f):
            return None, None, None, None, None
        x, weight, feedback = ctx.saved_tensors
        x = x if ctx.source is None else recompute(*ctx.source)
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
            d, dw, db = torch.ops.aten.convolution_backward(
                e, x, sender, bias_sizes, *ctx.conv, False, [0, 0], 1, [need_x, need_w or need_f, need_b])
        # dF = dW, the same tensor: autograd never lets two .grad share storage, and copies it only where
        # it must (into a .grad that is None; a cast to the parameters' dtype is a copy already). A tensor
        # hook on W and F, or torch.autograd.grad(loss, [W, F]), sees that one tensor twice.
        return d, dw if need_w else None, db, dw if need_f else None, None


class _FeedbackLayer:
    """Mixin: forward through ``_FeedbackFn`` with the feedback tensor the rule supplies."""

    rule: "object"  # the ekdaa.rules.Rule that converted this layer
    conv_args: tuple | None = None  # stride, padding, dilation of a convolution, fixed at conversion

    def forward(self, x: Tensor) -> Tensor:
        out = _FeedbackFn.apply(x, self.weight, self.bias, self.rule.feedback(self), self.conv_args)
        return self.rule.layer_output(self, out)

    def unconverted(self) -> nn.Module:
        """This layer as its nn class again (in place; ``ekdaa.unconvert``): W and b kept, the
        feedback tensor dropped."""
        for store in (self._parameters, self._buffers):
            store.pop(self.rule.feedback_name, None)
        for attr in ("rule", "conv_args"):
            self.__dict__.pop(attr, None)
        self.__class__ = PLAIN_LAYERS[type(self)]
        return self


class FeedbackLinear(_FeedbackLayer, nn.Linear):
    """``nn.Linear`` whose error travels down through a feedback matrix."""


class FeedbackConv2d(_FeedbackLayer, nn.Conv2d):
    """``nn.Conv2d`` whose error travels down through a feedback kernel."""


FEEDBACK_CLASSES = {nn.Linear: FeedbackLinear, nn.Conv2d: FeedbackConv2d}
PLAIN_LAYERS = {v: k for k, v in FEEDBACK_CLASSES.items()}


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
