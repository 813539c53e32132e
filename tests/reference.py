"""An independent, plainly written implementation of every rule's equations.

Used only by the tests. It walks the layers of an ``nn.Sequential`` one by one
with explicit tensors: convolutions as unfold + matrix products, their
transmission as matrix products + fold, max-pool routing by scattering to the
recorded winner, average pooling by an explicit spread, bilinear routing by
explicit interpolation matrices, and derivatives written out by hand. No
autograd, no ``convolution_backward``. Errors are per sample (e_L = softmax -
onehot); updates are batch means.
"""
from __future__ import annotations

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


def reference_grads(layers: list[nn.Module], rule: str, x: Tensor, y: Tensor, *, beta: float = 0.9,
                    pool_routing: str = "max", error_norm: str = "none",
                    target_function: str = "activation", tau: float = 1.0,
                    transmit: dict[int, Tensor] | None = None,
                    direct: dict[int, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-parameter updates of ``rule`` for the plain layer list ``layers``.

    ``transmit[i]``: the tensor layer i sends error down through (W, B, E, s*sign(W));
    ``direct[i]``: DFA's B for the activation at index i. ``bp-ste`` is ``bp`` with
    the pseudo-derivative 1[|h| <= 1] at Sign. Keys of the result are
    ``"{i}.weight"``, ``"{i}.bias"``.
    """
    n = x.shape[0]
    record = []  # (input, output) of each layer
    a = x
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
            cols = F.unfold(a, k, padding=p, stride=s)
            ho = (a.shape[2] + 2 * p - k) // s + 1
            wo = (a.shape[3] + 2 * p - k) // s + 1
            out = (layer.weight.reshape(layer.out_channels, -1) @ cols).reshape(n, -1, ho, wo)
            if layer.bias is not None:
                out = out + layer.bias.view(1, -1, 1, 1)
        elif isinstance(layer, nn.Linear):
            out = a @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)
        elif isinstance(layer, nn.MaxPool2d):
            out = F.max_pool2d(a, 2)
        elif isinstance(layer, nn.AvgPool2d):
            out = F.avg_pool2d(a, 2)
        elif isinstance(layer, nn.Flatten):
            out = a.reshape(n, -1)
        else:
            out = _f(layer, a)
        record.append((a, out))
        a = out

    e_out = torch.softmax(a, 1) - F.one_hot(y, a.shape[1]).to(a.dtype)
    grads: dict[str, Tensor] = {}
    d = e_out
    for i in reversed(range(len(layers))):
        layer, (inp, out) = layers[i], record[i]
        if isinstance(layer, nn.Conv2d):
            k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
            cols = F.unfold(inp, k, padding=p, stride=s)
            e = d.reshape(n, layer.out_channels, -1)
            grads[f"{i}.weight"] = (e @ cols.transpose(1, 2)).mean(0).reshape(layer.weight.shape)
            if layer.bias is not None:
                grads[f"{i}.bias"] = e.sum(2).mean(0)
            t = transmit[i].reshape(layer.out_channels, -1)
            d = F.fold(t.t() @ e, inp.shape[2:], k, padding=p, stride=s)
        elif isinstance(layer, nn.Linear):
            grads[f"{i}.weight"] = d.t() @ inp / n
            if layer.bias is not None:
                grads[f"{i}.bias"] = d.mean(0)
            d = d @ transmit[i]
        elif isinstance(layer, nn.MaxPool2d) and pool_routing == "max":
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
        elif isinstance(layer, nn.Flatten):
            d = d.reshape(inp.shape)
        elif rule == "ekdaa":
            if error_norm == "max":
                peak = d.abs().reshape(n, -1).amax(1).clamp_min(1).view(n, *[1] * (d.dim() - 1))
                d = d / peak
            elif error_norm == "relative":
                d = d * inp.pow(2).reshape(n, -1).mean(1).sqrt().view(n, *[1] * (d.dim() - 1))
            if target_function == "smooth":
                d = _smooth(layer, inp, tau) - _smooth(layer, inp - beta * d, tau)
            else:
                d = out - _f(layer, inp - beta * d)
        elif rule == "dfa":
            b = direct[i]
            d = _df(layer, inp) * (e_out @ b.reshape(b.shape[0], -1)).reshape(out.shape)
        else:
            d = _df(layer, inp) * d
    return grads
