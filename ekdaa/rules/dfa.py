"""Direct feedback alignment (Nøkland, 2016).

The output error e_L = dLoss/dh_L is projected by a fixed random matrix B_l
straight to the output of every hidden layer:

    e_l = f'(h_l) * (B_l e_L),   dW_l = e_l (x) z_{l-1}

Nothing is sent down through the weight layers. Implementation: every hidden
activation becomes a :class:`DirectFeedback` holding B_l (buffer ``feedback``, shape
``(n_outputs, *z_l.shape[1:])``, Glorot-uniform); during the forward it leaves its
output z_l with the rule, and the output layer wraps the logits in a hub whose
backward hands each z_l the gradient B_l e_L. Autograd then applies f'(h_l) and
the hidden layer's own weight gradient; the model's forward pre-hook empties the
rule's pending list, so each forward starts clean. DFA needs ``example_input`` at conversion
to find the output layer and each hidden layer's shape; each hidden activation
must be its own module instance.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers import ACTIVATIONS, FEEDBACK_CLASSES
from .base import NORM_BACKWARD, ConversionError, Rule
from .calls import ACTIVATION_CALLS


class _HubFn(torch.autograd.Function):
    """Identity on the logits; backward sends B_l e_L to every hidden output z_l."""

    @staticmethod
    def forward(ctx, logits: Tensor, feedbacks: tuple[Tensor, ...], *hidden: Tensor) -> Tensor:
        ctx.feedbacks = feedbacks
        return logits.clone()

    @staticmethod
    def backward(ctx, e_out: Tensor):
        e2 = e_out.reshape(e_out.shape[0], -1)
        sent = tuple((e2 @ b.reshape(b.shape[0], -1).to(e2.dtype)).view(e_out.shape[0], *b.shape[1:])
                     for b in ctx.feedbacks)
        return (e_out, None, *sent)


def _start_forward(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook on the converted model: a forward starts with no hidden outputs pending
    (one that raised midway, or a partial forward through some of the layers, leaves none behind)."""
    model.ekdaa_rule.pending.clear()


class DirectFeedback(nn.Module):
    """A hidden activation that receives the output error through its own B_l."""

    def __init__(self, activation: nn.Module, feedback: Tensor, rule: "DirectFeedbackAlignment"):
        super().__init__()
        self.activation = activation
        self.rule = rule
        self.register_buffer("feedback", feedback)

    def forward(self, h: Tensor) -> Tensor:
        z = self.activation(h)
        if torch.is_grad_enabled():
            self.rule.pending.append((z, self.feedback))
        return z

    def unconverted(self) -> nn.Module:
        return self.activation


class DirectFeedbackAlignment(Rule):
    """Direct feedback alignment: fixed random projections of the output error."""

    name = "dfa"
    refused_calls = ACTIVATION_CALLS  # each activation module receives the output error directly
    OPTIONS = (NORM_BACKWARD,)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.pending: list[tuple[Tensor, Tensor]] = []

    def prepare(self, model: nn.Module, example_input: Tensor | None) -> None:
        if example_input is None:
            raise ConversionError("rule 'dfa' needs example_input= (one batch) to find the output "
                                  "layer and the shape of every hidden layer")
        calls: list[tuple[nn.Module, Tensor]] = []
        hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, o)))
                 for m in model.modules() if type(m) in FEEDBACK_CLASSES or type(m) in ACTIVATIONS]
        modes = [(m, m.training) for m in model.modules()]
        try:
            with torch.no_grad():
                model.eval()(example_input)  # eval: a BatchNorm's running statistics stay as they are
        finally:
            for hook in hooks:
                hook.remove()
            for m, training in modes:
                m.train(training)
        weights = [i for i, (m, _) in enumerate(calls) if type(m) in FEEDBACK_CLASSES]
        if not weights:
            raise ConversionError("rule 'dfa': the model has no Conv2d/Linear layer")
        last = weights[-1]
        self.output_layer = calls[last][0]
        n_out = calls[last][1][0].numel()
        names = {m: n or "<root>" for n, m in model.named_modules()}
        self.hidden: dict[nn.Module, Tensor] = {}
        for i, (m, out) in enumerate(calls):
            if type(m) not in ACTIVATIONS:
                continue
            if i > last:
                raise ConversionError(f"rule 'dfa': activation '{names[m]}' runs after the output "
                                      "layer; the model must end with its output layer")
            if m in self.hidden:
                raise ConversionError(f"rule 'dfa': activation '{names[m]}' is used at several depths; "
                                      "give each hidden layer its own activation module")
            shape = (n_out, *out.shape[1:])
            self.hidden[m] = nn.init.xavier_uniform_(torch.empty(shape, dtype=out.dtype).view(n_out, -1)).view(shape)

    def convert(self, model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
        model = super().convert(model, example_input)
        model.register_forward_pre_hook(_start_forward)  # only once converted: a failed conversion leaves none
        return model

    def unconvert(self, model: nn.Module) -> None:
        for key, hook in list(model._forward_pre_hooks.items()):
            if hook is _start_forward:
                del model._forward_pre_hooks[key]

    def convert_weight(self, path: str, layer: nn.Module) -> None:
        self.attach_feedback(layer, None, learned=None)

    def convert_activation(self, path: str, module: nn.Module) -> nn.Module:
        return DirectFeedback(module, self.hidden[module], self) if module in self.hidden else module

    def feedback(self, layer: nn.Module) -> None:
        return None  # nothing travels down through W or any stand-in

    def layer_output(self, layer: nn.Module, h: Tensor) -> Tensor:
        if layer is not self.output_layer or not self.pending:
            return h
        hidden, feedbacks = zip(*self.pending)
        self.pending.clear()
        return _HubFn.apply(h, feedbacks, *hidden)
