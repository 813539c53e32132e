"""Does torch.compile keep each rule's gradients? Compares every parameter's .grad after
one backward of an eager model with that of a compiled copy (same weights, same batch) and
prints the largest relative difference per rule, and the number of graphs the model compiled to.

    python benchmarks/compile_check.py [--model mlp|small-cnn|paper-cnn] [--plain]

``ekdaa.compile`` by default, ``torch.compile`` as it comes with ``--plain`` (torch 2.13's Inductor
then zeroes the hidden layers' gradients of sign-symmetry on small-cnn: see ekdaa.COMPILE_OPTIONS).
A rule whose difference is far above float rounding (~1e-6) cannot be trained compiled.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import ekdaa
from ekdaa.models import build_model
from ekdaa.rules import RULES, convert


def relative_grad_error(rule: str, model: str, plain: bool = False,
                        shape: tuple[int, int, int] = (1, 12, 12)) -> tuple[float, int]:
    """The largest relative difference of a parameter's .grad, compiled against eager, and the number
    of graphs the compiled model made."""
    torch.manual_seed(0)
    x, y = torch.randn(16, *shape), torch.randint(10, (16,))
    eager = convert(build_model(model, shape, 10, activation="tanh"), rule, example_input=x)
    twin = copy.deepcopy(eager)
    F.cross_entropy(eager(x), y).backward()
    torch._dynamo.reset()
    counters.clear()
    F.cross_entropy((torch.compile if plain else ekdaa.compile)(twin)(x), y).backward()
    worst = 0.0
    for p, q in zip(eager.parameters(), twin.parameters()):
        if p.grad is not None:
            worst = max(worst, ((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item())
    return worst, counters["stats"]["unique_graphs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-cnn", choices=["mlp", "small-cnn", "paper-cnn"])
    parser.add_argument("--plain", action="store_true", help="torch.compile without ekdaa.COMPILE_OPTIONS")
    args = parser.parse_args()
    how = "torch.compile" if args.plain else "ekdaa.compile"
    print(f"torch {torch.__version__}, model {args.model}, {how}: max |grad_compiled - grad_eager| / "
          "max |grad_eager|, graphs")
    for rule in RULES:
        error, graphs = relative_grad_error(rule, args.model, args.plain)
        print(f"{rule:<14} {error:.2e} {graphs}", flush=True)


if __name__ == "__main__":
    main()
