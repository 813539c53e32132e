"""torch.compile of a converted model: one graph under every rule, and the eager model's .grad (routed
modules run eagerly inside it)."""
from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import ekdaa
from ekdaa.models import build_model

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                reason="torch.compile on CPU needs a C++ compiler")


@pytest.mark.parametrize("rule", list(ekdaa.RULES))
def test_a_compiled_model_is_one_graph_with_eager_gradients(rule):
    """small-cnn's sizes matter: on smaller layers torch 2.13's Inductor did not show the reordering
    that ekdaa.COMPILE_OPTIONS turns off (sign-symmetry's hidden .grad were zero without it)."""
    torch.manual_seed(0)
    shape = (1, 12, 12)
    x, y = torch.randn(16, *shape), torch.randint(10, (16,))
    activation = "sign" if rule == "bp-ste" else "tanh"
    eager = ekdaa.convert(build_model("small-cnn", shape, 10, activation=activation), rule, example_input=x)
    compiled = copy.deepcopy(eager)
    F.cross_entropy(eager(x), y).backward()
    torch._dynamo.reset()
    counters.clear()
    F.cross_entropy(ekdaa.compile(compiled)(x), y).backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert p.grad.norm() > 0 or rule == "bp-ste", name
            err = (q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)
            assert err < 1e-5, f"{rule} {name}: {err:.2e}"


@pytest.mark.parametrize("rule", ["ekdaa", "dfa", "fa"])
def test_a_compiled_model_runs_its_routed_modules_eagerly_with_eager_gradients(rule):
    """A module whose own forward applies activations, weights or attention as functions (here torch's
    multi-head attention) is routed at run time, which the compiler does not see: it runs eagerly."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    net = build_model("vit", (3, 8, 8), 5, dim=8, depth=1, heads=2, hidden=16)
    eager = ekdaa.convert(net, rule, example_input=x[:2])
    compiled = copy.deepcopy(eager)
    F.cross_entropy(eager(x), y).backward()
    torch._dynamo.reset()
    F.cross_entropy(ekdaa.compile(compiled)(x), y).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert p.grad.norm() > 0, name
            err = (q.grad - p.grad).abs().max() / p.grad.abs().max()
            assert err < 1e-4, f"{rule} {name}: {err:.2e}"
