"""Sign symmetry (Liao, Leibo & Poggio, 2016; Xiao et al., 2018).

The error travels down through the sign of the forward weights, scaled by a constant s_l
fixed at conversion: the layer's Glorot standard deviation, or with ``feedback_init='layer-init'``
that of nn.Conv2d / nn.Linear's default initialiser, 1 / sqrt(3 fan_in), or with ``'matched'`` W's
own RMS at conversion:

    B_l = s_l * sign(W_l),   e_l = f'(h_l) * (B_{l+1}^T e_{l+1}),   dW_l = e_l (x) z_{l-1}

Only the signs of W travel backwards, never their magnitudes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import add_to
from .base import FEEDBACK_STDS, RandomFeedbackRule, feedback_attribute


class SignSymmetry(RandomFeedbackRule):
    """Sign symmetry: feedback s * sign(W), recomputed every step."""

    name = "sign-symmetry"

    def convert_weight(self, path: str, module: nn.Module, name: str = "weight") -> None:
        self.attach_feedback(module, name, None, learned=None)
        add_to(module, feedback_attribute(name, "feedback_scale"), FEEDBACK_STDS[self.feedback_init](getattr(module, name)))

    def feedback(self, module: nn.Module, name: str = "weight") -> Tensor:
        return torch.sign(getattr(module, name).detach()) * getattr(module, feedback_attribute(name, "feedback_scale"))
