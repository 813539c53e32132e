"""Kolen-Pollack learning (Kolen & Pollack, 1994; Akrout et al., 2019).

The error travels down through a learned matrix B_l that receives the same update
as W_l, and the same weight decay:

    e_l = f'(h_l) * (B_{l+1}^T e_{l+1}),   dW_l = dB_l = e_l (x) z_{l-1}

so W_l - B_l shrinks by the factor (1 - lr * weight_decay) every step and B_l
converges to W_l without W ever being sent backwards. B_l starts independent of W_l
(Glorot-uniform; by the layer's own initialiser with ``feedback_init='layer-init'``; uniform with
W's RMS with ``'matched'``).
B_l (``feedback``) is a Parameter whose ``.grad`` is dW_l; ``ekdaa.param_groups`` keeps
it in W's group.
Without weight decay B_l - W_l never changes: train it with some, on W and B alike,
e.g. ``torch.optim.SGD(ekdaa.param_groups(model, lr=0.01, weight_decay=1e-3), lr=0.01)``
(``ekdaa train --weight-decay``).
"""
from __future__ import annotations

from torch import nn

from .base import RandomFeedbackRule, random_feedback


class KolenPollack(RandomFeedbackRule):
    """Kolen-Pollack: feedback B learned with W's update and weight decay."""

    name = "kolen-pollack"

    def convert_weight(self, path: str, module: nn.Module, name: str = "weight") -> None:
        self.attach_feedback(module, name, random_feedback(getattr(module, name), self.feedback_init), learned=True)
