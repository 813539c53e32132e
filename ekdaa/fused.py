"""One pass over memory for elementwise work in a backward pass.

:class:`Fused` wraps a pure elementwise function. On tensors of at least ``MIN_NUMEL[device type]``
elements (on a GPU, any) it runs ``torch.compile`` of it: one kernel, one read of each input, one
write, and (``overwrite``) the result written over the first argument, which the caller no longer
needs, instead of into a fresh tensor (on CPU a fresh large tensor page-faults in). Scalars may be
Python numbers: Dynamo treats floats as symbols (torch >= 2.6), so a new value is no new compile.
Smaller tensors, and calls while a whole model is being compiled, run the eager function; where
compilation is impossible (no C++ compiler on CPU, an unsupported device) the first failure prints
one notice and every later call runs eagerly. Whether a kernel's caller fuses at all is its own
setting (EKDAA's option ``fuse``; the benchmark compares both).

Writing over an input is safe where nothing else needs it after the backward that consumes
it; autograd checks the rest: a second backward through the same graph (``retain_graph=True``)
or another operation that saved the same tensor fails loudly ("modified by an inplace
operation"), never silently: call the eager function (``fn``) for such uses.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable

import torch
from torch import Tensor

#: Per device type, tensors smaller than this run eagerly (devices not named: every size is fused).
#: On the CPU a compiled call costs more host time (~40 us) than a few eager passes over a small
#: tensor. On an H200 eager passes (eight in bf16, with their casts) cost far more GPU time on
#: large batches than one fused kernel; on small ones, where the host is the bottleneck, the compiled
#: call's host time costs ~10 % of an eager step, which a CUDA graph takes away (README: GPU).
MIN_NUMEL: dict[str, int] = {"cpu": 1 << 18}


def _own_code(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` with a code object of its own: torch.compile keeps one cache, and one recompile
    budget, per code object, and kernels made from one function would share them."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _writer(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` writing its result over its first argument."""
    def write_over(x: Tensor, *rest: Any) -> Tensor:
        return x.copy_(fn(x, *rest))
    return _own_code(write_over)


class Fused:
    """``fn(x, *rest)``, fused and written over ``x`` (``overwrite``, else into a new tensor),
    or eager (a new tensor). ``fused_fn``, if given, is the same function as the compiler should
    see it (e.g. a transcendental in a form that vectorises better); eager calls run ``fn``."""

    def __init__(self, fn: Callable[..., Tensor], name: str, overwrite: bool = True,
                 fused_fn: Callable[..., Tensor] | None = None):
        self.fn, self.name, self.overwrite = fn, name, overwrite
        self.fused_fn = fn if fused_fn is None else fused_fn
        self._compiled: Callable[..., Tensor] | None = None
        self._broken = False

    def __deepcopy__(self, memo: dict) -> "Fused":
        return self  # shared by the layers (and copies) of a model: one compile each

    def __call__(self, x: Tensor, *rest: Any) -> Tensor:
        if self._broken or x.numel() < MIN_NUMEL.get(x.device.type, 0) or torch.compiler.is_compiling():
            return self.fn(x, *rest)
        if self._compiled is None:  # shape-generic: one compile serves every layer and batch size
            fn = self.fused_fn
            self._compiled = torch.compile(_writer(fn) if self.overwrite else _own_code(fn), dynamic=True)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # compiling cannot be recorded (it copies to the device): a call the warm-up steps did not
            # compile for (seen once on an H200, mid-benchmark) runs eagerly in the graph
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    return self._compiled(x, *rest)
            except RuntimeError as err:
                if "recompil" not in str(err).lower():
                    raise
                return self.fn(x, *rest)
        try:
            return self._compiled(x, *rest)
        except Exception as err:  # no compiler, unsupported device: say so once, then stay eager
            self._broken = True
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            print(f"ekdaa: {self.name} runs unfused (torch.compile is unavailable here: {reason})", file=sys.stderr)
            return self.fn(x, *rest)
