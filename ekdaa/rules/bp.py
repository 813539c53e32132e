"""Backpropagation: plain autograd, the baseline every rule is compared with.

    e_l = f'(h_l) * (W_{l+1}^T e_{l+1}),   dW_l = e_l (x) z_{l-1}

Conversion changes nothing but refuses ``Sign`` (its derivative is zero: no layer
below it would ever learn).
"""
from __future__ import annotations

from .base import Rule


class BP(Rule):
    """Backpropagation (autograd unchanged)."""

    name = "bp"
    routes_weights = False
