"""Feedback alignment (Lillicrap et al., 2016).

The error travels down through a fixed random matrix B_l of W_l's shape:

    e_l = f'(h_l) * (B_{l+1}^T e_{l+1}),   dW_l = e_l (x) z_{l-1}

B_l is drawn Glorot-uniform at conversion, independently of W_l, and stored as
the buffer ``feedback`` (kept in the state_dict, never trained).
"""
from __future__ import annotations

from torch import nn

from ..layers import glorot_like
from .base import NORM_BACKWARD, Rule


class FeedbackAlignment(Rule):
    """Feedback alignment: fixed random feedback B."""

    name = "fa"
    OPTIONS = (NORM_BACKWARD,)

    def convert_weight(self, path: str, layer: nn.Module) -> None:
        self.attach_feedback(layer, glorot_like(layer.weight.detach()), learned=None)
