"""How well a rule's backward agrees with backprop, per weight layer.

* feedback angle: between the tensor the error is sent down through (E, B, s*sign(W);
  W itself for ``bp``) and W. Absent (None) for ``dfa``, which sends nothing through W.
* update angle: between the rule's update (the ``.grad`` a converted model's backward
  leaves) and the true gradient of the same loss, same batch, same weights (from the
  plain twin, :func:`ekdaa.unconvert`). For ``dfa`` that compares each
  layer's update with backprop's. Undefined (None, with a note) where either is zero,
  e.g. backprop's gradient below a ``Sign`` activation.
* sign flips (:class:`Tracker`, for networks with ``Sign``): per Sign layer, the fraction
  of its units on a fixed batch whose sign changed since the last look.

Angles are in degrees: 0 means the same direction, 90 orthogonal. A training run with
``track_alignment`` compares with the straight-through twin (``bp-ste``): backprop itself
wherever there is no Sign, and at Sign the standard binary-network gradient, the only
reference defined there.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Sign
from ..rules import convert, unconvert
from .runs import copy_weights, rng_preserved


def angle(a: Tensor, b: Tensor) -> float | None:
    """Angle in degrees between two tensors taken as vectors; None if either is zero."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    a, b = a / na, b / nb  # 2 atan(|a - b| / |a + b|): exact near 0 and 180, unlike acos
    return math.degrees(2 * math.atan2((a - b).norm().item(), (a + b).norm().item()))


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d/Linear (converted or not) by module path, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def feedback_tensor(layer: nn.Module) -> Tensor | None:
    """What ``layer`` sends its error down through: its rule's feedback tensor, W for an
    unconverted (or ``bp``) layer, None where nothing is sent (``dfa``)."""
    rule = getattr(layer, "rule", None)
    return layer.weight if rule is None else rule.feedback(layer)


def _weight_grads(model: nn.Module, names: list[str], x: Tensor, y: Tensor, reduction: str) -> dict[str, Tensor]:
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    grads = {}
    for name in names:
        weight = model.get_submodule(name).weight
        grads[name] = torch.zeros_like(weight) if weight.grad is None else weight.grad.clone()
    return grads


def alignment(model: nn.Module, batch: tuple[Tensor, Tensor], reference: nn.Module) -> dict[str, dict[str, Any]]:
    """Feedback and update angles of every weight layer of the converted ``model`` on ``batch``
    (normalised inputs, labels), as ``{layer: {"feedback_angle": deg, "update_angle": deg}}``
    plus a ``"note"`` where an angle is None.

    ``reference`` is the unconverted twin (e.g. ``ekdaa.unconvert(model)``); its
    weights are set to ``model``'s first. Leaves ``model``'s grads, mode and the RNG as found.
    """
    x, y = batch
    copy_weights(reference, model)
    layers = weight_layers(model)
    names = list(layers)
    reduction = getattr(getattr(model, "ekdaa_rule", None), "loss_reduction", "mean")
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    modes = [(m, m.training) for net in (model, reference) for m in net.modules()]
    try:
        with rng_preserved(x.device), torch.enable_grad():
            model.eval()
            reference.eval()
            update = _weight_grads(model, names, x, y, reduction)
            true = _weight_grads(reference, names, x, y, reduction)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        for m, training in modes:
            m.train(training)
    out: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        fb = feedback_tensor(layer)
        entry: dict[str, Any] = dict(feedback_angle=None if fb is None else angle(fb, layer.weight),
                                     update_angle=angle(update[name], true[name]))
        notes = []
        if fb is None:
            notes.append(f"rule {layer.rule.name!r} sends no error down through this layer")
        if entry["update_angle"] is None:
            notes.append("update angle undefined: " + (
                "backprop's gradient is zero here (e.g. below a Sign activation, derivative 0)"
                if true[name].count_nonzero() == 0 else "the rule's update is zero here"))
        if notes:
            entry["note"] = "; ".join(notes)
        out[name] = entry
    return out


class Tracker:
    """A look inside a converted ``model`` as it trains (``TrainConfig(track_alignment=True)``:
    every epoch), on one fixed ``batch`` (normalised inputs, labels; a run's first ``batch_size``
    training images). Each call returns ``alignment`` (:func:`alignment` against the model's
    straight-through twin) and, if the network has Sign layers, ``sign_flips``: per Sign layer,
    the fraction of its units on the batch whose sign differs from the previous call's (the first
    call: from when the tracker was made, the start of training or of its resumed part)."""

    def __init__(self, model: nn.Module, batch: tuple[Tensor, Tensor]):
        self.model, self.batch = model, batch
        self.reference = convert(unconvert(model).eval(), "bp-ste", example_input=batch[0][:2])
        self.signs = self._signs()

    def _signs(self) -> dict[str, Tensor]:
        """The output of every Sign layer on the batch, from the reference with the model's weights."""
        copy_weights(self.reference, self.model)
        out: dict[str, Tensor] = {}
        hooks = [m.register_forward_hook(lambda module, args, z, name=name: out.__setitem__(name, z))
                 for name, m in self.reference.named_modules() if isinstance(m, Sign)]
        try:
            with torch.no_grad():
                self.reference(self.batch[0])
        finally:
            for hook in hooks:
                hook.remove()
        return out

    def __call__(self) -> dict[str, Any]:
        record: dict[str, Any] = dict(alignment=alignment(self.model, self.batch, self.reference))
        signs = self._signs()
        if signs:
            record["sign_flips"] = {name: (z != self.signs[name]).double().mean().item()
                                    for name, z in signs.items()}
        self.signs = signs
        return record
