"""Functions applied inside a module's own ``forward``: found at conversion, routed while training.

A rule handles modules by type: weight layers, activation modules, norms. A module's own forward may
apply the same things as functions: ``F.relu(x)`` (DenseNet), ``x.sigmoid()`` in a gate,
``F.linear(x, self.qkv.weight)`` (Swin), attention's softmax, torch's multi-head attention,
``F.layer_norm`` after a permute (ConvNeXt's LayerNorm2d). Left alone, each would train by autograd,
that is by another rule, silently. So:

* :func:`discover` lists them before conversion: on ``example_input``, one forward under a
  :class:`~torch.overrides.TorchFunctionMode` that sees every torch function and Tensor method with
  the module whose own code applied it (:class:`Probe`); without one, from an FX trace of each
  module's own forward (its submodules left as calls).
* A module whose own forward makes calls its rule handles becomes *routed* (:func:`route`): while
  its own code runs (not its submodules'), :class:`Router` sends an activation call to a module
  made for it (:class:`Called`, a child of the module, converted like any activation module), a
  weight call (``F.linear``/``F.convNd`` with a model parameter as W) through the rule's feedback
  tensor for that parameter, and a norm call through the rule's norm backward. Composite functions
  whose parts matter (torch's multi-head attention, scaled dot-product attention, GLU) are opened
  into their parts (:data:`OPENED`), so that their softmax and projections are seen.
"""
from __future__ import annotations

import functools
import inspect
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from ..layers import (add_to, conv_geometry, feedback_product, is_activation, is_norm, is_weight_layer, restored,
                      subclass_for)

# -- what a call is ---------------------------------------------------------------------------------

#: Elementwise nonlinearities (and softmax-like ones along a dimension), by the name their functional,
#: torch and Tensor-method forms share (an in-place form's trailing underscore dropped).
ACTIVATION_CALLS = frozenset({
    "relu", "relu6", "leaky_relu", "rrelu", "elu", "celu", "selu", "gelu", "silu", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus", "softsign", "logsigmoid", "threshold",
    "hardshrink", "softshrink", "tanhshrink", "softmax", "softmin", "log_softmax", "sign", "clamp",
    "clamp_min", "clamp_max", "clip", "prelu"})
#: Calls that send the error down through their weight argument: routed through the rule's feedback.
WEIGHT_CALLS = {F.linear: None, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
#: Calls that would send the error through a parameter as a matrix, which no rule here replaces.
TRANSPORT_CALLS = frozenset({
    "matmul", "mm", "bmm", "baddbmm", "addmm", "addmv", "addbmm", "mv", "einsum", "tensordot", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "bilinear", "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell",
    "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"})
NORM_CALLS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"})

_NAMES = {"log_sigmoid": "logsigmoid", "_threshold": "threshold"}


def call_name(func: Any) -> str:
    """A torch function's, Tensor method's or method name's canonical name: an in-place form's trailing
    underscore dropped, F.logsigmoid's and F.threshold's internal names mapped."""
    name = func if isinstance(func, str) else getattr(func, "__name__", "")
    name = _NAMES.get(name, name)
    return name.rstrip("_") if name and not name.startswith("_") else name


# -- opening composite functions --------------------------------------------------------------------

def _attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` in its parts (torch's reference formulation): products of
    activations, and a softmax a rule can see."""
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = query @ key.transpose(-2, -1) * (query.size(-1) ** -0.5 if scale is None else scale)
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, -1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ value


def _glu(input: Tensor, dim: int = -1) -> Tensor:
    """``F.glu``: a * sigmoid(b) for the halves a, b of ``input``."""
    a, b = input.chunk(2, dim)
    return a * torch.sigmoid(b)


def _past_dispatch(func: Callable) -> Callable:
    """``func`` (a torch function written in Python) running its own code: its first statement
    hands the call to the torch-function machinery, which would show it as one call again."""
    if "has_torch_function" not in func.__code__.co_names:
        raise RuntimeError(f"ekdaa: torch's {func.__name__} no longer has the form this package opens; "
                           "please report this with your torch version")
    scope = {**func.__globals__, "has_torch_function": lambda *_: False}
    opened = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
    opened.__kwdefaults__ = func.__kwdefaults__
    return opened


#: Composite functions a rule needs to see into, and the same computation in parts (the multi-head
#: attention is torch's own code: the same forward, with its projections and softmax visible).
OPENED: dict[Callable, Callable] = {F.scaled_dot_product_attention: _attention, F.glu: _glu,
                                    F.multi_head_attention_forward: _past_dispatch(F.multi_head_attention_forward)}
#: Those opened only for rules that treat activations (their parts hold no weight).
OPENED_FOR_ACTIVATIONS = frozenset({F.scaled_dot_product_attention, F.glu})


# -- the module running now ---------------------------------------------------------------------------

class _Stack(threading.local):
    modules: list[nn.Module]

    def __init__(self) -> None:
        self.modules = []


_STACK = _Stack()
_USERS = [0, ()]  # how many probes or routed forwards run, and the global hooks they share
_LOCK = threading.Lock()


def _push(module: nn.Module, args: Any) -> None:
    _STACK.modules.append(module)


def _pop(module: nn.Module, args: Any, output: Any) -> None:
    _STACK.modules.pop()


class _Tracking:
    """While entered (re-entrantly), ``_STACK.modules`` holds the modules running, innermost last."""

    def __enter__(self) -> None:
        with _LOCK:
            if _USERS[0] == 0:
                _USERS[1] = (nn.modules.module.register_module_forward_pre_hook(_push),
                             nn.modules.module.register_module_forward_hook(_pop, always_call=True))
            _USERS[0] += 1

    def __exit__(self, *exc: Any) -> None:
        with _LOCK:
            _USERS[0] -= 1
            if _USERS[0] == 0:
                for handle in _USERS[1]:
                    handle.remove()
                _USERS[1] = ()


_TRACKING = _Tracking()


def _is_param_of(t: Any, params: dict[int, tuple[str, nn.Module, str]]) -> tuple[str, nn.Module, str] | None:
    """(path, holder, name) of the model parameter ``t`` is, or is a view of."""
    if not isinstance(t, Tensor):
        return None
    return params.get(id(t)) or (params.get(id(t._base)) if t._base is not None else None)


# -- what discovery finds -----------------------------------------------------------------------------

@dataclass
class Call:
    """One call a module's own forward made, or (``module_form``) one call of an activation or weight
    module (DFA's delivery points). ``index``: its number among the owner's calls of its kind in one
    forward (module form: the module's use)."""

    owner: nn.Module
    path: str
    kind: str  # activation, weight, norm, transport, composite
    name: str
    index: int
    func: Any = None
    args: tuple = ()  # after the input; an activation's recorded arguments
    kwargs: dict = field(default_factory=dict)
    weight: tuple[str, nn.Module, str] | None = None  # weight/transport calls: the parameter (path, holder, name)
    module_form: bool = False
    use: int = 0  # which use of the owner, in one forward (a module applied at several depths)
    input: Tensor | None = None  # on the example input only
    output: Tensor | None = None

    @property
    def where(self) -> str:
        return f"module '{self.path or '<root>'}' ({type(self.owner).__name__})"


@dataclass
class Discovery:
    calls: list[Call]
    untraced: list[tuple[str, nn.Module, str]]  # (path, module, why FX could not read its forward)
    example: Tensor | None = None  # the example input it ran on

    def own_calls(self) -> dict[nn.Module, list[Call]]:
        """The calls each module's own forward makes (not module-form uses), by module."""
        owners: dict[nn.Module, list[Call]] = {}
        for call in self.calls:
            if not call.module_form:
                owners.setdefault(call.owner, []).append(call)
        return owners


def _handled_by_type(module: nn.Module) -> bool:
    """Modules a rule converts by type: their own calls are its business (a converted model's modules too)."""
    return is_weight_layer(module) or is_activation(module) or hasattr(module, "unconverted")


def _classify(func: Any, args: tuple, params: dict) -> tuple[str, str] | None:
    """(kind, name) of a call, or None for one no rule handles (an elementwise product, a reshape...)."""
    if func in OPENED:
        return "composite", call_name(func)
    if func in WEIGHT_CALLS:
        return "weight", call_name(func)
    name = call_name(func)
    if name in ACTIVATION_CALLS:
        return "activation", name
    if name in NORM_CALLS:
        return "norm", name
    if name in TRANSPORT_CALLS and any(_is_param_of(a, params) for a in args):
        return "transport", name
    return None


class Probe(TorchFunctionMode):
    """Records the calls of one forward: each module's own calls, and activation and weight modules'
    uses, in order. Composite functions are opened as a routed forward opens them, so indices agree."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = {id(p): (f"{path}.{n}" if path else n, holder, n) for path, holder in model.named_modules()
                       for n, p in holder.named_parameters(recurse=False)}
        self.paths = {m: p for p, m in model.named_modules()}
        self.calls: list[Call] = []
        self.uses: dict[nn.Module, int] = {}  # forwards started, per module
        self.counts: dict[tuple[nn.Module, str], int] = {}  # calls of each kind in the module's current forward
        self.handles = [m.register_forward_pre_hook(self._start) for m in model.modules()]
        self.handles += [m.register_forward_hook(self._module_use) for m in model.modules()
                         if is_activation(m) or is_weight_layer(m)]

    def _start(self, module: nn.Module, args: tuple) -> None:
        self.uses[module] = self.uses.get(module, 0) + 1
        for key in [key for key in self.counts if key[0] is module]:
            del self.counts[key]

    def _count(self, owner: nn.Module, kind: str) -> int:
        n = self.counts.get((owner, kind), 0)
        self.counts[owner, kind] = n + 1
        return n

    def _call(self, owner: nn.Module, kind: str, name: str, **fields: Any) -> Call:
        call = Call(owner, self.paths.get(owner, "?"), kind, name, self._count(owner, kind),
                    use=self.uses.get(owner, 1) - 1, **fields)
        self.calls.append(call)
        return call

    def _module_use(self, module: nn.Module, args: tuple, output: Any) -> None:
        kind = "weight" if is_weight_layer(module) else "activation"
        weight = (self.paths.get(module, "") + ".weight", module, "weight") if kind == "weight" else None
        self.calls.append(Call(module, self.paths.get(module, "?"), kind, type(module).__name__, 0,
                               weight=weight, module_form=True, use=self.uses.get(module, 1) - 1,
                               input=args[0] if args and isinstance(args[0], Tensor) else None, output=output))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = _STACK.modules[-1] if _STACK.modules else None
        found = None if owner is None or _handled_by_type(owner) else _classify(func, args, self.params)
        if found is None:
            return func(*args, **kwargs)
        kind, name = found
        if kind == "composite":
            self._call(owner, kind, name, func=func)
            with self:
                return OPENED[func](*args, **kwargs)
        out = func(*args, **kwargs)
        weight = None
        if kind == "weight":
            weight = _is_param_of(args[1] if len(args) > 1 else kwargs.get("weight"), self.params)
        elif kind == "transport":
            weight = next(filter(None, (_is_param_of(a, self.params) for a in args)))
        self._call(owner, kind, name, func=func, args=tuple(args[1:]), kwargs=dict(kwargs), weight=weight,
                   input=args[0] if args else kwargs.get("input"), output=out)
        return out

    def run(self, model: nn.Module, example_input: Tensor) -> Discovery:
        """One eval-mode forward of ``example_input``, autograd on (DFA reads the graph); BatchNorm's
        running statistics and every module's mode left as they were."""
        modes = [(m, m.training) for m in model.modules()]
        try:
            with torch.enable_grad(), _TRACKING, self:
                model.eval()(example_input)
        finally:
            for handle in self.handles:
                handle.remove()
            for m, training in modes:
                m.train(training)
        return Discovery(self.calls, [], example_input)


class _OwnForward(fx.Tracer):
    """Traces one module's own forward: every submodule stays a call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _fx_discover(model: nn.Module) -> Discovery:
    """Calls read from each module's FX-traced own forward, and the modules that could not be traced
    (with why). A call to a function FX did not trace into (one marked ``torch.fx.wrap``) is a module
    it could not read."""
    params = {id(p): (f"{path}.{n}" if path else n, holder, n) for path, holder in model.named_modules()
              for n, p in holder.named_parameters(recurse=False)}
    calls, untraced = [], []
    for path, module in model.named_modules():
        if _handled_by_type(module) or type(module).forward in (nn.Sequential.forward, nn.Module.forward,
                                                                nn.ModuleList.forward, nn.ModuleDict.forward):
            continue
        if is_norm(module) and type(module).__module__.startswith("torch."):  # one norm call, FX or not
            calls.append(Call(module, path, "norm", "norm", 0))
            continue
        if type(module) is nn.MultiheadAttention:  # FX cannot read it; its calls are known
            calls += _attention_calls(module, path, params)
            continue
        try:
            graph = _OwnForward().trace(module)
        except Exception as err:  # noqa: BLE001 - any failure means: not readable this way
            untraced.append((path, module, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
            continue
        counts: dict[str, int] = {}
        for node in graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            func = getattr(torch.Tensor, node.target, node.target) if node.op == "call_method" else node.target
            args = tuple(_fx_value(module, path, a, params) for a in node.args)
            found = _classify(func, args, params) if callable(func) or isinstance(func, str) else None
            if found is None:
                if isinstance(func, types.FunctionType) and not func.__module__.startswith("torch"):
                    untraced.append((path, module, f"it calls {getattr(func, '__name__', func)}, which FX did "
                                                   "not trace into"))
                continue
            kind, name = found
            if kind == "composite":
                untraced.append((path, module, f"it calls {name}, whose parts FX does not show"))
                break
            index = counts[kind] = counts.get(kind, -1) + 1
            weight = None
            if kind == "weight":
                weight = _is_param_of(args[1] if len(args) > 1 else _fx_value(module, path, node.kwargs.get(
                    "weight"), params), params)
            elif kind == "transport":
                weight = next(filter(None, (_is_param_of(a, params) for a in args)))
            kwargs = {k: _fx_value(module, path, v, params) for k, v in node.kwargs.items()}
            calls.append(Call(module, path, kind, name, index, func, args[1:], kwargs, weight))
    return Discovery(calls, untraced)


def _attention_calls(module: nn.MultiheadAttention, path: str, params: dict) -> list[Call]:
    """What ``nn.MultiheadAttention``'s forward applies: its input and output projections' weights and
    one softmax (the order of the weights aside, which only DFA reads, and DFA runs on an example)."""
    weights = ["in_proj_weight"] if module.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight",
                                                                           "v_proj_weight"]
    found = [getattr(module, n) for n in weights] + [module.out_proj.weight]
    calls = [Call(module, path, "weight", "linear", i, F.linear, weight=_is_param_of(w, params))
             for i, w in enumerate(found)]
    return calls + [Call(module, path, "activation", "softmax", 0, torch.softmax, (-1,))]


def _fx_value(module: nn.Module, path: str, value: Any, params: dict) -> Any:
    """A node argument as the probe would see it: a parameter or buffer the module reads, as that
    tensor; any other node, a placeholder tensor; a constant, as it is."""
    if isinstance(value, fx.Node):
        if value.op == "get_attr":
            return functools.reduce(getattr, value.target.split("."), module)
        return _ANY_TENSOR
    return value


_ANY_TENSOR = torch.empty(0)


def discover(model: nn.Module, example_input: Tensor | None) -> Discovery:
    """The calls of ``model``'s modules' own forwards (:class:`Call`): on ``example_input`` when given
    (with the uses of activation and weight modules, and the tensors), else from FX traces."""
    return Probe(model).run(model, example_input) if example_input is not None else _fx_discover(model)


# -- what a call becomes ------------------------------------------------------------------------------

def _inplace_position(func: Callable) -> int | None:
    """The position of ``func``'s ``inplace`` parameter, if it has one."""
    try:
        return list(inspect.signature(func).parameters).index("inplace")
    except (ValueError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def _pure(func: Callable) -> tuple[Callable, int | None]:
    """The out-of-place form of an activation function, and the position of its ``inplace`` argument."""
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        owner = torch.Tensor if getattr(func, "__objclass__", None) is torch.Tensor else (
            F if getattr(F, name, None) is func else torch)
        func = getattr(owner, name[:-1])
    return func, _inplace_position(func)


def in_place(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a call writes its result over its input (``relu_``, ``inplace=True``)."""
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    position = _pure(func)[1]
    return bool(kwargs.get("inplace", args[position] if position is not None and len(args) > position else False))


class Called(nn.Module):
    """An activation applied as a function in a module's forward, as a module: ``func(h, *args,
    **kwargs)`` with the arguments seen at conversion, never in place. A rule converts it as any
    activation module, and the routed forward sends the call to it."""

    def __init__(self, name: str, func: Callable, args: tuple, kwargs: dict):
        super().__init__()
        self.name = name
        self.func, position = _pure(func)
        args, kwargs = list(args), dict(kwargs)
        if position is not None and len(args) >= position:  # args start after the input
            args[position - 1] = False
        if "inplace" in kwargs:
            kwargs["inplace"] = False
        if name == "rrelu":  # its mean slope, as nn.RReLU's in eval mode: the target is not drawn at random
            kwargs["training"] = False
            args = args[:2]
        self.args, self.kwargs = tuple(args), kwargs

    def forward(self, h: Tensor) -> Tensor:
        return self.func(h, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join([self.name, *map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])


def tensor_arguments(call: Call) -> bool:
    """Whether an activation call takes a tensor besides its input (F.prelu's weight, clamp's bounds)."""
    return any(isinstance(a, Tensor) for a in (*call.args, *call.kwargs.values()))


# -- routing ------------------------------------------------------------------------------------------

@dataclass
class Table:
    """What a routed module's own calls become: ``sites[k]``, the module its k-th activation call goes
    to (None: left to autograd); ``weights``, each parameter its weight calls use, with its holder and
    name; ``norms``: whether norm calls are routed."""

    sites: list[nn.Module | None]
    weights: list[tuple[Tensor, nn.Module, str]]
    activations: bool = True
    norms: bool = False
    own_weight: bool = False  # a weight layer's subclass computing its W in its forward: its calls use W's feedback


class _Frame:
    __slots__ = ("owner", "table", "activation", "weight")

    def __init__(self, owner: nn.Module, table: Table):
        self.owner, self.table, self.activation, self.weight = owner, table, 0, 0


class _Frames(threading.local):
    def __init__(self) -> None:
        self.frames: list[_Frame] = []


class Router(TorchFunctionMode):
    """Sends the calls of routed modules' own forwards to what their rule does with the module form;
    every other call (and every call a submodule makes) runs as it is. One per converted model."""

    def __init__(self, rule: Any):
        super().__init__()
        self.rule = rule
        self.local = _Frames()

    def __getstate__(self) -> dict[str, Any]:
        return {"rule": self.rule}  # a copy (deepcopy, pickle) starts with no forward running

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["rule"])

    def running(self, owner: nn.Module, table: Table) -> "_Running":
        return _Running(self, owner, table)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frames = self.local.frames
        frame = frames[-1] if frames else None
        if frame is None or _STACK.modules[-1] is not frame.owner:
            return func(*args, **kwargs)
        table = frame.table
        if func in OPENED:
            if func in OPENED_FOR_ACTIVATIONS and not table.activations:
                return func(*args, **kwargs)
            with self:
                return OPENED[func](*args, **kwargs)
        if func in WEIGHT_CALLS:
            return self._weight(frame, func, args, kwargs)
        name = call_name(func)
        if name in ACTIVATION_CALLS and table.activations:
            k = frame.activation
            frame.activation += 1
            site = table.sites[k] if k < len(table.sites) else None
            if site is None:
                if k >= len(table.sites):
                    raise RuntimeError(f"ekdaa: {type(frame.owner).__name__}'s forward applied more activations as "
                                       "functions than at conversion: convert with an example input that takes "
                                       "the same path")
                return func(*args, **kwargs)
            called = getattr(site, "activation", site)
            if getattr(called, "name", name) != name:
                raise RuntimeError(f"ekdaa: {type(frame.owner).__name__}'s forward applied {name} where at "
                                   f"conversion it applied {called.name}: convert with an example input that "
                                   "takes the same path")
            h = args[0]
            if not in_place(func, args[1:], kwargs):
                return site(h)
            return h.copy_(site(h.clone()))  # in place, as asked; the error map keeps the h it was given
        if table.norms and name in NORM_CALLS:
            return inverse_std(func, name, args, kwargs)
        return func(*args, **kwargs)

    def _weight(self, frame: _Frame, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        j = frame.weight
        frame.weight += 1
        bound = _WEIGHT_SIGNATURES[func].bind(*args, **kwargs).arguments
        x, w, b = bound["input"], bound["weight"], bound.get("bias")
        base = w if w._base is None else w._base
        entry = next((e for e in frame.table.weights if e[0] is base), None)
        if entry is None:
            if not frame.table.own_weight or w.shape != frame.owner.weight.shape:
                raise RuntimeError(f"ekdaa: {type(frame.owner).__name__}'s forward applied {call_name(func)} with a "
                                   "weight that was not seen at conversion: convert with an example input")
            holder, name = frame.owner, "weight"  # a weight layer's own W, computed (weight standardisation)
        else:
            _, holder, name = entry
        rule = self.rule
        feedback = rule.feedback(holder, name)
        if feedback is not None and w is not base:
            if feedback.stride() != base.stride():
                raise RuntimeError(f"ekdaa: the feedback of {name} is laid out unlike it: make the parameter contiguous")
            feedback = feedback.as_strided(w.size(), w.stride(), w.storage_offset() - base.storage_offset())
        key = (frame.owner, j)
        x = rule.layer_input(key, x)
        dims = WEIGHT_CALLS[func]
        if dims is None:
            out = feedback_product(x, w, b, feedback, None)
        else:
            pad, conv = conv_geometry(tuple(w.shape[2:]), bound.get("stride", 1), bound.get("padding", 0),
                                      bound.get("dilation", 1), bound.get("groups", 1))
            out = feedback_product(x, w, b, feedback, conv, pad)
        return rule.layer_output(key, out)


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...  # noqa: E704
def _linear_signature(input, weight, bias=None): ...  # noqa: E704


_WEIGHT_SIGNATURES = {F.linear: inspect.signature(_linear_signature),
                      **{f: inspect.signature(_conv_signature) for f in (F.conv1d, F.conv2d, F.conv3d)}}


class _Running:
    """A routed module's forward: its frame on the router, the router on the mode stack."""

    __slots__ = ("router", "frame")

    def __init__(self, router: Router, owner: nn.Module, table: Table):
        self.router, self.frame = router, _Frame(owner, table)

    def __enter__(self) -> None:
        _TRACKING.__enter__()
        _STACK.modules.append(self.frame.owner)  # its own call pushed it before the hooks existed
        self.router.local.frames.append(self.frame)
        self.router.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.router.__exit__(*exc)
        self.router.local.frames.pop()
        _STACK.modules.pop()
        _TRACKING.__exit__()


class _Routed:
    """Mixin: the module's own forward runs with its function calls routed to its rule."""

    ekdaa_router: Router
    ekdaa_calls: Table

    @torch.compiler.disable  # a compiled model runs it eagerly: the compiler would not see the routing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or self.ekdaa_router.rule.plain:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        with self.ekdaa_router.running(self, self.ekdaa_calls):
            return super().forward(*args, **kwargs)  # type: ignore[misc]

    def unconverted(self) -> nn.Module:
        """This module as its own class again (in place), without what its rule added."""
        return restored(self)


_ROUTED_CLASSES: dict[type, type] = {}


def route(module: nn.Module, router: Router, table: Table) -> None:
    """Make ``module``'s own calls go where ``table`` says while it runs (in place: a subclass of its class)."""
    add_to(module, "ekdaa_router", router)
    add_to(module, "ekdaa_calls", table)
    module.__class__ = subclass_for(_Routed, type(module), "Routed", _ROUTED_CLASSES, __name__)


def is_routed(module: nn.Module) -> bool:
    return isinstance(module, _Routed)


# -- norms, divided by sigma only -----------------------------------------------------------------------

class _InverseStdRouteFn(torch.autograd.Function):
    """Forward: the norm's output y (computed from a detached input). Backward: y gets the error,
    so the norm's scale and shift learn from it, and the input x gets it times 1 / sigma."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, inv_std: Tensor) -> Tensor:
        ctx.save_for_backward(inv_std)
        return y.clone()  # its own tensor: an in-place activation after it stays legal

    @staticmethod
    def backward(ctx, e: Tensor):
        (inv_std,) = ctx.saved_tensors
        return e, e * inv_std, None


_NORM_SIGNATURES = {
    "batch_norm": inspect.signature(F.batch_norm), "layer_norm": inspect.signature(F.layer_norm),
    "group_norm": inspect.signature(F.group_norm), "instance_norm": inspect.signature(F.instance_norm),
    "rms_norm": inspect.signature(F.rms_norm)}


def inverse_std(func: Callable, name: str, args: tuple, kwargs: dict) -> Tensor:
    """A norm call whose error reaches its input divided by the sigma it normalised by only (no scale,
    no statistics' terms): no weight travels backwards through it."""
    bound = _NORM_SIGNATURES[name].bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    x = a["input"]
    detached = x.detach()
    eps = a["eps"]
    if name in ("batch_norm", "instance_norm"):
        batch = a["training"] if name == "batch_norm" else a["use_input_stats"]
        dims = (0, *range(2, x.dim())) if name == "batch_norm" else tuple(range(2, x.dim()))
        var = detached.var(dims, unbiased=False, keepdim=True) if batch or a["running_var"] is None else \
            a["running_var"].view(1, -1, *[1] * (x.dim() - 2))
    elif name == "group_norm":
        groups = detached.reshape(x.shape[0], a["num_groups"], -1)
        var = groups.var(-1, unbiased=False, keepdim=True).repeat_interleave(x.shape[1] // a["num_groups"], 1)
        var = var.view(x.shape[0], x.shape[1], *[1] * (x.dim() - 2))
    else:
        dims = tuple(range(-len(a["normalized_shape"]), 0))
        var = detached.square().mean(dims, keepdim=True) if name == "rms_norm" else \
            detached.var(dims, unbiased=False, keepdim=True)
        eps = (torch.finfo(x.dtype).eps if eps is None else eps) if name == "rms_norm" else eps
    a["input"] = detached
    return _InverseStdRouteFn.apply(func(**a), x, torch.rsqrt(var + eps))


__all__ = ["ACTIVATION_CALLS", "Call", "Called", "Discovery", "Router", "Table", "call_name", "discover", "route"]
