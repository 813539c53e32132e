"""EKDAA: error-kernel driven activation alignment (Zee, Ororbia, Mali & Nwogu,
"A Robust Backpropagation-Free Framework for Images", TMLR 2023).

Forward as usual: h_l = W_l * z_{l-1} + b_l, z_l = f_l(h_l), logits h_L. Backward,
W is never used to send error down. Per sample:

    e_L  = softmax(h_L) - onehot(y)                       output error
    d    = E_l^T e_l   (conv: transposed conv with E_l)    error sent down, through
                                                           pools to the unit that fed it
    h~   = h - beta * d,   y~ = f(h~)                      target (only f, never f')
    e    = z - y~                                          error map
    dW_l = <e_l (x) z_{l-1}>,  db_l = <sum e_l>            local updates (batch mean <.>)
    dE_l = gamma * dW_l                                    error-kernel update

Centered error map (``error_map='centered'``, not the paper's equation, a variant named as such):
e = f(h + beta d / 2) - f(h - beta d / 2). The paper's one-sided map is e = beta f'(h) d - (beta d)^2
f''(h) / 2 + ...: where f curves, its second term has one sign whatever d's, so it adds up over samples
and steps where the first-order terms cancel (a drift that BatchNorm's running statistics then trail:
EKDAA's MobileNetV3-style network in eval mode fell to chance with it). Centered, it cancels (the
error is O(beta^3 d^3); exact for a quadratic piece such as Hardswish's). As in equilibrium
propagation's symmetric nudging (Laborieux et al., 2021). Still only f, never f'. The default, ``auto``,
keeps the paper's map for tanh (the paper's activation, its results recorded so), sign and the
piecewise-linear ones (ReLU family, hardtanh: f'' = 0 away from their kinks), and centers it for every
other (sigmoid, GELU, SiLU, Hardswish, Hardsigmoid, Mish, ELU, softmax, ...).

The two lines of code below, :func:`target` and :func:`error_map`, are the target and the error map;
the backward of :class:`ErrorMap` applies them to the error d that arrives, in the paper's names. The
weight layers' part (d through E, dW, dE = dW) is the feedback layers' (:mod:`ekdaa.layers`), with E a
Parameter named ``error_kernel``; gamma is E's learning rate relative to W's (``ekdaa.param_groups``
puts E in a group with ``lr = gamma * lr``: under SGD exactly dE = gamma dW, and, unlike scaling E's
gradient, meaningful under Adam; gamma = 0 freezes E).

Smooth target (``target_function='smooth'``, for sign and hardtanh-like f; not the
paper's equation, a variant named as such): the target and the error map are formed
through a smooth stand-in g of f, e = g(h) - g(h~), with g(u) = tanh(u / tau) for sign
(in general g(u) = m + r tanh((u - m) / (r tau)) for an f that clips to [m - r, m + r]).
Only g is evaluated, never a derivative, and d = 0 gives e = 0 exactly. For small beta,
e ~ beta g'(h) d: a straight-through-style pseudo-derivative g'(h), reached without
evaluating one. The literal error map z - f(h~) of a sign unit is 0 or +-2 whatever the size of d.

Memory: the error map keeps h (a layer fed z recomputes z from it, so a step keeps one activation
per layer, as backprop does) and is written over h, which is dead by then (:mod:`ekdaa.memory`), in
one fused pass (on a GPU at any size, on the CPU on large tensors: :mod:`ekdaa.fused`). A forward hook
that keeps h sees it overwritten after backward: clone it there; for ``retain_graph=True``, convert
with ``fuse=False``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import memory
from ..fused import Fused
from ..layers import ACTIVATIONS, IdentityActivation, Sign, activation_function, stochastic
from .base import NORM_BACKWARD, ConversionError, Option, Rule, random_feedback
from .calls import ACTIVATION_CALLS, Called


def target(h: Tensor, d: Tensor, beta: float | Tensor) -> Tensor:
    """The target's pre-activation, h~ = h - beta d (beta: a number, or per-sample tensors)."""
    if isinstance(beta, float) and not torch.compiler.is_compiling():
        return torch.add(h, d, alpha=-beta)  # one op (compiled, torch 2.13's Inductor drops this alpha
    return h - beta * d                      # where it folds d's matmul into an addmm)


def error_map(f: Callable[[Tensor], Tensor], h: Tensor, d: Tensor, beta: float | Tensor,
              z: Tensor | None = None, centered: bool = False) -> Tensor:
    """The error map at an activation f, e = z - f(h - beta d), with z = f(h) (given where already
    computed); ``centered``: e = f(h + beta d / 2) - f(h - beta d / 2). Through a smooth stand-in g
    for f, the same with g."""
    if centered:
        return f(target(h, d, -beta / 2)) - f(target(h, d, beta / 2))
    return (f(h) if z is None else z) - f(target(h, d, beta))


#: The activations whose error map ``error_map='auto'`` keeps one-sided, the paper's: tanh (the paper's
#: own, its results recorded so), sign and the piecewise-linear ones (no curvature away from their kinks);
#: the rest, centered.
ONE_SIDED = (nn.Tanh, Sign, IdentityActivation, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU,
             nn.Hardtanh, nn.Threshold, nn.Hardshrink, nn.Softshrink)
ONE_SIDED_CALLS = frozenset({"tanh", "sign", "relu", "relu6", "leaky_relu", "rrelu", "prelu", "hardtanh",
                             "threshold", "hardshrink", "softshrink", "clamp", "clamp_min", "clamp_max", "clip"})


def centered_by_default(activation: nn.Module) -> bool:
    """Whether ``error_map='auto'`` centers this activation's error map."""
    if isinstance(activation, Called):
        return activation.name not in ONE_SIDED_CALLS
    return not isinstance(activation, ONE_SIDED)


def tanh_by_exp(u: Tensor) -> Tensor:
    """tanh(u) = 1 - 2 / (1 + exp(2u)): equal to tanh within float rounding of 1 (absolute error;
    near 0 its relative error is large), which is all a difference of two tanh values needs.
    Compiled into a fused pass on CPU it costs well under half of tanh (exp vectorises better)."""
    return 1 - 2 / (1 + torch.exp(2 * u))


def smooth_stand_in(activation: nn.Module, tau: float,
                    tanh: Callable[[Tensor], Tensor] = torch.tanh) -> Callable[[Tensor], Tensor] | None:
    """g(u) = m + r tanh((u - m) / (r tau)) for an activation that clips to [m - r, m + r]
    (Sign: tanh(u / tau); Hardtanh and ReLU6 by their bounds); None for any other."""
    if isinstance(activation, Sign) or isinstance(activation, Called) and activation.name == "sign":
        lo, hi = -1.0, 1.0
    elif isinstance(activation, nn.Hardtanh):  # ReLU6 included
        lo, hi = float(activation.min_val), float(activation.max_val)
    else:
        return None
    mid, radius = (hi + lo) / 2, (hi - lo) / 2
    scale = 1 / (radius * tau)
    return lambda u: tanh((u - mid) * scale) * radius + mid


def _half(t: Tensor) -> bool:
    """Whether ``t`` is in a 16-bit float type."""
    return t.dtype in (torch.float16, torch.bfloat16)


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a 16-bit float type, else as it is."""
    return t.float() if _half(t) else t


def _kernel_fn(f: Callable[[Tensor], Tensor], centered: bool) -> Callable[..., Tensor]:
    """``error_map(f, h, d, beta, z, centered) * scale``, its small difference taken in float32 for 16-bit
    inputs (eagerly at the cost of casts in and one out; fused, in registers; and where torch.compile runs the
    function eagerly after all, e.g. under a TorchDispatchMode, tanh_by_exp in bf16 would lose e)."""
    def kernel(h: Tensor, d: Tensor, beta: float | Tensor, scale: float, z: Tensor | None = None) -> Tensor:
        if not _half(h):
            return error_map(f, h, d, beta, z, centered) * scale
        wide = error_map(f, h.float(), d.float(), beta, centered=centered)  # a 16-bit z is never given
        return (wide * scale).to(h.dtype)
    return kernel


_KERNELS: dict[tuple, Fused] = {}


def error_map_kernel(activation: nn.Module, tau: float | None, centered: bool = False) -> Fused:
    """The error map of ``activation`` (through its smooth stand-in if ``tau`` is given; ``centered``),
    ``kernel(h, d, beta, scale, z=None)``, as one fused pass written over h (on a GPU at any size, on
    the CPU on large tensors), shared by every layer with the same activation (torch's activations and
    calls: by type and arguments; a subclass or a parametric one: its own); fused, a difference of two
    tanh values evaluates them as :func:`tanh_by_exp`."""
    shared = type(activation) in (*ACTIVATIONS, Called) and not any(True for _ in activation.parameters())
    key = (type(activation), activation.extra_repr(), tau, centered) if shared else None
    if key not in _KERNELS:
        def f(tanh: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
            if tau is not None:
                return smooth_stand_in(activation, tau, tanh)
            return tanh if isinstance(activation, nn.Tanh) else activation_function(activation, mean=True)
        kernel = Fused(_kernel_fn(f(torch.tanh), centered), f"EKDAA's error map ({type(activation).__name__})",
                       fused_fn=_kernel_fn(f(tanh_by_exp), centered))
        if key is None:
            return kernel
        _KERNELS[key] = kernel
    return _KERNELS[key]


class _ErrorMapFn(torch.autograd.Function):
    """z = f(h) forward, keeping h; backward: the arriving d to the error map e. The activation's own
    parameters (PReLU's slope) learn from d, the error that reaches its output, as a bias does."""

    @staticmethod
    def forward(ctx, h: Tensor, m: "ErrorMap", *params: Tensor) -> Tensor:
        z = m.forward_f(h)
        ctx.error_map = m
        # the batch: h's first dimension, or, for a call inside a module (attention's softmax, whose first
        # dimension may hold the heads too), the model input's
        ctx.batch = m.rule.batch if m.called and m.rule.batch else h.shape[0]
        ctx.overwrite = not m.called and memory.writable(h)
        if m.forward_f is m.f:  # a layer fed z recomputes it (not a random draw: then the layer keeps its z)
            memory.keeps_input(ctx, m.f)
        else:
            ctx.h = ctx.z = None
        ctx.save_for_backward(h)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):
        m: ErrorMap = ctx.error_map
        rule = m.rule
        h = memory.kept_input(ctx)
        params = ()
        if any(ctx.needs_input_grad[2:]):  # d (x) df/dparam: the activation's parameters' local update
            with torch.enable_grad():
                params = torch.autograd.grad(m.f(h.detach()), tuple(m.activation.parameters()), grad, allow_unused=True)
        # autograd hands grad = d / n under a batch-mean loss: beta d = (beta n) grad, and e / n is the mean's share
        n = ctx.batch if rule.loss_reduction == "mean" else 1
        beta = rule.beta * n
        if rule.error_norm != "none":
            per_sample = dict(dim=tuple(range(1, grad.dim())), keepdim=True)
            if rule.error_norm == "max":  # d / max(1, max|d|), per sample
                beta = beta / (_wide(grad.abs().amax(**per_sample)) * n).clamp_min(1.0)
            else:  # relative: d * rms(h), per sample: beta on the pre-activation's scale
                beta = beta * _wide(h).square().mean(**per_sample).sqrt()
        z = memory.take_output(ctx)
        # a recomputed z saves the kernel an f(h): worth a read on the CPU, not on a GPU; a 16-bit z would
        # bring its rounding (2^-9 of z) into e's small difference, which the kernel forms in float32
        if not m.literal or h.device.type != "cpu" or z is not None and _half(z):
            z = None
        kernel = m.kernel if ctx.overwrite and rule.fuse else m.kernel.fn  # over h (fused where it pays), or new
        return kernel(h, grad, beta, 1 / n, z), None, *params


class ErrorMap(nn.Module):
    """An activation whose backward is EKDAA's error map (forward unchanged), formed through
    the activation itself or, with ``tau``, through its smooth stand-in. f, the target function and
    whether the map is centered are fixed at conversion; beta, ``error_norm``, ``loss_reduction`` and
    ``fuse`` are read from the rule at each backward (a schedule may change beta)."""

    def __init__(self, activation: nn.Module, rule: "EKDAA", tau: float | None = None):
        super().__init__()
        self.activation = activation
        self.rule = rule
        self.f = activation_function(activation, mean=True)  # the target's f
        self.forward_f = self.f if not stochastic(activation) else activation_function(activation)
        self.called = isinstance(activation, Called)  # applied as a function in a module's forward
        self.parametric = any(True for _ in activation.parameters())  # PReLU
        self.centered = rule.error_map == "centered" or rule.error_map == "auto" and centered_by_default(activation)
        # e = z - f(h~): takes a z already computed; a target drawn at random (RReLU) differs from z even
        # where d = 0, so there e = f(h) - f(h~) through the mean slope
        self.literal = tau is None and not stochastic(activation) and not self.centered
        self.kernel = error_map_kernel(activation, tau, self.centered)

    def forward(self, h: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or self.rule.plain:
            return self.activation(h)
        if self.parametric:
            return _ErrorMapFn.apply(h, self, *self.activation.parameters())
        return _ErrorMapFn.apply(h, self)

    def unconverted(self) -> nn.Module:
        return self.activation


class _BilinearRouteFn(torch.autograd.Function):
    """Max-pool forward; backward spreads d over the pool's input by bilinear upsampling."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: nn.MaxPool2d) -> Tensor:
        ctx.size = x.shape[-2:]
        return pool(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return F.interpolate(grad, size=ctx.size, mode="bilinear", align_corners=False), None


class BilinearRoutedPool(nn.Module):
    """``nn.MaxPool2d`` whose backward routes d by bilinear upsampling (authors' code)."""

    def __init__(self, pool: nn.MaxPool2d, rule: "EKDAA"):
        super().__init__()
        self.pool, self.rule = pool, rule

    def forward(self, x: Tensor) -> Tensor:
        return _BilinearRouteFn.apply(x, self.pool) if torch.is_grad_enabled() and not self.rule.plain else self.pool(x)

    def unconverted(self) -> nn.Module:
        return self.pool


class EKDAA(Rule):
    """Error-kernel driven activation alignment; its options are ``OPTIONS`` (README: "EKDAA options")."""

    name = "ekdaa"
    feedback_name = "error_kernel"
    feedback_label = "error kernels E"
    uses_derivative = False
    routed_activations = ACTIVATION_CALLS  # the error map replaces each activation, module or function
    init_option = "error_kernel_init"
    glorot = "random"

    OPTIONS = (
        Option("beta", 0.9, "target step: h~ = h - beta*d", above=0),
        Option("gamma", 1.0, "error-kernel learning rate relative to W's (dE = gamma dW)", at_least=0),
        Option("error_kernel_init", "auto", "auto: matched in a network with normalisation layers, random in one "
               "without; random: Glorot, independent of W (no weight transport ever); layer-init: a fresh draw of the "
               "layer's own initialiser (nn.Conv2d/nn.Linear's default), independent of W but on its initial scale; "
               "matched: uniform with W's own RMS at conversion, independent of W's values; transpose: E starts as a "
               "copy of W (the authors' code)", choices=("auto", "random", "layer-init", "matched", "transpose")),
        Option("pool_routing", "max", "through max-pools, max sends d to the winning unit; bilinear upsamples "
               "d to the pool's input (the authors' code)", choices=("max", "bilinear")),
        Option("error_norm", "none", "max: divide each sample's d by max|d| when > 1 (the authors' code, conv "
               "layers); relative: multiply it by the RMS of the sample's h (beta on h's scale)",
               choices=("none", "max", "relative")),
        Option("target_function", "activation", "activation: target f(h - beta*d), the paper's; smooth: "
               "target and error map through g = tanh(u/tau) for sign (hardtanh, relu6: by their bounds), "
               "not the paper's", choices=("activation", "smooth")),
        Option("tau", 1.0, "temperature of the smooth target's g", above=0),
        Option("error_map", "auto", "one-sided: e = f(h) - f(h - beta*d), the paper's; centered: e = f(h + beta*d/2) - "
               "f(h - beta*d/2), whose curvature bias cancels (not the paper's); auto: one-sided for tanh, sign and "
               "piecewise-linear activations, centered for the others (sigmoid, GELU, SiLU, Hardswish, softmax, ...)",
               choices=("auto", "one-sided", "centered")),
        NORM_BACKWARD,
        Option("loss_reduction", "mean", "mean if the loss averages over the batch (F.cross_entropy's "
               "default), sum if it sums", choices=("mean", "sum"), train=False),
        Option("fuse", True, "form the error map in one fused pass written over h (on a GPU, and large CPU "
               "tensors); False: eagerly, into a new tensor (for retain_graph=True, or to compare)", train=False),
    )

    @property
    def feedback_lr_scale(self) -> float:  # type: ignore[override]
        return self.gamma

    def convert_weight(self, path: str, module: nn.Module, name: str = "weight") -> None:
        weight = getattr(module, name)
        if self.error_kernel_init == "transpose":
            kernel = weight.detach().clone()
        else:
            kernel = random_feedback(weight, self.error_kernel_init)
        self.attach_feedback(module, name, kernel, learned=self.gamma > 0)

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.batch: int | None = None  # the model input's batch size, at each forward where calls are routed

    def convert_activation(self, path: str, module: nn.Module) -> nn.Module:
        self.calls_routed = self.calls_routed or isinstance(module, Called)
        if self.target_function == "activation":
            return ErrorMap(module, self)
        if smooth_stand_in(module, self.tau) is None:
            raise ConversionError(
                f"target_function 'smooth' needs a Sign, Hardtanh or ReLU6 activation, but '{path or '<root>'}' "
                f"is {type(module).__name__}: use target_function 'activation' there")
        return ErrorMap(module, self, self.tau)

    calls_routed = False

    def wants_start(self) -> bool:
        return self.calls_routed

    def start_forward(self, args: tuple) -> None:
        self.batch = next((a.shape[0] for a in args if isinstance(a, Tensor) and a.dim()), None)

    def convert_pool(self, path: str, module: nn.Module) -> nn.Module:
        if type(module) is not nn.MaxPool2d or module.return_indices:
            return module
        if self.pool_routing == "bilinear":
            return BilinearRoutedPool(module, self)
        return memory.MaxPool2d.convert(module)
