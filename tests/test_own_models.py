"""A user's own model: activations applied as functions inside a module's forward are refused
by every rule whose behaviour at an activation differs from autograd's (never a silent fallback),
with no false alarm on models written with modules; ``ekdaa.unconvert`` gives the plain model
back."""
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


class Block(nn.Module):
    """A user's residual block, written with functions (``functional``) or with modules."""

    def __init__(self, channels: int, functional: bool, act: str = "relu"):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.functional, self.act = functional, act
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        if not self.functional:
            return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x)
        y = self.bn1(self.conv1(x))
        y = {"relu": lambda t: F.relu(t), "relu_": lambda t: t.relu_(), "tanh": lambda t: t.tanh(),
             "sigmoid": torch.sigmoid, "sign": torch.sign, "inplace": lambda t: F.relu(t, inplace=True)}[self.act](y)
        return self.act2(self.bn2(self.conv2(y)) + x)


def net(functional: bool, act: str = "relu") -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Block(4, functional, act),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def convert(model: nn.Module, rule: str, example: bool) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm advice
        return ekdaa.convert(model, rule, example_input=X if example or rule == "dfa" else None)


@pytest.mark.parametrize("example", [True, False], ids=["on-example", "fx-trace"])
@pytest.mark.parametrize("rule", ["ekdaa", "dfa"])
@pytest.mark.parametrize("act", ["relu", "relu_", "tanh", "sigmoid", "inplace"])
def test_a_functional_activation_is_refused_where_the_rule_differs_from_autograd(rule, act, example):
    model = net(True, act)
    with pytest.raises(ConversionError) as err:
        convert(model, rule, example)
    name = {"relu_": "relu", "inplace": "relu"}.get(act, act)
    assert str(err.value).startswith(f"module '2' (Block) applies {name} as a function in its forward: rule "
                                     f"'{rule}' treats activations its own way only as modules")
    assert "use the module form, nn." in str(err.value)
    assert not hasattr(model, "ekdaa_rule") and type(model[1]) is nn.ReLU  # nothing converted


@pytest.mark.parametrize("example", [True, False], ids=["on-example", "fx-trace"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_same_block_written_with_modules_converts_under_every_rule(rule, example):
    model = convert(net(False), rule, example)
    assert model.ekdaa_rule.name == rule


@pytest.mark.parametrize("rule", ["bp", "fa", "sign-symmetry", "kolen-pollack"])
def test_rules_that_use_the_derivative_accept_functional_activations_but_not_sign(rule):
    assert convert(net(True, "tanh"), rule, True).ekdaa_rule.name == rule  # autograd's derivative is theirs
    with pytest.raises(ConversionError, match=r"applies sign as a function .* derivative is 0 almost everywhere"):
        convert(net(True, "sign"), rule, False)


def test_bp_ste_refuses_a_functional_sign_and_last_layer_accepts_anything():
    with pytest.raises(ConversionError, match=r"rule 'bp-ste' .* use the module form, ekdaa.Sign\(\)"):
        convert(net(True, "sign"), "bp-ste", True)
    assert convert(net(True, "tanh"), "bp-ste", True).ekdaa_rule.name == "bp-ste"
    assert convert(net(True, "sign"), "last-layer", False).ekdaa_rule.name == "last-layer"


def test_an_activation_without_a_module_form_names_the_ones_the_rule_trains():
    class Gelu(nn.Sequential):
        def forward(self, x):
            return F.gelu(super().forward(x))

    with pytest.raises(ConversionError, match="applies gelu as a function .* gelu has no module form this rule "
                                              "trains: use one of Tanh, ReLU"):
        ekdaa.convert(nn.Sequential(Gelu(nn.Linear(3, 3)), nn.Linear(3, 2)), "ekdaa")


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
            warnings.filterwarnings("ignore", message=".*BatchNorm")
            ekdaa.convert(build_model(name, (3, 8, 8), 5), rule)  # FX trace of every custom module


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
    with torch.no_grad():
        assert model(X).isfinite().all() and torch.equal(plain(X), model(X)) and torch.equal(original(X), model(X))


def test_unconvert_unwraps_a_compiled_model_and_refuses_a_plain_one():
    model = ekdaa.convert(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "ekdaa")
    plain = ekdaa.unconvert(torch.compile(model))  # compiles nothing: unwrapped first
    assert [type(m) for m in plain] == [nn.Linear, nn.Tanh, nn.Linear]
    with pytest.raises(ConversionError, match="unconvert: the model is not converted"):
        ekdaa.unconvert(plain)
