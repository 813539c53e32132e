"""Direct feedback alignment (Nøkland, 2016).

The output error e_L = dLoss/dh_L is projected by a fixed random matrix B_l
straight to the output of every hidden layer:

    e_l = f'(h_l) * (B_l e_L),   dW_l = e_l (x) z_{l-1}

Nothing is sent down through the weight layers. Implementation: every hidden activation (module, or
function routed to a module made for it) becomes a :class:`DirectFeedback` holding B_l (buffer
``feedback``, shape ``(n_outputs, *z_l.shape[1:])``, Glorot-uniform; an activation applied at several
depths holds one per use, ``feedback_1``, ...); during the forward it leaves its output z_l with the
rule, and the output layer wraps its output in a hub whose backward hands each z_l the gradient
B_l e_L. Autograd then applies f'(h_l), carries the error through whatever lies between (norms,
residual sums, attention's products) and gives each weight its update from the error at its output.

Beyond plain CNNs the hidden layers' outputs are not all activations: a weight whose input no
activation feeds (through nothing but pooling, reshapes, dropout) gets B e_L at its input too (a
MobileNet's linear bottleneck, a transformer's LayerNorm output, attention's output before its
projection), so that the error reaches every parameter (residual streams, class tokens, position
embeddings included). In a plain CNN or a ResNet every weight's input is an activation's output,
and nothing changes. Whatever runs after the output layer (a ReLU and pooling after SqueezeNet's
classifier) carries the output error to it by autograd. DFA needs ``example_input`` at conversion
to find the output layer and the shapes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers import add_to
from .base import NORM_BACKWARD, ConversionError, Rule
from .calls import ACTIVATION_CALLS, Call, Called, Discovery, discover


class _HubFn(torch.autograd.Function):
    """Identity on the output layer's output; backward sends B_l e_L to every hidden output z_l, laid out
    as z_l holds the samples (:func:`_layout`)."""

    @staticmethod
    def forward(ctx, logits: Tensor, feedbacks: tuple[tuple[Tensor, tuple[int, bool]], ...], *hidden: Tensor) -> Tensor:
        ctx.feedbacks = feedbacks
        ctx.shapes = [z.shape for z in hidden]
        return logits.clone()

    @staticmethod
    def backward(ctx, e_out: Tensor):
        n = e_out.shape[0]
        e2 = e_out.reshape(n, -1)
        sent = []
        for (b, (dim, minor)), shape in zip(ctx.feedbacks, ctx.shapes):
            g = (e2 @ b.reshape(b.shape[0], -1).to(e2.dtype)).view(n, *b.shape[1:])
            if dim is None:  # shared by the samples: the sum of what each sends
                sent.append(g.sum(0).reshape(shape))
                continue
            g = (g.transpose(0, 1) if minor else g).reshape(shape[dim], *shape[:dim], *shape[dim + 1:])
            sent.append(g.movedim(0, dim))
        return (e_out, None, *sent)


def _use_name(use: int) -> str:
    return "feedback" if use == 0 else f"feedback_{use}"


class DirectFeedback(nn.Module):
    """A hidden output that receives the output error through its own B_l: an activation's, or (wrapping
    ``nn.Identity``) a weight's input; one B_l per use in a forward (None: no delivery at that use)."""

    def __init__(self, activation: nn.Module, feedbacks: list[Tensor | None], rule: "DirectFeedbackAlignment"):
        super().__init__()
        self.activation = activation
        self.rule = rule
        self.names = [None if b is None else _use_name(u) for u, b in enumerate(feedbacks)]
        self.layout = (0, False)  # the dimension holding the samples; batch-minor there (k x batch)
        for name, b in zip(self.names, feedbacks):
            if name is not None:
                self.register_buffer(name, b)

    def forward(self, h: Tensor) -> Tensor:
        z = self.activation(h)
        if torch.is_grad_enabled() and not self.rule.plain:
            use = self.rule.use(self)
            if use >= len(self.names):
                raise RuntimeError(f"ekdaa: a DFA delivery point ({self.activation}) was used {use + 1} times in one "
                                   f"forward, {len(self.names)} at conversion: convert with an example input that "
                                   "takes the same path")
            name = self.names[use]
            if name is not None:
                self.rule.pending.append((z, (self._buffers[name], self.layout)))
        return z

    def unconverted(self) -> nn.Module:
        return self.activation


def _glorot(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return nn.init.xavier_uniform_(torch.empty(shape, dtype=dtype).view(shape[0], -1)).view(shape)


def _layout(a: Tensor | None, b: Tensor | None, n: int) -> tuple[int | None, int, bool] | None:
    """How one tensor, seen on two inputs of ``n`` samples that differ in the last one only, holds the
    samples: ``(dim, k, minor)``, the dimension along which it holds them, n x k entries there (sample =
    index // k) or, ``minor``, k x n (sample = index % n), found as the entries of the last sample,
    and only those, changed; ``(None, 1, False)`` for one shared by the samples (computed from parameters
    alone, as Swin V2's relative position bias is: it gets the sum of what the samples send); None where
    neither holds (a mixture of samples)."""
    if a is None or b is None or a.shape != b.shape:
        return None
    if torch.equal(a, b):
        return (None, 1, False) if a.requires_grad else None
    if a.dim() == 0:
        return None
    changed = a != b
    for dim in range(a.dim()):
        if a.shape[dim] % n:
            continue
        k = a.shape[dim] // n
        along = changed.movedim(dim, 0).reshape(a.shape[dim], -1).any(1)
        index = torch.arange(a.shape[dim])
        for minor, last in ((False, index // k == n - 1), (True, index % n == n - 1)):
            if along[last].any() and not along[~last].any():
                return dim, k, minor
    return None


def _fed_by_activation(x: Tensor, activations: set[Any]) -> bool:
    """Whether ``x`` is an activation's output, or reached from one by parameter-free single-input
    steps only (pooling, reshapes, dropout): then that activation's B_l already reaches it."""
    node = x.grad_fn
    while node is not None and node not in activations:
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1 or type(inputs[0]).__name__ == "AccumulateGrad":
            return False
        node = inputs[0]
    return node is not None


def _key(call: Call) -> Any:
    """How the run-time hooks name a delivery point: the module, or (module, k) for its k-th call."""
    return call.owner if call.module_form else (call.owner, call.index)


class DirectFeedbackAlignment(Rule):
    """Direct feedback alignment: fixed random projections of the output error."""

    name = "dfa"
    routed_activations = ACTIVATION_CALLS  # each activation, module or function, receives the output error
    OPTIONS = (NORM_BACKWARD,)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.used: dict[nn.Module, int] = {}

    def prepare(self, model: nn.Module, discovery: Discovery) -> None:
        if discovery.example is None:
            raise ConversionError("rule 'dfa' needs example_input= (one batch) to find the output "
                                  "layer and the shape of every hidden layer")
        # two looks at the forward, on inputs that differ in their last sample only: which tensors hold
        # the samples along their first dimension, and how (rows of the batch, or of batch x heads ...)
        first = discovery.example if len(discovery.example) > 1 else discovery.example.expand(2, *discovery.example.shape[1:])
        second = first.clone()
        second[-1] = 1 - first[-1]
        kinds = ("weight", "activation")
        calls = [c for c in discover(model, first).calls if c.kind in kinds and c.output is not None]
        others = [c for c in discover(model, second).calls if c.kind in kinds and c.output is not None]
        if [(c.owner, c.kind) for c in calls] != [(c.owner, c.kind) for c in others]:
            raise ConversionError("rule 'dfa': the model's forward took another path when one example changed; "
                                  "DFA needs the same layers at every forward")
        weights = [i for i, c in enumerate(calls) if c.kind == "weight"]
        if not weights:
            raise ConversionError("rule 'dfa': the model has no weight layer (Linear, ConvNd) or weight call")
        last = weights[-1]
        self.output = _key(calls[last])
        n_out = calls[last].output[0].numel()
        n = len(first)
        hidden, inputs = [], []
        for call, other in zip(calls[:last + 1], others):
            if call.kind == "activation":
                call.layout = _layout(call.output, other.output, n)
                if call.layout is not None:
                    hidden.append(call)
            elif call.input is not None and call.input.requires_grad:
                call.layout = _layout(call.input, other.input, n)
                if call.layout is not None:
                    inputs.append(call)
        fed = {c.output.grad_fn for c in hidden if c.output.grad_fn is not None}
        inputs = [c for c in inputs if not _fed_by_activation(c.input, fed)]
        self.activations = self._per_use(hidden, "output", n_out)
        self.inputs = self._per_use(inputs, "input", n_out)

    @staticmethod
    def _per_use(calls: list[Call], tensor: str, n_out: int) -> dict[Any, tuple[list[Tensor | None], tuple[int, bool]]]:
        """B_l for each delivery point, by use, shaped as one sample's share of its output (or input), and
        the layout the hub reads it in."""
        found: dict[Any, tuple[list[Tensor | None], tuple[int, bool]]] = {}
        for call in calls:
            t = getattr(call, tensor)
            dim, k, minor = call.layout
            uses, _ = found.setdefault(_key(call), ([], (dim, minor)))
            uses.extend([None] * (call.use + 1 - len(uses)))
            rest = t.shape if dim is None else t.movedim(dim, 0).shape[1:]
            uses[call.use] = _glorot((n_out, *([k] if k > 1 else []), *rest), t.dtype)
        return found

    def wants_start(self) -> bool:
        return True

    def start_forward(self, args: tuple) -> None:
        """A forward starts with no hidden outputs pending (one that raised midway, or a partial forward
        through some of the layers, leaves none behind) and every delivery point at its first use."""
        self.pending.clear()
        self.used.clear()

    def use(self, point: nn.Module) -> int:
        """Which use of the delivery point this is, in the current forward."""
        n = self.used.get(point, 0)
        self.used[point] = n + 1
        return n

    def _point(self, module: nn.Module, found: tuple[list[Tensor | None], tuple[int, bool]]) -> "DirectFeedback":
        point = DirectFeedback(module, found[0], self)
        point.layout = found[1]
        return point

    def _input_point(self, key: Any) -> "DirectFeedback":
        return self._point(nn.Identity(), self.inputs.pop(key))

    def convert_weight(self, path: str, module: nn.Module, name: str = "weight") -> None:
        self.attach_feedback(module, name, None, learned=None)
        if name == "weight" and module in self.inputs:
            add_to(module, "input_feedback", self._input_point(module))

    def convert_activation(self, path: str, module: nn.Module) -> nn.Module:
        key = module.key if isinstance(module, Called) else module
        return self._point(module, self.activations[key]) if key in self.activations else module

    def feedback(self, module: nn.Module, name: str = "weight") -> None:
        return None  # nothing travels down through W or any stand-in

    def layer_input(self, layer: Any, x: Tensor) -> Tensor:
        point = layer._modules.get("input_feedback") if isinstance(layer, nn.Module) else self.call_inputs.get(layer)
        if point is not None:
            point(x)
        return x

    def layer_output(self, layer: Any, h: Tensor) -> Tensor:
        if layer != self.output or not self.pending:
            return h
        hidden, feedbacks = zip(*self.pending)
        self.pending.clear()
        return _HubFn.apply(h, feedbacks, *hidden)

    def _route(self, owner: nn.Module, path: str, calls: list[Call]) -> None:
        """A module's weight calls whose input no activation feeds get their delivery point, as a child."""
        for key in [key for key in self.inputs if isinstance(key, tuple) and key[0] is owner]:
            name = f"ekdaa_input{key[1]}"
            add_to(owner, name, self._input_point(key))
            self.call_inputs[key] = owner._modules[name]
        super()._route(owner, path, calls)

    def convert(self, model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
        self.call_inputs: dict[tuple, nn.Module] = {}
        return super().convert(model, example_input)
