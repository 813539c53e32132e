"""How EKDAA's backward keeps what backprop keeps, and no more: one activation per layer.

Backprop keeps each layer's output z = f(h) (f' is read from it). EKDAA's error map needs h instead,
so it keeps h, and the rest is arranged around that one tensor:

* a weight layer fed z keeps nothing of its input: :class:`SavedInput` recomputes z = f(h) from the
  h its error map keeps, once per backward, and leaves it with the error map, whose literal form
  z - f(h~) then reads it instead of evaluating f(h) again;
* a max-pool keeps its winners' indices and, for its input's shape and layout, that same h
  (:class:`MaxPool2d`);
* the error map is written over h (:func:`writable`), which is dead once the map is formed, where h
  is a layer's fresh output (not input data, not a view, not the argument of a function call, which
  its caller may still hold).

An autograd node that keeps h this way (the error map's) is marked by :func:`keeps_input`; the rest
of the package asks only the functions here.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

#: The attribute by which an autograd node (a custom Function's ctx) says that its output is z = f(h)
#: with h its first saved tensor, and names f. Such a node also has ``h`` and ``z`` (None until looked up).
RECOMPUTE = "recompute_output"


def keeps_input(ctx: Any, f: Callable[[Tensor], Tensor]) -> None:
    """Mark the node ``ctx`` as keeping h, its first saved tensor, with output z = f(h)."""
    setattr(ctx, RECOMPUTE, f)
    ctx.h = ctx.z = None


def kept_input(node: Any) -> Tensor:
    """The h a marked node keeps, unpacked once per backward (saved-tensor hooks, such as activation
    checkpointing's, allow one unpack) and left on the node (``node.h``) for its own backward."""
    if node.h is None:
        node.h = node.saved_tensors[0]
    return node.h


def take_output(node: Any) -> Tensor | None:
    """The z = f(h) a layer recomputed for the marked node in this backward (None if none did), and
    the node's hold on h and z released: they go with this backward, not with the graph."""
    z = node.z
    node.h = node.z = None
    return z


def writable(h: Tensor) -> bool:
    """Whether a backward may write over ``h``: a layer's fresh output, not data, not a view (under
    torch.compile the compiler decides where results go)."""
    return not torch.compiler.is_compiling() and h.grad_fn is not None and h._base is None


def _source(x: Tensor) -> tuple[Any, tuple | None] | None:
    """``(node, view)`` when ``x`` is z = f(h), or a view of it (``view``: its size, stride and offset),
    made by a node that keeps h; else None."""
    if torch.compiler.is_compiling():  # the compiler chooses what to keep
        return None
    z = x if x._base is None else x._base
    if getattr(z.grad_fn, RECOMPUTE, None) is None:
        return None
    return z.grad_fn, None if z is x else (x.size(), x.stride(), x.storage_offset())


class SavedInput:
    """A layer's input x for its backward: the tensor itself, or nothing where x is z = f(h) of a node
    that keeps h; then :meth:`load` recomputes it (once per backward, for every layer fed it)."""

    __slots__ = ("source",)

    def __init__(self, x: Tensor):
        self.source = _source(x)

    def tensor(self, x: Tensor) -> Tensor | None:
        """What the layer passes to ``save_for_backward`` for x."""
        return x if self.source is None else None

    def load(self, saved: Tensor | None) -> Tensor:
        """x again, from what the layer saved."""
        if self.source is None:
            return saved
        node, view = self.source
        if node.z is None:
            node.z = getattr(node, RECOMPUTE)(kept_input(node))
        return node.z if view is None else node.z.as_strided(*view)  # f(h) is laid out as z was


class _MaxPoolFn(torch.autograd.Function):
    """Max-pool forward; backward sends d to the winning unit with autograd's own kernel, which reads
    the winners' indices and only the shape of the pool's input: it keeps the indices and, for the
    shape, takes the h that the node which made the input keeps anyway (not z)."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: "MaxPool2d") -> Tensor:
        out, indices = F.max_pool2d(x, *pool.args, pool.ceil_mode, return_indices=True)
        node, view = (_source(x) if x.device.type in ("cpu", "cuda") else None) or (None, None)  # MPS reads x
        ctx.pool, ctx.node = pool, node if view is None else None
        ctx.save_for_backward(x if ctx.node is None else None, indices)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, indices = ctx.saved_tensors
        like = x if ctx.node is None else kept_input(ctx.node)  # h: z's shape and layout
        pool = ctx.pool
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, like, *pool.args, pool.ceil_mode, indices), None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (converted in place) that keeps no copy of its input for backward."""

    args: tuple[list[int], ...]  # kernel size, stride, padding, dilation as aten takes them: set by convert

    @classmethod
    def convert(cls, pool: nn.MaxPool2d) -> "MaxPool2d":
        kernel = list(_pair(pool.kernel_size))
        pool.args = kernel, list(_pair(pool.stride or kernel)), list(_pair(pool.padding)), list(_pair(pool.dilation))
        pool.__class__ = cls  # in place, still an nn.MaxPool2d
        return pool

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        return _MaxPoolFn.apply(x, self)

    def unconverted(self) -> nn.Module:
        del self.args
        self.__class__ = nn.MaxPool2d
        return self
