"""An independent, plainly written implementation of every rule's equations.

Used only by the tests. It walks the layers of an ``nn.Sequential`` one by one
with explicit tensors: convolutions as unfold + matrix products, their
transmission as matrix products + fold, max-pool routing by scattering to the
recorded winner, average pooling by an explicit spread, bilinear routing by
explicit interpolation matrices, batch normalisation (training mode) and its backward,
residual blocks (the error splits over both branches and sums at the input), and
derivatives written out by hand. No autograd, no ``convolution_backward``. Errors are
per sample (e_L = softmax - onehot); updates are batch means.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ekdaa


def _f(act: nn.Module, h: Tensor) -> Tensor:
    if isinstance(act, nn.Tanh):
        return torch.tanh(h)
    if isinstance(act, ekdaa.Sign):
        return torch.sign(h)
    if isinstance(act, nn.ReLU):
        return h.clamp_min(0)
    if isinstance(act, nn.Sigmoid):
        return 1 / (1 + torch.exp(-h))
    if isinstance(act, nn.Hardtanh):  # ReLU6 too
        return h.clamp(act.min_val, act.max_val)
    raise NotImplementedError(type(act))


def _smooth(act: nn.Module, u: Tensor, tau: float) -> Tensor:
    """The smooth stand-in for a clipping activation: tanh scaled onto its range."""
    lo, hi = (-1.0, 1.0) if isinstance(act, ekdaa.Sign) else (act.min_val, act.max_val)
    centre, half_width = (lo + hi) / 2, (hi - lo) / 2
    return centre + half_width * torch.tanh((u - centre) / (half_width * tau))


def _df(act: nn.Module, h: Tensor) -> Tensor:
    if isinstance(act, nn.Tanh):
        return 1 - torch.tanh(h) ** 2
    if isinstance(act, nn.ReLU):
        return (h > 0).to(h.dtype)
    if isinstance(act, ekdaa.Sign):  # the saturated straight-through pseudo-derivative
        return (h.abs() <= 1).to(h.dtype)
    raise NotImplementedError(type(act))


def _interp_matrix(n_out: int, n_in: int) -> Tensor:
    """Rows: output positions; bilinear weights (align_corners=False) on inputs."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w1 = src - i0
        m[i, i0] += 1 - w1
        m[i, i1] += w1
    return m


@dataclass
class Residual:
    """A residual block for the reference: out = act(branch(x) + shortcut(x)); an empty
    shortcut is the identity. Parameter paths: ``{i}.branch.{j}``, ``{i}.shortcut.{j}``."""

    branch: list
    shortcut: list
    act: nn.Module


def reference_grads(layers: list, rule: str, x: Tensor, y: Tensor, *, beta: float = 0.9,
                    pool_routing: str = "max", error_norm: str = "none",
                    target_function: str = "activation", tau: float = 1.0, norm_backward: str = "autograd",
                    transmit: dict | None = None, direct: dict | None = None) -> dict[str, Tensor]:
    """Per-parameter updates of ``rule`` for the plain layer list ``layers`` (modules, or
    :class:`Residual` blocks).

    ``transmit[path]``: the tensor a weight layer sends error down through (W, B, E,
    s*sign(W)); ``direct[path]``: DFA's B for the activation at that path (DFA's weight
    layers send nothing: an activation gets f'(h) (B e_L + whatever reaches it through a
    skip connection)). ``bp-ste`` is ``bp`` with the pseudo-derivative 1[|h| <= 1] at Sign.
    ``norm_backward="inverse-std"``: the error crosses a BatchNorm divided by sigma only.
    Keys of the result are ``"{path}.weight"``, ``"{path}.bias"``; paths of a plain list
    are the indices.
    """
    ctx = dict(rule=rule, beta=beta, pool_routing=pool_routing, error_norm=error_norm,
               target_function=target_function, tau=tau, norm_backward=norm_backward, n=x.shape[0], grads={},
               transmit={str(k): v for k, v in (transmit or {}).items()},
               direct={str(k): v for k, v in (direct or {}).items()})
    records = _forward(layers, x, "")
    logits = records[-1][3]
    ctx["e_out"] = torch.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    _backward(records, ctx["e_out"], ctx)
    return ctx["grads"]


def _forward(layers: list, a: Tensor, prefix: str) -> list[tuple]:
    """(path, layer, input, output, sub-records of a residual block) of each layer, in order."""
    records = []
    n = a.shape[0]
    for i, layer in enumerate(layers):
        path, sub = f"{prefix}{i}", None
        if isinstance(layer, Residual):
            branch = _forward(layer.branch, a, f"{path}.branch.")
            shortcut = _forward(layer.shortcut, a, f"{path}.shortcut.")
            h = branch[-1][3] + (shortcut[-1][3] if shortcut else a)
            out, sub = _f(layer.act, h), (branch, shortcut, h)
        elif isinstance(layer, nn.Conv2d):
            k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
            cols = F.unfold(a, k, padding=p, stride=s)
            ho = (a.shape[2] + 2 * p - k) // s + 1
            wo = (a.shape[3] + 2 * p - k) // s + 1
            out = (layer.weight.reshape(layer.out_channels, -1) @ cols).reshape(n, -1, ho, wo)
            if layer.bias is not None:
                out = out + layer.bias.view(1, -1, 1, 1)
        elif isinstance(layer, nn.Linear):
            out = a @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):  # training mode: batch statistics
            dims = (0,) if a.dim() == 2 else (0, 2, 3)
            shape = (1, -1) if a.dim() == 2 else (1, -1, 1, 1)
            mean, var = a.mean(dims, keepdim=True), a.var(dims, unbiased=False, keepdim=True)
            x_hat = (a - mean) / torch.sqrt(var + layer.eps)
            out = layer.weight.view(shape) * x_hat + layer.bias.view(shape)
            sub = (x_hat, torch.sqrt(var + layer.eps), dims, shape)
        elif isinstance(layer, nn.MaxPool2d):
            out = F.max_pool2d(a, 2)
        elif isinstance(layer, nn.AvgPool2d):
            out = F.avg_pool2d(a, 2)
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            out = a.mean((2, 3), keepdim=True)
        elif isinstance(layer, nn.Flatten):
            out = a.reshape(n, -1)
        else:
            out = _f(layer, a)
        records.append((path, layer, a, out, sub))
        a = out
    return records


def _backward(records: list[tuple], d: Tensor, ctx: dict) -> Tensor:
    """Send the error ``d`` at the last record's output down to the first record's input,
    filling ``ctx["grads"]``; returns the error at the input."""
    n, grads = ctx["n"], ctx["grads"]
    for path, layer, inp, out, sub in reversed(records):
        if isinstance(layer, Residual):
            branch, shortcut, h = sub
            d = _activation(layer.act, h, out, d, f"{path}.act", ctx)
            d_branch = _backward(branch, d, ctx)
            d = d_branch + (_backward(shortcut, d, ctx) if shortcut else d)
        elif isinstance(layer, nn.Conv2d):
            k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
            cols = F.unfold(inp, k, padding=p, stride=s)
            e = d.reshape(n, layer.out_channels, -1)
            grads[f"{path}.weight"] = (e @ cols.transpose(1, 2)).mean(0).reshape(layer.weight.shape)
            if layer.bias is not None:
                grads[f"{path}.bias"] = e.sum(2).mean(0)
            if ctx["rule"] == "dfa":
                d = torch.zeros_like(inp)
            else:
                t = ctx["transmit"][path].reshape(layer.out_channels, -1)
                d = F.fold(t.t() @ e, inp.shape[2:], k, padding=p, stride=s)
        elif isinstance(layer, nn.Linear):
            grads[f"{path}.weight"] = d.t() @ inp / n
            if layer.bias is not None:
                grads[f"{path}.bias"] = d.mean(0)
            d = torch.zeros_like(inp) if ctx["rule"] == "dfa" else d @ ctx["transmit"][path]
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            x_hat, sigma, dims, shape = sub
            spatial = tuple(dim for dim in dims if dim != 0)
            grads[f"{path}.weight"] = ((d * x_hat).sum(spatial) if spatial else d * x_hat).mean(0)
            grads[f"{path}.bias"] = (d.sum(spatial) if spatial else d).mean(0)
            if ctx["norm_backward"] == "inverse-std":
                d = d / sigma
            else:
                d = layer.weight.view(shape) / sigma * (d - d.mean(dims, keepdim=True)
                                                        - x_hat * (d * x_hat).mean(dims, keepdim=True))
        elif isinstance(layer, nn.MaxPool2d) and ctx["pool_routing"] == "max":
            _, idx = F.max_pool2d(inp, 2, return_indices=True)
            d = torch.zeros_like(inp).flatten(2).scatter_(2, idx.flatten(2), d.flatten(2)).view_as(inp)
        elif isinstance(layer, nn.MaxPool2d):  # bilinear routing
            mh = _interp_matrix(inp.shape[2], d.shape[2])
            mw = _interp_matrix(inp.shape[3], d.shape[3])
            d = mh @ d @ mw.t()
        elif isinstance(layer, nn.AvgPool2d):
            spread = torch.zeros_like(inp)
            ho, wo = d.shape[2], d.shape[3]
            for di in range(2):
                for dj in range(2):
                    spread[:, :, di:2 * ho:2, dj:2 * wo:2] = d / 4
            d = spread
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            d = d.expand_as(inp) / (inp.shape[2] * inp.shape[3])
        elif isinstance(layer, nn.Flatten):
            d = d.reshape(inp.shape)
        else:
            d = _activation(layer, inp, out, d, path, ctx)
    return d


def _activation(layer: nn.Module, h: Tensor, z: Tensor, d: Tensor, path: str, ctx: dict) -> Tensor:
    """The error at an activation's input, given the error ``d`` at its output."""
    n, rule, beta = ctx["n"], ctx["rule"], ctx["beta"]
    if rule == "ekdaa":
        if ctx["error_norm"] == "max":
            peak = d.abs().reshape(n, -1).amax(1).clamp_min(1).view(n, *[1] * (d.dim() - 1))
            d = d / peak
        elif ctx["error_norm"] == "relative":
            d = d * h.pow(2).reshape(n, -1).mean(1).sqrt().view(n, *[1] * (d.dim() - 1))
        if ctx["target_function"] == "smooth":
            return _smooth(layer, h, ctx["tau"]) - _smooth(layer, h - beta * d, ctx["tau"])
        return z - _f(layer, h - beta * d)
    if rule == "dfa":
        b = ctx["direct"][path]
        return _df(layer, h) * ((ctx["e_out"] @ b.reshape(b.shape[0], -1)).reshape(z.shape) + d)
    return _df(layer, h) * d
