"""A user's own model: activations applied as functions inside a module's own forward train exactly as
their module form does under every rule (routed to a module made for each call), a functional sign is
refused where its derivative (0) would be used, and ``ekdaa.unconvert`` gives the plain model back."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ekdaa
from ekdaa.models import MODELS, build_model
from ekdaa.rules import RULES, ConversionError

X = torch.randn(2, 3, 8, 8)

#: how the block applies its first activation as a function, and the module form of each
FUNCTIONAL = {"relu": (lambda t: F.relu(t), nn.ReLU), "relu_": (lambda t: t.relu_(), nn.ReLU),
              "tanh": (lambda t: t.tanh(), nn.Tanh), "sigmoid": (torch.sigmoid, nn.Sigmoid),
              "inplace": (lambda t: F.relu(t, inplace=True), nn.ReLU), "gelu": (lambda t: F.gelu(t, approximate="tanh"),
                                                                              lambda: nn.GELU("tanh")),
              "leaky": (lambda t: F.leaky_relu(t, 0.2, True), lambda: nn.LeakyReLU(0.2)),
              "sign": (torch.sign, ekdaa.Sign)}


class Block(nn.Module):
    """A user's residual block, its first activation applied as a function (``act``) or as a module (None)."""

    def __init__(self, channels: int, act: str | None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.act = act
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = self.act1(y) if self.act is None else FUNCTIONAL[self.act][0](y)
        return self.act2(self.bn2(self.conv2(y)) + x)


def net(act: str | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Block(4, act),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def convert(model: nn.Module, rule: str, example: bool) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm advice
        return ekdaa.convert(model, rule, example_input=X if example or rule == "dfa" else None)


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("example", [True, False], ids=["on-example", "fx-trace"])
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("act", [a for a in FUNCTIONAL if a != "sign"])
def test_a_functional_activation_trains_exactly_as_its_module_form(rule, act, example):
    if rule == "dfa" and not example:
        pytest.skip("dfa always takes an example input")
    torch.manual_seed(0)
    functional = net(act)
    modules = net()
    modules[2].act1 = FUNCTIONAL[act][1]()
    modules.load_state_dict(functional.state_dict())
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 5
    with torch.no_grad():
        assert torch.equal(functional(x), modules(x))
    torch.manual_seed(1)
    got = grads(convert(functional, rule, example), x, y)
    torch.manual_seed(1)
    want = grads(convert(modules, rule, example), x, y)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), (rule, act, name)


@pytest.mark.parametrize("rule", ["bp", "fa", "sign-symmetry", "kolen-pollack"])
def test_rules_that_use_the_derivative_refuse_a_functional_sign(rule):
    with pytest.raises(ConversionError, match=r"module '2' \(Block\) applies sign as a function .* derivative is "
                                              "0 almost everywhere"):
        convert(net("sign"), rule, False)


def test_a_functional_sign_trains_as_ekdaa_sign_under_ekdaa_and_bp_ste():
    torch.manual_seed(0)
    functional, modules = net("sign"), net()
    modules[2].act1 = ekdaa.Sign()
    modules.load_state_dict(functional.state_dict())
    x, y = torch.randn(6, 3, 8, 8) * 0.3, torch.arange(6) % 5
    for rule in ("ekdaa", "bp-ste", "last-layer"):
        torch.manual_seed(1)
        got = grads(convert(copy.deepcopy(functional), rule, True), x, y)
        torch.manual_seed(1)
        want = grads(convert(copy.deepcopy(modules), rule, True), x, y)
        assert all(torch.equal(got[n], want[n]) for n in want) and got.keys() == want.keys(), rule
        assert rule == "last-layer" or got["2.conv1.weight"].norm() > 0  # below the sign, something learns


def test_an_activation_with_a_tensor_argument_has_no_module_form_to_route_to():
    class Clamped(nn.Sequential):
        def forward(self, x):
            return torch.clamp(super().forward(x), min=torch.zeros(3))

    model = nn.Sequential(Clamped(nn.Linear(3, 3)), nn.Linear(3, 2))
    with pytest.raises(ConversionError, match=r"module '0' \(Clamped\) applies clamp with a tensor argument .* "
                                              "no module form"):
        ekdaa.convert(model, "ekdaa", example_input=torch.randn(2, 3))
    assert ekdaa.convert(model, "fa", example_input=torch.randn(2, 3)).ekdaa_rule.name == "fa"  # autograd's f' is fa's


class Branching(nn.Module):
    """A forward FX cannot trace (control flow on a tensor's value), written with modules."""

    def __init__(self):
        super().__init__()
        self.layer, self.act = nn.Linear(4, 4), nn.Tanh()

    def forward(self, x):
        return self.act(self.layer(x)) if x.sum() > -1e9 else x


def test_a_forward_fx_cannot_read_needs_the_example_input():
    model = nn.Sequential(Branching(), nn.Linear(4, 2))
    with pytest.raises(ConversionError, match=r"could not read the forward of module '0' \(Branching\) .*"
                                              "pass example_input="):
        ekdaa.convert(model, "ekdaa")
    with pytest.warns(UserWarning, match="could not read the forward of module '0'"):
        ekdaa.convert(nn.Sequential(Branching(), nn.Linear(4, 2)), "bp")  # only sign would matter to bp
    assert ekdaa.convert(model, "ekdaa", example_input=torch.randn(2, 4)).ekdaa_rule.name == "ekdaa"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_false_alarm_on_the_registered_models(name):
    for rule in ("ekdaa", "bp-ste"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "could not read" warning either
            ekdaa.convert(build_model(name, (3, 8, 8), 5), rule)  # FX trace of every custom module
    for rule in sorted(RULES):  # BatchNorm networks included: no advice printed on every conversion
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ekdaa.convert(build_model(name, (3, 8, 8), 5), rule, example_input=X)


class Transporting(nn.Module):
    """A weight applied as a matrix outside F.linear: a refusal under a rule that replaces W's transport."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.tanh(x @ self.weight)


@pytest.mark.parametrize("rule", ["ekdaa", "fa", "kolen-pollack"])
def test_no_warning_before_a_refusal_and_at_most_one_per_conversion(rule):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning first would be raised here instead of the refusal
        with pytest.raises(ConversionError):
            ekdaa.convert(nn.Sequential(Transporting(), nn.BatchNorm1d(4), nn.Linear(4, 2)), rule,
                          example_input=torch.randn(3, 4))
        with pytest.raises(ConversionError, match="already converted"):
            ekdaa.convert(ekdaa.convert(nn.Sequential(nn.Linear(4, 2)), rule), rule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ekdaa.convert(nn.Sequential(Branching(), Branching(), nn.Linear(4, 2)), "bp")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("rule,options", [(rule, {}) for rule in sorted(RULES)] + [
    ("ekdaa", dict(pool_routing="bilinear", norm_backward="inverse-std")), ("dfa", dict(norm_backward="inverse-std"))])
def test_unconvert_gives_back_the_plain_model_with_the_trained_weights(name, rule, options):
    torch.manual_seed(0)
    model = build_model(name, (3, 8, 8), 5)
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ekdaa.convert(model, rule, example_input=X, **options)
    F.cross_entropy(model(torch.randn(16, 3, 8, 8)), torch.arange(16) % 5).backward()
    with torch.no_grad():  # one step of the rule's update, of a fixed size (random feedback can explode here)
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad / (p.grad.norm() + 1e-12)
    plain = ekdaa.unconvert(model)
    assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
    original.load_state_dict(plain.state_dict())  # strict: no feedback tensor, nothing missing
    assert all(p.requires_grad for p in plain.parameters()) and not plain._forward_pre_hooks
    assert not hasattr(plain, "ekdaa_rule") and model.ekdaa_rule.name == rule  # the converted one stays
    for net in (plain, model, original):
        net.eval()
    with torch.no_grad():  # equal up to rounding: torch's attention takes another kernel where nothing requires grad
        assert model(X).isfinite().all()
        torch.testing.assert_close(plain(X), model(X), rtol=1e-5, atol=1e-6)
        assert torch.equal(original(X), plain(X))


def test_unconvert_unwraps_a_compiled_model_and_refuses_a_plain_one():
    model = ekdaa.convert(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "ekdaa")
    plain = ekdaa.unconvert(torch.compile(model))  # compiles nothing: unwrapped first
    assert [type(m) for m in plain] == [nn.Linear, nn.Tanh, nn.Linear]
    with pytest.raises(ConversionError, match="unconvert: the model is not converted"):
        ekdaa.unconvert(plain)
