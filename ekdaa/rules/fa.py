"""Feedback alignment (Lillicrap et al., 2016).

The error travels down through a fixed random matrix B_l of W_l's shape:

    e_l = f'(h_l) * (B_{l+1}^T e_{l+1}),   dW_l = e_l (x) z_{l-1}

B_l is drawn at conversion, independently of W_l (Glorot-uniform; with ``feedback_init='layer-init'``
by the layer's own initialiser; with ``'matched'`` uniform with W's RMS), and stored as the buffer
``feedback`` (kept in the state_dict, never trained).
"""
from __future__ import annotations

from torch import nn

from .base import RandomFeedbackRule, random_feedback


class FeedbackAlignment(RandomFeedbackRule):
    """Feedback alignment: fixed random feedback B."""

    name = "fa"

    def convert_weight(self, path: str, module: nn.Module, name: str = "weight") -> None:
        self.attach_feedback(module, name, random_feedback(getattr(module, name), self.feedback_init), learned=None)
