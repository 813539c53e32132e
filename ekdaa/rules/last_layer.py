"""The floor: train the output layer only.

Every hidden layer stays at its random initialisation and only the output layer
learns, from e_L = softmax(h_L) - onehot(y):

    dW_L = e_L (x) z_{L-1},   dW_l = 0 for l < L

Any rule that trains the hidden layers must beat this; a rule that does worse has
made its random features worse. It evaluates no derivative, so ``Sign`` networks run.
The output layer is the last Conv2d/Linear the model registers; every other parameter
(hidden weight layers, normalisation layers' scale and shift) gets ``requires_grad=False``
(so optimizers, weight decay and DistributedDataParallel leave them alone). Normalisation
layers still track their running statistics in training mode, as under every rule.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import Rule


class LastLayer(Rule):
    """Train only the output layer (hidden layers frozen at initialisation)."""

    name = "last-layer"
    uses_derivative = False
    routes_weights = False  # no error travels below the output layer, through any weight or activation

    def convert_weight(self, path: str, module: nn.Module, name: str = "weight") -> None:
        self.attach_feedback(module, name, None, learned=None)

    def feedback(self, module: nn.Module, name: str = "weight") -> None:
        return None

    def convert(self, model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
        model = super().convert(model, example_input)
        *_, output = [m for m in model.modules() if getattr(m, "rule", None) is self]
        model.requires_grad_(False)
        output.requires_grad_(True)
        return model

    def unconvert(self, model: nn.Module) -> None:
        model.requires_grad_(True)  # the hidden layers this rule froze
