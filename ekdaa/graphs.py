"""A whole training step captured as one CUDA graph and replayed.

At batch 50 a training step on a large GPU is bound by kernel launches (issue 13's measurement:
about 2.3 ms eager for the paper's CIFAR network on one H100, 0.5-0.65 ms captured), not by arithmetic: the launches of forward, loss, every
rule's backward and the optimizer step can be recorded once as a CUDA graph and replayed with
one launch. :class:`GraphedStep` does that for any step function that trains on a batch held in
static buffers:

1. the first ``warmup`` calls with one batch shape run eagerly on a side stream (real training
   steps: they also create the optimizer's state, compile fused kernels and pick cuDNN
   algorithms); a call with another shape before the recording starts the warm-up again with it;
2. the next call of that shape copies its batch into static buffers, records the step once
   (recording runs nothing) and replays it, which is that call's step;
3. later calls of that shape copy the batch in and replay; a batch of another shape (the last,
   partial one of an epoch) runs eagerly, and a change of any param group's hyperparameter (a
   scheduler's learning rate) means one more eager warm-up step and a new recording, since a
   graph keeps the values it was recorded with.

The tensors a replay returns are the graph's own: the next replay overwrites them.

The step must zero the gradients in place (``zero_grad(set_to_none=False)``), so that ``.grad``
is the same tensor in the graph and in eager steps; Adam/AdamW need ``capturable=True``
(:func:`set_capturable`). Nothing in the step may read a value on the host (``.item()``) or copy
one from it; the recording refuses both. Autocast inside a graph must not cache casts
(``cache_enabled=False``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor


class GraphedStep:
    """``step(*batch) -> outputs``, replayed from a CUDA graph for batches of the warmed-up shape."""

    def __init__(self, step: Callable[..., Sequence[Tensor]], optimizer: torch.optim.Optimizer, warmup: int = 3):
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.shape: tuple | None = None  # the batch layout warmed up (and then recorded)
        self.warmed = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Tensor, ...] = ()
        self.outputs: tuple[Tensor, ...] = ()
        self.settings: list[dict[str, Any]] = []

    def __call__(self, *batch: Tensor) -> tuple[Tensor, ...]:
        shape = tuple((b.shape, b.stride(), b.dtype, b.device) for b in batch)
        if shape != self.shape:
            if self.graph is not None:
                return tuple(self.step(*batch))
            self.shape, self.warmed = shape, 0
        if self.graph is not None and self.settings != self._settings():
            self.graph, self.outputs, self.warmed = None, (), self.warmup - 1  # warm up once more, record anew
        if self.warmed < self.warmup:
            self.warmed += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = tuple(self.step(*batch))
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self._record(batch)
        for static, value in zip(self.inputs, batch):
            static.copy_(value)
        self.graph.replay()
        return self.outputs

    def _settings(self) -> list[dict[str, Any]]:
        """The optimizer's hyperparameters, which a recording holds as constants."""
        return [{k: v for k, v in group.items() if k != "params" and not isinstance(v, Tensor)}
                for group in self.optimizer.param_groups]

    def _record(self, batch: Sequence[Tensor]) -> None:
        if not self.inputs:
            self.inputs = tuple(b.clone(memory_format=torch.preserve_format) for b in batch)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = tuple(self.step(*self.inputs))
        self.graph, self.settings = graph, self._settings()


def set_capturable(optimizer: torch.optim.Optimizer, on: bool) -> None:
    """Let ``optimizer``'s step be recorded in a CUDA graph (``on``) or not: Adam and AdamW keep
    their step count on the parameter's device when capturable, on the CPU otherwise; SGD
    needs nothing."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        group["capturable"] = on
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(device=p.device if on else "cpu", dtype=torch.float32)
