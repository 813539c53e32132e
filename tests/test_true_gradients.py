"""A converted model gives whoever differentiates with respect to its input the real model's gradient
(attacks, saliency maps), while its training steps keep the rule; ``ekdaa.backprop`` gives backprop's
parameter gradients on request."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ekdaa

RULES = ["ekdaa", "fa", "dfa"]


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by which third of an 8x8 image is bright, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, :, :, 3 * c:3 * c + 2] += 0.6
    return x, y


def network() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 3))


def trained(rule: str) -> nn.Module:
    torch.manual_seed(0)
    model = ekdaa.convert(network(), rule, example_input=images(2, 0)[0])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(60):
        x, y = images(32, step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=RULES)
def twins(request) -> tuple[nn.Module, nn.Module]:
    """A converted model trained under a rule and its plain copy (same weights, plain PyTorch)."""
    converted = trained(request.param)
    return converted, ekdaa.unconvert(copy.deepcopy(converted)).eval()


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    return x.grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    return (x + eps * input_gradient(model, x, y).sign()).clamp(0, 1)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10) -> torch.Tensor:
    adv = (x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) - 1)).clamp(0, 1)
    for _ in range(steps):
        adv = adv + 2.5 * eps / steps * input_gradient(model, adv, y).sign()
        adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)
    return adv


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_attacks_on_a_converted_model_see_the_real_model(twins):
    converted, plain = twins
    x, y = images(200, 1000)
    clean = accuracy(plain, x, y)
    assert accuracy(converted, x, y) == clean > 0.9
    for name, p in converted.named_parameters():
        assert p.grad is not None  # what training left: an attack must not touch it
    left = {name: p.grad.clone() for name, p in converted.named_parameters()}
    assert torch.equal(input_gradient(converted, x, y), input_gradient(plain, x, y))
    eps = 0.25
    adv, plain_adv = fgsm(converted, x, y, eps), fgsm(plain, x, y, eps)
    assert torch.equal(adv, plain_adv)
    assert accuracy(converted, adv, y) == accuracy(plain, plain_adv, y) < clean - 0.1
    robust, plain_robust = accuracy(converted, pgd(converted, x, y, eps), y), accuracy(plain, pgd(plain, x, y, eps), y)
    assert abs(robust - plain_robust) <= 1 / len(y) and plain_robust < clean - 0.2
    for name, p in converted.named_parameters():
        assert torch.equal(p.grad, left[name]), name


def test_torchattacks_on_a_converted_model_see_the_real_model(twins):
    torchattacks = pytest.importorskip("torchattacks")
    converted, plain = twins
    x, y = images(200, 1000)
    clean = accuracy(plain, x, y)
    for attack in (lambda m: torchattacks.FGSM(m, eps=0.25), lambda m: torchattacks.PGD(m, eps=0.25, alpha=0.125, steps=5)):
        torch.manual_seed(5)
        robust = accuracy(converted, attack(converted)(x, y), y)
        torch.manual_seed(5)
        plain_robust = accuracy(plain, attack(plain)(x, y), y)
        assert abs(robust - plain_robust) <= 1 / len(y) and plain_robust < clean - 0.1


@pytest.mark.parametrize("rule", RULES)
def test_a_training_step_keeps_the_rule_in_eval_mode_and_backprop_gives_true_gradients(rule):
    torch.manual_seed(0)
    converted = ekdaa.convert(network(), rule, example_input=images(2, 0)[0]).eval()  # eval mode: e.g. frozen BatchNorm statistics
    plain = ekdaa.unconvert(copy.deepcopy(converted))
    x, y = images(16, 7)

    def grads(model: nn.Module) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    true = grads(plain)
    ruled = grads(converted)
    assert not torch.allclose(ruled["0.weight"], true["0.weight"])  # the rule's own update, not backprop's
    with ekdaa.backprop(converted):
        inside = grads(converted)
    assert inside.keys() == true.keys()
    for name in true:
        torch.testing.assert_close(inside[name], true[name], rtol=1e-5, atol=1e-7)
    after = grads(converted)
    for name in ruled:
        torch.testing.assert_close(after[name], ruled[name], rtol=1e-5, atol=1e-7)


def test_backprop_refuses_a_model_that_is_not_converted():
    with pytest.raises(ekdaa.ConversionError, match="not converted"):
        ekdaa.backprop(network()).__enter__()
