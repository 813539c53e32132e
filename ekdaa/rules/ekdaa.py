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

Smooth target (``target_function='smooth'``, for sign and hardtanh-like f; not the
paper's equation, a variant named as such): the target and the error map are formed
through a smooth stand-in g of f, e = g(h) - g(h~), with g(u) = tanh(u / tau) for sign
(in general g(u) = m + r tanh((u - m) / (r tau)) for an f that clips to [m - r, m + r]).
Only g is evaluated, never a derivative, and d = 0 gives e = 0 exactly. For small beta,
e ~ beta g'(h) d: a straight-through-style pseudo-derivative g'(h), reached without
evaluating one. The literal error map z - f(h~) of a sign unit is 0 or +-2 whatever the size of d.

Implementation: a weight layer keeps its forward and sends its error map down
through its *error kernel* E (``error_kernel``, a Parameter of W's shape whose
``.grad`` is dW). Each activation module becomes an :class:`ErrorMap` whose
backward turns the arriving d into the error map e, in one fused pass (on a GPU at any
size, on the CPU on large tensors) written over the dead pre-activation h (:mod:`ekdaa.fused`;
a forward hook that keeps h sees it overwritten after backward: clone it there; for
``retain_graph=True`` set ``ekdaa.fused.ENABLED = False``). It keeps h, not z: a layer fed z
recomputes it from h in its backward, so a step keeps one activation per layer, as backprop does. gamma is E's learning rate
relative to W's: ``ekdaa.param_groups`` puts E in a group with ``lr = gamma * lr``,
which under SGD is exactly dE = gamma * dW at W's learning rate and, unlike scaling
E's gradient, stays meaningful under Adam. With gamma = 0, E is frozen.

``loss_reduction='mean'``: autograd hands the backward (softmax - onehot) / N from
a batch-mean cross-entropy; the error map rescales by N so beta acts on per-sample
errors and the result does not depend on batch size.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..fused import Fused
from ..layers import ACTIVATIONS, RECOMPUTE, Sign, activation_function, kept_input, recomputable, stochastic
from .base import NORM_BACKWARD, ConversionError, Option, Rule, random_feedback
from .calls import ACTIVATION_CALLS, Called


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


def target(h: Tensor, d: Tensor, step: float | Tensor) -> Tensor:
    """The target's pre-activation h~ = h - step * d (step: beta, times N under a batch-mean loss; a
    number, or per-sample tensors under an ``error_norm``)."""
    if isinstance(step, float) and not torch.compiler.is_compiling():
        return torch.add(h, d, alpha=-step)  # one op (compiled, torch 2.13's Inductor drops this alpha
    return h - step * d                      # where it folds d's matmul into an addmm)


def _difference(g: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    """e = (g(h) - g(h~)) * scale: the paper's error map z - f(h~) with g = f (z = f(h), recomputed
    from the h kept, or given), or the smooth target's, through its stand-in g (d = 0 gives e = 0)."""
    def error_map(h: Tensor, d: Tensor, step: float | Tensor, scale: float, z: Tensor | None = None) -> Tensor:
        return ((g(h) if z is None else z) - g(target(h, d, step))) * scale
    return error_map


def _tanh_from_output(z: Tensor, d: Tensor, step: float | Tensor, scale: float, _: None = None) -> Tensor:
    """The literal tanh error map from z alone: with t = tanh(step d), tanh(h - step d) =
    (z - t) / (1 - z t), so e = t (1 - z^2) / (1 - z t) * scale. Where z has rounded to +-1 the
    pre-activation is lost: e is 0 there (0 where 0/0)."""
    t = torch.tanh(step * d)
    den = 1 - z * t
    return torch.where(den > 0, t * (1 - z * z) / den, 0.0) * scale


def _sigmoid_from_output(z: Tensor, d: Tensor, step: float | Tensor, scale: float, _: None = None) -> Tensor:
    """The literal sigmoid error map from z alone: with m = exp(step d) - 1, sigmoid(h - step d)
    = z / (1 + (1 - z) m), so e = z (1 - z) m / (1 + (1 - z) m) * scale. Where z has rounded to 0 or
    1 the pre-activation is lost: e is 0 there (0 where 0/0; exp capped to stay finite)."""
    m = torch.expm1((step * d).clamp(max=80.0))
    den = 1 + (1 - z) * m
    return torch.where(den > 0, z * (1 - z) * m / den, 0.0) * scale


FROM_OUTPUT: dict[type[nn.Module], Callable[..., Tensor]] = {nn.Tanh: _tanh_from_output,
                                                             nn.Sigmoid: _sigmoid_from_output}
_KERNELS: dict[tuple, Fused] = {}


def _half(t: Tensor) -> bool:
    """Whether ``t`` is in a 16-bit float type."""
    return t.dtype in (torch.float16, torch.bfloat16)


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a 16-bit float type, else as it is."""
    return t.float() if _half(t) else t


def _in_float32(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` taking its small difference in float32 and returning the input's dtype: eagerly at the
    cost of casts in and one out; fused, in registers (and where torch.compile runs the function
    eagerly after all, e.g. under a TorchDispatchMode, tanh_by_exp in bf16 would lose e altogether)."""
    def error_map(x: Tensor, d: Tensor, step: float | Tensor, scale: float, z: Tensor | None = None) -> Tensor:
        if not _half(x):
            return fn(x, d, step, scale, z)
        return fn(x.float(), d.float(), step, scale).to(x.dtype)  # a 16-bit z is never given: see backward
    return error_map


def _error_map_fn(activation: nn.Module, tau: float | None, from_output: bool,
                  tanh: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    """The pure elementwise error map of ``activation``, with ``tanh`` where it takes the difference
    of two tanh values (the from-output form scales e by tanh(beta d) itself: it keeps torch.tanh)."""
    if from_output:
        return FROM_OUTPUT[type(activation)]
    if tau is not None:
        return _difference(smooth_stand_in(activation, tau, tanh))
    return _difference(tanh if isinstance(activation, nn.Tanh) else activation_function(activation, mean=True))


def error_map_kernel(activation: nn.Module, tau: float | None, from_output: bool) -> Fused:
    """The error map of ``activation`` (through its smooth stand-in if ``tau`` is given; from
    its output alone if ``from_output``): ``kernel(x, d, step, scale, z=None)`` with x = h (z if
    ``from_output``; z = f(h) where already computed, literal target only), as one fused pass (on a
    GPU at any size, on the CPU on large tensors), shared by every layer with the same activation
    (torch's activations and calls: by type and arguments; a subclass or a parametric one: its own);
    fused, a difference of two tanh values evaluates them as :func:`tanh_by_exp`."""
    shared = type(activation) in (*ACTIVATIONS, Called) and not any(True for _ in activation.parameters())
    key = (type(activation), activation.extra_repr(), tau, from_output) if shared else None
    if key not in _KERNELS:
        # from_output: z is the layer's output, which its user may hold: into a new tensor
        kernel = Fused(_in_float32(_error_map_fn(activation, tau, from_output, torch.tanh)),
                       f"EKDAA's error map ({type(activation).__name__})", overwrite=not from_output,
                       fused_fn=_in_float32(_error_map_fn(activation, tau, from_output, tanh_by_exp)))
        if key is None:
            return kernel
        _KERNELS[key] = kernel
    return _KERNELS[key]


class _ErrorMapFn(torch.autograd.Function):
    """z = f(h) forward, keeping h (z with ``error_map_from='output'``); backward maps the arriving d
    to the error map e (``kernel``), written over h, which is dead by then, where h is a layer's own
    output (not input data, not a view, not an argument of a function call, which its caller may still
    use). z itself is never kept: a layer fed z recomputes it from this h
    (:func:`ekdaa.layers.recompute`), and leaves it here for the error map. The activation's own
    parameters (PReLU's slope) learn from d, the error that reaches its output, as a bias does."""

    @staticmethod
    def forward(ctx, h: Tensor, error_map: "ErrorMap", *params: Tensor) -> Tensor:
        z = error_map.forward_f(h)
        ctx.error_map = error_map
        # the batch: h's first dimension, or, for a call inside a module (attention's softmax, whose first
        # dimension may hold the heads too), the model input's
        ctx.batch = error_map.rule.batch if error_map.called and error_map.rule.batch else h.shape[0]
        if error_map.from_output:  # the memory of backprop, whatever follows; e goes to a new tensor
            ctx.fuse = True
            ctx.save_for_backward(z)
            return z
        # over h only where h is a layer's fresh output, not data or a view (compiled: the compiler decides)
        ctx.fuse = not (error_map.called or torch.compiler.is_compiling()) and h.grad_fn is not None and h._base is None
        ctx.h = ctx.z = None  # h and z, once a layer fed z has looked them up (ekdaa.layers.recompute)
        if error_map.forward_f is error_map.f:  # z = f(h) again (not for a random draw: the layer keeps its z)
            setattr(ctx, RECOMPUTE, error_map.f)
        ctx.save_for_backward(h)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):
        m: ErrorMap = ctx.error_map
        x = ctx.saved_tensors[0] if m.from_output else kept_input(ctx)  # z, or h (once per backward)
        params = ()
        if any(ctx.needs_input_grad[2:]):  # d (x) df/dparam: the activation's parameters' local update
            with torch.enable_grad():
                own = tuple(m.activation.parameters())
                params = torch.autograd.grad(m.f(x.detach()), own, grad, allow_unused=True)
        rule = m.rule
        n = ctx.batch if rule.loss_reduction == "mean" else 1  # grad = d / n under a batch-mean loss
        step = rule.beta * n  # h~ = h - beta * d = h - step * grad
        if rule.error_norm != "none":
            per_sample = dict(dim=tuple(range(1, grad.dim())), keepdim=True)
            if rule.error_norm == "max":  # d / max(1, max|d|), per sample
                step = step / (_wide(grad.abs().amax(**per_sample)) * n).clamp_min(1.0)
            else:  # relative: d * rms(h), per sample: beta on the pre-activation's scale
                step = step * _wide(x).square().mean(**per_sample).sqrt()
        z = getattr(ctx, "z", None)
        ctx.h = ctx.z = None  # freed with this backward, not with the graph
        # a recomputed z saves the kernel an f(h): worth a read on the CPU, not on a GPU; a 16-bit z would
        # bring its rounding (2^-9 of z) into e's small difference, which the kernel forms in float32
        if not m.literal or x.device.type != "cpu" or z is not None and _half(z):
            z = None
        error_map = m.kernel if ctx.fuse else m.kernel.fn  # over h (fused where it pays), or into a new tensor
        return error_map(x, grad, step, 1 / n, z), None, *params


class ErrorMap(nn.Module):
    """An activation whose backward is EKDAA's error map (forward unchanged), formed through
    the activation itself or, with ``tau``, through its smooth stand-in. f, the target function and
    ``error_map_from`` are fixed at conversion; beta, ``error_norm`` and ``loss_reduction`` are read
    from the rule at each backward (a schedule may change beta)."""

    def __init__(self, activation: nn.Module, rule: "EKDAA", tau: float | None = None):
        super().__init__()
        self.activation = activation
        self.rule = rule
        self.f = activation_function(activation, mean=True)  # the target's f
        self.forward_f = self.f if not stochastic(activation) else activation_function(activation)
        self.called = isinstance(activation, Called)  # applied as a function in a module's forward
        self.parametric = any(True for _ in activation.parameters())  # PReLU
        self.from_output = rule.error_map_from == "output"
        # e = z - f(h~): takes a z already computed; a target drawn at random (RReLU) differs from z even
        # where d = 0, so there e = f(h) - f(h~) through the mean slope
        self.literal = tau is None and not self.from_output and not stochastic(activation)
        self.kernel = error_map_kernel(activation, tau, self.from_output)

    def forward(self, h: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self.activation(h)
        if self.parametric:
            return _ErrorMapFn.apply(h, self, *self.activation.parameters())
        return _ErrorMapFn.apply(h, self)

    def unconverted(self) -> nn.Module:
        return self.activation


class _MaxPoolFn(torch.autograd.Function):
    """Max-pool forward; backward sends d to the winning unit with autograd's own kernel, which
    reads the winners' indices and only the shape of the pool's input: it keeps the indices and, for
    the shape, takes the h that the error map which made the input keeps anyway (not z)."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: "MaxPool2d") -> Tensor:
        out, indices = F.max_pool2d(x, *pool.args, pool.ceil_mode, return_indices=True)
        node, view = (recomputable(x) if x.device.type in ("cpu", "cuda") else None) or (None, None)  # MPS reads x
        ctx.pool, ctx.node = pool, node if view is None else None
        ctx.save_for_backward(x if ctx.node is None else None, indices)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, indices = ctx.saved_tensors
        like = x if ctx.node is None else kept_input(ctx.node)  # h: z's shape and layout
        pool = ctx.pool
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, like, *pool.args, pool.ceil_mode, indices), None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (converted in place) that keeps no copy of its input for backward."""

    args: tuple[list[int], ...]  # kernel size, stride, padding, dilation as aten takes them: set by convert

    @classmethod
    def convert(cls, pool: nn.MaxPool2d) -> "MaxPool2d":
        kernel = list(_pair(pool.kernel_size))
        pool.args = kernel, list(_pair(pool.stride or kernel)), list(_pair(pool.padding)), list(_pair(pool.dilation))
        pool.__class__ = cls  # in place, still an nn.MaxPool2d
        return pool

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        return _MaxPoolFn.apply(x, self)

    def unconverted(self) -> nn.Module:
        del self.args
        self.__class__ = nn.MaxPool2d
        return self


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

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        return _BilinearRouteFn.apply(x, self.pool) if torch.is_grad_enabled() else self.pool(x)

    def unconverted(self) -> nn.Module:
        return self.pool


class EKDAA(Rule):
    """Error-kernel driven activation alignment; its options are ``OPTIONS`` (README: "EKDAA options")."""

    name = "ekdaa"
    feedback_name = "error_kernel"
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
        Option("error_map_from", "pre-activation", "pre-activation: keep h and form f(h) - f(h - beta*d), "
               "exact; output (tanh, sigmoid): keep only z = f(h), backprop's memory, exact in real arithmetic, "
               "but a unit whose z has rounded to +-1 (tanh, |h| > ~9 in float32) gets no error",
               choices=("pre-activation", "output")),
        NORM_BACKWARD,
        Option("loss_reduction", "mean", "mean if the loss averages over the batch (F.cross_entropy's "
               "default), sum if it sums", choices=("mean", "sum"), train=False),
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
        if self.error_map_from == "output" and (self.target_function != "activation" or self.error_norm == "relative"):
            raise ConversionError("error_map_from 'output' forms the literal target from z alone: it takes neither "
                                  "target_function 'smooth' nor error_norm 'relative' (both need h)")

    def convert_activation(self, path: str, module: nn.Module) -> nn.Module:
        if self.error_map_from == "output" and type(module) not in FROM_OUTPUT:
            raise ConversionError(f"error_map_from 'output' needs a Tanh or Sigmoid activation, but "
                                  f"'{path or '<root>'}' is {type(module).__name__}: use 'pre-activation' there")
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
            return BilinearRoutedPool(module)
        return MaxPool2d.convert(module)
