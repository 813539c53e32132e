"""Backprop with a straight-through estimator through Sign: the standard baseline for
networks with binary activations (Bengio, Leonard & Courville, 2013; the "saturated"
form of Hubara et al., 2016).

    z = sign(h) forward;   backward   e_l = 1[|h_l| <= 1] * (W_{l+1}^T e_{l+1})

sign's derivative (0 almost everywhere) is replaced by the pseudo-derivative 1[|h| <= 1];
every other module keeps autograd's backward, so this is backprop, weight transport
included. On a network without Sign it is exactly ``bp``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import Sign
from .bp import BP
from .calls import Called


class _StraightThroughSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return torch.sign(h)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return grad * (h.abs() <= 1).to(grad.dtype)


class StraightThroughSign(Sign):
    """Sign whose backward passes the error where |h| <= 1 and stops it elsewhere."""

    def __init__(self, rule: "StraightThroughBP"):
        super().__init__()
        self.rule = rule

    def forward(self, h: Tensor) -> Tensor:
        return _StraightThroughSignFn.apply(h) if torch.is_grad_enabled() and not self.rule.plain else torch.sign(h)

    def unconverted(self) -> nn.Module:
        return Sign()


class StraightThroughBP(BP):
    """Backprop; Sign gets the saturated straight-through pseudo-derivative."""

    name = "bp-ste"
    uses_derivative = False  # Sign's derivative is replaced, so Sign networks train
    routed_activations = frozenset({"sign"})  # torch.sign(x) in a forward: as the module Sign

    def convert_activation(self, path: str, module: nn.Module) -> nn.Module:
        sign = type(module) is Sign or isinstance(module, Called) and module.name == "sign"
        return StraightThroughSign(self) if sign else module
