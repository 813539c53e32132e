"""An independent, plainly written implementation of every rule's equations.

Used only by the tests. It walks the layers of an ``nn.Sequential`` one by one
with explicit tensors: convolutions as unfold + matrix products, their
transmission as matrix products + fold, max-pool routing by scattering to the
recorded winner, average pooling by an explicit spread, bilinear routing by
explicit interpolation matrices, batch normalisation (training mode) and its backward,
residual blocks (the error splits over both branches and sums at the input), and
derivatives written out by hand. No autograd, no ``convolution_backward``. Errors are
per sample (e_L = softmax - onehot); updates are batch means. Grouped (and depthwise) convolutions are
one unfold and product per group; a softmax activation's derivative rules use its Jacobian, EKDAA its
error map like any activation's (centered by default: softmax(h + beta d / 2) - softmax(h - beta d / 2)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ekdaa


_SQRT_2_OVER_PI = (2 / torch.pi) ** 0.5


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
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        return 0.5 * h * (1 + torch.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h ** 3)))
    if isinstance(act, nn.GELU):
        return 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    if isinstance(act, nn.SiLU):
        return h / (1 + torch.exp(-h))
    if isinstance(act, nn.Hardswish):
        return h * (h + 3).clamp(0, 6) / 6
    if isinstance(act, nn.Hardsigmoid):
        return (h + 3).clamp(0, 6) / 6
    if isinstance(act, nn.Softmax):
        p = torch.exp(h - h.amax(act.dim, keepdim=True))
        return p / p.sum(act.dim, keepdim=True)
    raise NotImplementedError(type(act))


def _smooth(act: nn.Module, u: Tensor, tau: float) -> Tensor:
    """The smooth stand-in for a clipping activation: tanh scaled onto its range."""
    lo, hi = (-1.0, 1.0) if isinstance(act, ekdaa.Sign) else (act.min_val, act.max_val)
    centre, half_width = (lo + hi) / 2, (hi - lo) / 2
    return centre + half_width * torch.tanh((u - centre) / (half_width * tau))


def _df(act: nn.Module, h: Tensor) -> Tensor:
    """f'(h), elementwise (softmax: see _backprop_activation)."""
    if isinstance(act, nn.Tanh):
        return 1 - torch.tanh(h) ** 2
    if isinstance(act, nn.ReLU):
        return (h > 0).to(h.dtype)
    if isinstance(act, nn.Sigmoid):
        s = 1 / (1 + torch.exp(-h))
        return s * (1 - s)
    if isinstance(act, ekdaa.Sign):  # the saturated straight-through pseudo-derivative
        return (h.abs() <= 1).to(h.dtype)
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        u = _SQRT_2_OVER_PI * (h + 0.044715 * h ** 3)
        return 0.5 * (1 + torch.tanh(u)) + 0.5 * h * (1 - torch.tanh(u) ** 2) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * h ** 2)
    if isinstance(act, nn.GELU):
        return 0.5 * (1 + torch.erf(h / 2 ** 0.5)) + h * torch.exp(-h ** 2 / 2) / (2 * torch.pi) ** 0.5
    if isinstance(act, nn.SiLU):
        s = 1 / (1 + torch.exp(-h))
        return s * (1 + h * (1 - s))
    if isinstance(act, nn.Hardswish):
        return torch.where(h < -3, 0.0, torch.where(h > 3, 1.0, (2 * h + 3) / 6))
    if isinstance(act, nn.Hardsigmoid):
        return ((h > -3) & (h < 3)).to(h.dtype) / 6
    raise NotImplementedError(type(act))


def _backprop_activation(act: nn.Module, h: Tensor, z: Tensor, d: Tensor) -> Tensor:
    """J(h)^T d: elementwise f'(h) d, or for a softmax z (d - sum(z d))."""
    if isinstance(act, nn.Softmax):
        return z * (d - (z * d).sum(act.dim, keepdim=True))
    return _df(act, h) * d


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


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class Scale(nn.Module):
    """Layer scale: x times a per-channel parameter the module holds."""

    def __init__(self, dim: int, value: float):
        super().__init__()
        self.layer_scale = nn.Parameter(torch.full((dim,), value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.layer_scale


class Tokens(nn.Module):
    """(N, C, H, W) -> (N, 1 + HW, C): a class token first, plus a position embedding (parameters it holds)."""

    def __init__(self, dim: int, tokens: int):
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)
        return torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.position


class First(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


class Add(nn.Module):
    """x + branch(x)"""

    def __init__(self, *branch: nn.Module):
        super().__init__()
        self.branch = nn.Sequential(*branch)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class Gate(Add):
    """x * branch(x) (squeeze-excitation)"""

    def forward(self, x: Tensor) -> Tensor:
        return x * self.branch(x)


class Concat(Add):
    """[x, branch(x)] along the channels (DenseNet)"""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.branch(x)], 1)


def transmit_of(model: nn.Module) -> dict[str, Tensor]:
    """What each weight of a model (converted, or plain) sends the error down through, by module path, as
    its rule says (:meth:`ekdaa.rules.Rule.feedback`): W where no rule converted it, or where the rule
    sends nothing (dfa: the reference ignores it there); an attention module's input projection at its
    own path."""
    rule = getattr(model, "ekdaa_rule", None)
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            sent = m.rule.feedback(m) if hasattr(m, "rule") else None
            out[path] = (m.weight if sent is None else sent).detach()
        elif isinstance(m, nn.MultiheadAttention):
            sent = rule.feedback(m, "in_proj_weight") if rule is not None and rule.routes_weights else None
            out[path] = (m.in_proj_weight if sent is None else sent).detach()
    return out


def reference_grads(layers: list, rule: str, x: Tensor, y: Tensor, *, beta: float = 0.9,
                    pool_routing: str = "max", error_norm: str = "none",
                    target_function: str = "activation", tau: float = 1.0, norm_backward: str = "autograd",
                    error_map: str = "auto",
                    transmit: dict | None = None, direct: dict | None = None) -> dict[str, Tensor]:
    """Per-parameter updates of ``rule`` for the plain layer list ``layers`` (modules, or
    :class:`Residual` blocks).

    ``transmit[path]``: the tensor a weight layer sends error down through (W, B, E,
    s*sign(W)); ``direct[path]``: DFA's B for the activation at that path (DFA's weight
    layers send nothing: an activation gets f'(h) (B e_L + whatever reaches it through a
    skip connection)). ``bp-ste`` is ``bp`` with the pseudo-derivative 1[|h| <= 1] at Sign.
    ``norm_backward="inverse-std"``: the error crosses a BatchNorm divided by sigma only.
    ``error_map``: EKDAA's e = z - f(h - beta d) (one-sided) or f(h + beta d / 2) - f(h - beta d / 2)
    (centered); auto: one-sided for tanh, sign, ReLU, hardtanh, centered for the others.
    Keys of the result are ``"{path}.weight"``, ``"{path}.bias"``; paths of a plain list
    are the indices.
    """
    ctx = dict(rule=rule, beta=beta, pool_routing=pool_routing, error_norm=error_norm,
               target_function=target_function, tau=tau, norm_backward=norm_backward, error_map=error_map,
               n=x.shape[0], grads={},
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
        elif isinstance(layer, nn.Conv2d):  # each group of channels its own unfold and product
            k, s, p, g = layer.kernel_size[0], layer.stride[0], layer.padding[0], layer.groups
            ho = (a.shape[2] + 2 * p - k) // s + 1
            wo = (a.shape[3] + 2 * p - k) // s + 1
            outs = []
            for i, (xg, wg) in enumerate(zip(a.chunk(g, 1), layer.weight.chunk(g, 0))):
                cols = F.unfold(xg, k, padding=p, stride=s)
                outs.append((wg.reshape(wg.shape[0], -1) @ cols).reshape(n, -1, ho, wo))
            out = torch.cat(outs, 1)
            if layer.bias is not None:
                out = out + layer.bias.view(1, -1, 1, 1)
        elif isinstance(layer, nn.Linear):
            out = a @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)
        elif isinstance(layer, Add):
            sub = _forward(list(layer.branch), a, f"{path}.branch.")
            g = sub[-1][3]
            out = a * g if isinstance(layer, Gate) else torch.cat([a, g], 1) if isinstance(layer, Concat) else a + g
        elif isinstance(layer, Permute):
            out = a.permute(*layer.dims)
        elif isinstance(layer, Scale):
            out = a * layer.layer_scale
        elif isinstance(layer, Tokens):
            t = a.flatten(2).transpose(1, 2)
            out = torch.cat([layer.class_token.expand(n, -1, -1), t], 1) + layer.position
        elif isinstance(layer, First):
            out = a[:, 0]
        elif isinstance(layer, nn.LayerNorm):  # over the last dimension
            sigma = torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + layer.eps)
            x_hat = (a - a.mean(-1, keepdim=True)) / sigma
            out, sub = layer.weight * x_hat + layer.bias, (x_hat, sigma)
        elif isinstance(layer, SelfAttention):
            out, sub = _attention(layer.attention, a)
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
            k, s, p, g = layer.kernel_size[0], layer.stride[0], layer.padding[0], layer.groups
            e = d.reshape(n, layer.out_channels, -1)
            transmit = None if ctx["rule"] == "dfa" else ctx["transmit"][path]
            dws, ds = [], []
            for i, (xg, eg) in enumerate(zip(inp.chunk(g, 1), e.chunk(g, 1))):
                cols = F.unfold(xg, k, padding=p, stride=s)
                dws.append((eg @ cols.transpose(1, 2)).mean(0))
                if transmit is not None:
                    t = transmit.chunk(g, 0)[i].reshape(eg.shape[1], -1)
                    ds.append(F.fold(t.t() @ eg, inp.shape[2:], k, padding=p, stride=s))
            grads[f"{path}.weight"] = torch.cat(dws, 0).reshape(layer.weight.shape)
            if layer.bias is not None:
                grads[f"{path}.bias"] = e.sum(2).mean(0)
            d = torch.zeros_like(inp) if transmit is None else torch.cat(ds, 1)
        elif isinstance(layer, nn.Linear):  # any leading dimensions: every position a sample of the product
            d2, x2 = d.reshape(-1, d.shape[-1]), inp.reshape(-1, inp.shape[-1])
            grads[f"{path}.weight"] = d2.t() @ x2 / n
            if layer.bias is not None:
                grads[f"{path}.bias"] = d2.sum(0) / n
            d = torch.zeros_like(inp) if ctx["rule"] == "dfa" else d @ ctx["transmit"][path]
        elif isinstance(layer, Add):
            g = sub[-1][3]
            if isinstance(layer, Gate):  # g broadcast over the positions: its error summed over them
                d = d * g + _backward(sub, (d * inp).sum((2, 3), keepdim=True) if g.dim() == 4 and g.shape[2:] == (1, 1)
                                      else d * inp, ctx)
            elif isinstance(layer, Concat):
                d = d[:, :inp.shape[1]] + _backward(sub, d[:, inp.shape[1]:], ctx)
            else:
                d = d + _backward(sub, d, ctx)
        elif isinstance(layer, Permute):
            d = d.permute(*torch.tensor(layer.dims).argsort().tolist())
        elif isinstance(layer, Scale):
            grads[f"{path}.layer_scale"] = (d * inp).reshape(-1, inp.shape[-1]).sum(0) / n
            d = d * layer.layer_scale
        elif isinstance(layer, Tokens):
            grads[f"{path}.class_token"] = d[:, :1].sum(0, keepdim=True) / n
            grads[f"{path}.position"] = d.sum(0, keepdim=True) / n
            d = d[:, 1:].transpose(1, 2).reshape(inp.shape)
        elif isinstance(layer, First):
            spread = torch.zeros_like(inp)
            spread[:, 0] = d
            d = spread
        elif isinstance(layer, nn.LayerNorm):
            x_hat, sigma = sub
            grads[f"{path}.weight"] = (d * x_hat).reshape(-1, d.shape[-1]).sum(0) / n
            grads[f"{path}.bias"] = d.reshape(-1, d.shape[-1]).sum(0) / n
            if ctx["norm_backward"] == "inverse-std":
                d = d / sigma
            else:
                gd = layer.weight * d
                d = (gd - gd.mean(-1, keepdim=True) - x_hat * (gd * x_hat).mean(-1, keepdim=True)) / sigma
        elif isinstance(layer, SelfAttention):
            d = _attention_backward(layer.attention, inp, sub, d, path, ctx)
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


def _heads(t: Tensor, heads: int) -> Tensor:
    """(N, L, E) -> (N, heads, L, E / heads)"""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _merged(t: Tensor) -> Tensor:
    """(N, heads, L, E / heads) -> (N, L, E)"""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def _attention(mha: nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, dict]:
    """Self-attention written out: projections, scaled scores per head, softmax, weighted sum, output."""
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q, k, v = (_heads(x @ w.t() + b, mha.num_heads) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    a = p / p.sum(-1, keepdim=True)
    o = _merged(a @ v)
    return o @ mha.out_proj.weight.t() + mha.out_proj.bias, dict(q=q, k=k, v=v, s=s, a=a, o=o, scale=scale)


def _attention_backward(mha: nn.MultiheadAttention, x: Tensor, r: dict, d: Tensor, path: str, ctx: dict) -> Tensor:
    """The error at the attention's input; its projections' updates into ctx: the output projection sends d
    down through its transmit tensor, the products of activations carry it as their derivatives do, the
    softmax is an activation (EKDAA's error map, or its Jacobian), the input projection sends through its own."""
    n, grads, heads = ctx["n"], ctx["grads"], mha.num_heads
    d2, o2 = d.reshape(-1, d.shape[-1]), r["o"].reshape(-1, d.shape[-1])
    grads[f"{path}.attention.out_proj.weight"] = d2.t() @ o2 / n
    grads[f"{path}.attention.out_proj.bias"] = d2.sum(0) / n
    d_o = _heads(d @ ctx["transmit"][f"{path}.attention.out_proj"], heads)
    d_a = d_o @ r["v"].transpose(-2, -1)
    d_v = r["a"].transpose(-2, -1) @ d_o
    if ctx["rule"] == "ekdaa":
        softmax = nn.Softmax(-1)
        if _centered(softmax, ctx):
            e_s = _f(softmax, r["s"] + ctx["beta"] * d_a / 2) - _f(softmax, r["s"] - ctx["beta"] * d_a / 2)
        else:
            e_s = r["a"] - _f(softmax, r["s"] - ctx["beta"] * d_a)
    else:
        e_s = r["a"] * (d_a - (r["a"] * d_a).sum(-1, keepdim=True))
    d_q = e_s @ r["k"] * r["scale"]
    d_k = e_s.transpose(-2, -1) @ r["q"] * r["scale"]
    e_in = torch.cat([_merged(t) for t in (d_q, d_k, d_v)], -1)
    e2, x2 = e_in.reshape(-1, e_in.shape[-1]), x.reshape(-1, x.shape[-1])
    grads[f"{path}.attention.in_proj_weight"] = e2.t() @ x2 / n
    grads[f"{path}.attention.in_proj_bias"] = e2.sum(0) / n
    return e_in @ ctx["transmit"][f"{path}.attention"]


def _centered(layer: nn.Module, ctx: dict) -> bool:
    """Whether EKDAA's error map at ``layer`` is centered."""
    if ctx["error_map"] == "auto":
        return not isinstance(layer, (nn.Tanh, ekdaa.Sign, nn.ReLU, nn.Hardtanh))
    return ctx["error_map"] == "centered"


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
        if _centered(layer, ctx):
            return _f(layer, h + beta * d / 2) - _f(layer, h - beta * d / 2)
        return z - _f(layer, h - beta * d)
    if rule == "dfa":
        b = ctx["direct"][path]
        return _backprop_activation(layer, h, z, (ctx["e_out"] @ b.reshape(b.shape[0], -1)).reshape(z.shape) + d)
    return _backprop_activation(layer, h, z, d)
