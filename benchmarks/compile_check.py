"""Does torch.compile keep each rule's gradients? Compares every parameter's .grad after
one backward of an eager model with that of a torch.compile'd copy (same weights, same
batch) and prints the largest relative difference per rule.

    python benchmarks/compile_check.py [--model mlp|small-cnn]

A rule whose difference is far above float rounding (~1e-6) cannot be trained compiled.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from ekdaa.models import build_model
from ekdaa.rules import RULES, convert


def relative_grad_error(rule: str, model: str, shape: tuple[int, int, int] = (1, 12, 12)) -> float:
    torch.manual_seed(0)
    x, y = torch.randn(16, *shape), torch.randint(10, (16,))
    eager = convert(build_model(model, shape, 10, activation="tanh"), rule, example_input=x)
    twin = copy.deepcopy(eager)
    F.cross_entropy(eager(x), y).backward()
    F.cross_entropy(torch.compile(twin)(x), y).backward()
    worst = 0.0
    for p, q in zip(eager.parameters(), twin.parameters()):
        if p.grad is not None:
            worst = max(worst, ((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "small-cnn"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, model {args.model}: max |grad_compiled - grad_eager| / max |grad_eager|")
    for rule in RULES:
        print(f"{rule:<14} {relative_grad_error(rule, args.model):.2e}", flush=True)


if __name__ == "__main__":
    main()
