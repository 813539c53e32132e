"""This decade's image models under every rule, with hand-written blocks in the style of each family: an
inverted residual (depthwise convolution, squeeze-excitation, Hardswish), an MBConv (SiLU, a functional
sigmoid gate), a ConvNeXt block (depthwise 7x7, LayerNorm2d, GELU, layer scale), a ViT encoder (class
token, position embedding, nn.MultiheadAttention), a Swin-style block (Permute, window attention written
with F.linear on its layers' weights, a relative position bias table) and a DenseNet layer (F.relu,
concatenation). Every rule converts each; every parameter autograd would update gets a finite update;
bp is autograd exactly; EKDAA, FA, sign symmetry and Kolen-Pollack equal the independent reference."""
from __future__ import annotations

import copy
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ekdaa
from ekdaa.models import build_model
from ekdaa.models.modern import ConvNeXtBlock, LayerNorm2d
from ekdaa.rules import RULES, ConversionError
from reference import Add, Concat, First, Gate, Permute, Scale, SelfAttention, Tokens, reference_grads, transmit_of

X = torch.randn(2, 3, 8, 8)


# -- the families, written as their libraries write them ------------------------------------------------

def inverted_residual() -> nn.Sequential:
    """MobileNetV3: expansion, depthwise 3x3, squeeze-excitation (Hardsigmoid), linear projection, residual."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(),
        Add(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
            Gate(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.ReLU(inplace=True), nn.Conv2d(4, 16, 1),
                 nn.Hardsigmoid()),
            nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


class MBConv(nn.Module):
    """EfficientNet: SiLU, a depthwise stride-2 convolution, a squeeze-excitation gate applied as a function."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, 4 * cin, 1, bias=False), nn.BatchNorm2d(4 * cin), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(4 * cin, 4 * cin, 3, 2, 1, groups=4 * cin, bias=False),
                                       nn.BatchNorm2d(4 * cin), nn.SiLU())
        self.squeeze, self.excite = nn.Conv2d(4 * cin, cin, 1), nn.Conv2d(cin, 4 * cin, 1)
        self.project = nn.Sequential(nn.Conv2d(4 * cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.depthwise(self.expand(x))
        gate = torch.sigmoid(self.excite(F.silu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        return self.project(y * gate)


def mbconv() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), MBConv(4, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 5))


def convnext() -> nn.Sequential:
    """torchvision's ConvNeXt: a patchify stem with LayerNorm2d, blocks with layer scale, a LayerNorm2d
    and strided convolution between stages."""
    return nn.Sequential(nn.Conv2d(3, 8, 2, 2), LayerNorm2d(8), ConvNeXtBlock(8, "gelu", True, 0.5),
                         LayerNorm2d(8), nn.Conv2d(8, 16, 2, 2), ConvNeXtBlock(16, "gelu", True, 0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 5))


def vit() -> nn.Module:
    return build_model("vit", (3, 8, 8), 5, dim=8, depth=2, heads=2, hidden=16)


class WindowAttention(nn.Module):
    """Swin: attention inside windows, its projections applied with F.linear on its layers' weights, plus a
    relative position bias from a table it holds."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.window = heads, window
        self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten(), persistent=False)

    def forward(self, x):
        n, h, w, c = x.shape
        ws = self.window
        x = x.view(n, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(x.shape[0], ws * ws, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        bias = self.bias_table[self.index].view(ws * ws, ws * ws, -1).permute(2, 0, 1)
        attn = F.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias, dim=-1)
        x = F.linear((attn @ v).transpose(1, 2).reshape(x.shape[0], ws * ws, c), self.proj.weight, self.proj.bias)
        return x.view(n, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


def swin() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 2, 2), Permute(0, 2, 3, 1), nn.LayerNorm(8),
                         Add(nn.LayerNorm(8), WindowAttention(8, 2, 2)),
                         Add(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)),
                         Permute(0, 3, 1, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


class DenseLayer(nn.Module):
    """torchvision's DenseNet layer: BN, F.relu, 1x1 bottleneck, BN, F.relu (in place), 3x3, concatenated."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(F.relu(self.norm2(y), inplace=True))], 1)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DenseLayer(4, 2), DenseLayer(6, 2), nn.BatchNorm2d(8))
        self.classifier = nn.Linear(8, 5)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1))


FAMILIES = {"inverted-residual": inverted_residual, "mbconv": mbconv, "convnext": convnext, "vit": vit,
            "swin": swin, "densenet": DenseNet, "mobilenet": lambda: build_model("mobilenet", (3, 8, 8), 5),
            "convnext-registered": lambda: build_model("convnext", (3, 8, 8), 5)}


def converted(net: nn.Module, rule: str, x: torch.Tensor = X, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # norm advice
        return ekdaa.convert(copy.deepcopy(net), rule, example_input=x, **options)


def grads_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_family_converts_under_every_rule_and_every_parameter_learns(family, rule):
    torch.manual_seed(0)
    net = FAMILIES[family]().train()
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 5
    model = converted(net, rule)
    plain = grads_of(copy.deepcopy(net), x, y)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), net.eval()(x))  # the forward is the model's own
    got = grads_of(model.train(), x, y)
    learns = {n for n, p in model.named_parameters() if p.requires_grad} & set(plain)
    for name in plain:
        if rule == "last-layer" and name not in learns:
            continue
        assert name in got and got[name].isfinite().all(), (rule, name)
        assert got[name].norm() > 0, (rule, name)
    if rule == "bp":
        assert all(torch.equal(got[n], plain[n]) for n in plain) and got.keys() == plain.keys()
    if rule == "last-layer":
        assert len(learns) == 2  # the output layer's weight and bias
    plain_again = ekdaa.unconvert(model)
    assert [type(m) for m in plain_again.modules()] == [type(m) for m in net.modules()]
    net.load_state_dict(plain_again.state_dict())


REFERENCE = {"inverted-residual": lambda: nn.Sequential(*[  # the gate a sigmoid: torch's Hardsigmoid backward
    Add(*[Gate(*list(m.branch)[:-1], nn.Sigmoid()) if isinstance(m, Gate) else m for m in layer.branch])  # rounds
    if isinstance(layer, Add) else layer for layer in inverted_residual()]),                          # 1/6 to fp32
    "convnext": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 2, 2), Permute(0, 2, 3, 1), nn.LayerNorm(8), Permute(0, 3, 1, 2),
        Add(nn.Conv2d(8, 8, 7, padding=3, groups=8), Permute(0, 2, 3, 1), nn.LayerNorm(8), nn.Linear(8, 32), nn.GELU(),
            nn.Linear(32, 8), Scale(8, 0.5), Permute(0, 3, 1, 2)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 5)),
    "vit": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 4, 4), Tokens(8, 4), Add(nn.LayerNorm(8), SelfAttention(8, 2)),
        Add(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), nn.LayerNorm(8), First(), nn.Linear(8, 5)),
    "densenet": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), Concat(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 1, bias=False),
                                              nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1, bias=False)),
        nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))}


@pytest.mark.parametrize("family", sorted(REFERENCE))
@pytest.mark.parametrize("rule,options", [("bp", {}), ("fa", {}), ("sign-symmetry", {}), ("kolen-pollack", {}),
                                          ("ekdaa", dict(beta=0.5)), ("fa", dict(norm_backward="inverse-std")),
                                          ("ekdaa", dict(beta=0.5, norm_backward="inverse-std"))])
def test_updates_match_the_independent_reference(family, rule, options):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        net = REFERENCE[family]()
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.5) if p.dim() > 1 else p.normal_(1, 0.2)
        x, y = torch.randn(5, 3, 8, 8), torch.arange(5) % 5
        model = converted(net, rule, x, **options)
        got = grads_of(model, x, y)
        want = reference_grads(list(net), rule, x, y, transmit=transmit_of(model), **options)
        assert set(want) == {n for n in got if not n.endswith(("error_kernel", "feedback"))}
        for name, g in want.items():  # (a bias just before a norm has the update 0, to rounding)
            torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=f"{rule} {name}")
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("variant", [dict(need_weights=True), dict(batch_first=False), dict(kdim=6, vdim=5),
                                     dict(add_bias_kv=True), dict(bias=False), dict(mask=True)])
def test_multihead_attention_in_its_variants(variant):
    """Separate key/value projections, bias_k/v, masks, seq-first, attention weights returned: the same
    forward, bp exactly autograd, and every rule's update finite, reaching every projection."""
    options = {k: v for k, v in variant.items() if k in ("batch_first", "kdim", "vdim", "add_bias_kv", "bias")}
    batch_first = options.setdefault("batch_first", True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.kv = nn.Linear(4, 8), nn.Linear(4, 6 if "kdim" in options else 8)
            self.attention = nn.MultiheadAttention(8, 2, **options)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            q, kv = self.embed(x), self.kv(x)
            k, v = (kv, kv[..., :5]) if "kdim" in options else (kv, kv)
            if not batch_first:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            mask = torch.ones(5, 5, dtype=torch.bool).triu(1) if variant.get("mask") else None
            out, _ = self.attention(q, k, v, attn_mask=mask, need_weights=variant.get("need_weights", False))
            return self.head((out if batch_first else out.transpose(0, 1)).mean(1))

    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(4, 5, 4), torch.arange(4) % 3
    plain = grads_of(copy.deepcopy(net), x, y)
    for rule in sorted(RULES):
        model = converted(net, rule, x)
        with torch.no_grad():
            torch.testing.assert_close(model(x), net(x))
        got = grads_of(model, x, y)
        if rule == "bp":
            assert all(torch.equal(got[n], plain[n]) for n in plain)
        for name in plain:
            if rule != "last-layer" or name.startswith("head"):
                assert got[name].isfinite().all() and got[name].norm() > 0, (rule, name)


#: The activations EKDAA's error_map='auto' keeps one-sided (the paper's tanh, piecewise-linear ones)
ONE_SIDED = ("Tanh", "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "Hardtanh", "Threshold", "Hardshrink",
             "Softshrink")


@pytest.mark.parametrize("error_map", ["auto", "one-sided", "centered"])
@pytest.mark.parametrize("activation", [getattr(nn, name) for name in nn.modules.activation.__all__
                                        if name not in ("MultiheadAttention", "GLU")], ids=lambda c: c.__name__)
def test_every_activation_in_torch_nn_gets_its_error_map_from_f_alone(activation, error_map):
    """e = f(h) - f(h - beta d), or centered f(h + beta d / 2) - f(h - beta d / 2), for every activation
    module (f evaluated by the module itself, never a derivative; RReLU's through its mean slope); auto:
    one-sided for the paper's and the piecewise-linear activations, centered for the others; under fa,
    autograd's derivative."""
    torch.manual_seed(0)
    args = {nn.Threshold: (0.1, -1.0), nn.Softmax: (1,), nn.Softmin: (1,), nn.LogSoftmax: (1,)}.get(activation, ())
    act = activation(*args)
    if activation is nn.Softmax2d:
        net = nn.Sequential(nn.Conv2d(2, 3, 1), act, nn.Flatten(), nn.Linear(3 * 4, 4))
        x = torch.randn(5, 2, 2, 2)
    else:
        net = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 4))
        x = torch.randn(5, 4)
    y = torch.arange(5) % 4
    model = converted(net, "ekdaa", x, beta=0.5, error_map=error_map)
    torch.manual_seed(1)  # RReLU's slopes: the same draw for both forwards
    got = grads_of(model, x, y)
    centered = error_map == "centered" or error_map == "auto" and activation.__name__ not in ONE_SIDED
    with torch.no_grad():
        f = copy.deepcopy(act).eval()  # RReLU: its mean slope
        h = net[0](x)
        torch.manual_seed(1)
        z = net(x)
        e_out = torch.softmax(z, 1) - F.one_hot(y, 4)
        d = (e_out @ model[-1].error_kernel).reshape(h.shape)
        e = f(h + 0.25 * d) - f(h - 0.25 * d) if centered else f(h) - f(h - 0.5 * d)
        e2 = e.reshape(5, 3, -1).transpose(1, 2).reshape(-1, 3) if h.dim() == 4 else e
        x2 = x.reshape(5, 2, -1).transpose(1, 2).reshape(-1, 2) if h.dim() == 4 else x
    want = (e2.t() @ x2 / 5).reshape(net[0].weight.shape)
    torch.testing.assert_close(got["0.weight"], want, rtol=1e-4, atol=1e-6)
    if activation is nn.PReLU:  # its slope learns from d, the error at its output: d * min(h, 0)
        torch.testing.assert_close(got["1.activation.weight"], (d * h.clamp(max=0)).sum().view(1) / 5, rtol=1e-4,
                                   atol=1e-7)
    assert converted(net, "fa", x).ekdaa_rule.name == "fa"


def test_the_centered_error_map_has_no_curvature_bias():
    """On Hardswish's quadratic piece the centered map is beta f'(h) d exactly, the one-sided one is off by
    (beta d)^2 f''(h) / 2 = (beta d)^2 / 6: one sign whatever d's, so over a batch it does not cancel."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.Hardswish(), nn.Linear(64, 3))
    x, y = torch.randn(32, 4, dtype=torch.float64) * 0.3, torch.arange(32) % 3
    net = net.double()
    with torch.no_grad():
        h = net[0](x)
        assert h.abs().max() < 2  # on the quadratic piece, f(u) = u (u + 3) / 6
    for error_map in ("one-sided", "centered"):
        model = converted(copy.deepcopy(net), "ekdaa", x, beta=0.9, error_map=error_map)
        got = grads_of(model, x, y)["0.bias"]
        with torch.no_grad():
            d = (torch.softmax(model(x), 1) - F.one_hot(y, 3)) @ model[-1].error_kernel
        first_order = (0.9 * (2 * h + 3) / 6 * d).mean(0)
        bias = 0 if error_map == "centered" else ((0.9 * d) ** 2 / 6).mean(0)
        torch.testing.assert_close(got, first_order - bias)


class SubclassedGELU(nn.GELU):
    """A user's activation: a subclass with a forward of its own."""

    def forward(self, x):
        return super().forward(x) * 2


def test_a_subclass_of_an_activation_is_an_activation_with_its_own_f():
    net = nn.Sequential(nn.Linear(4, 6), SubclassedGELU(), nn.Linear(6, 3))
    model = converted(net, "ekdaa", torch.randn(2, 4))
    assert type(model[1]).__name__ == "ErrorMap" and model[1].activation.__class__ is SubclassedGELU
    h = torch.randn(3, 6)
    torch.testing.assert_close(model[1].f(h), 2 * F.gelu(h))


@pytest.mark.parametrize("norm", ["layer", "layer2d", "group", "instance", "batch3d", "rms"])
def test_inverse_std_divides_the_error_by_each_norms_own_sigma(norm):
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    module, dims, eps = {
        "layer": (nn.LayerNorm(5), (-1,), 1e-5), "layer2d": (LayerNorm2d(6), (1,), 1e-5),
        "group": (nn.GroupNorm(3, 6), None, 1e-5), "instance": (nn.InstanceNorm2d(6, affine=True), (2, 3), 1e-5),
        "batch3d": (nn.BatchNorm3d(6), (0, 2, 3, 4), 1e-5), "rms": (nn.RMSNorm(5, eps=1e-6), (-1,), 1e-6)}[norm]
    inp = x.unsqueeze(-1) if norm == "batch3d" else x
    model = converted(nn.Sequential(nn.Linear(1, 1), module.double()), "fa", None, norm_backward="inverse-std")
    e = torch.randn_like(inp)
    out = model[1](inp)
    torch.testing.assert_close(out, module(inp.detach()))
    out.backward(e)
    with torch.no_grad():
        if norm == "group":
            sigma = (inp.reshape(4, 3, -1).var(-1, unbiased=False) + eps).sqrt().repeat_interleave(2, 1)
            sigma = sigma.view(4, 6, 1, 1)
        elif norm == "rms":
            sigma = (inp.square().mean(-1, keepdim=True) + eps).sqrt()
        else:
            sigma = (inp.var(dims, unbiased=False, keepdim=True) + eps).sqrt()
    torch.testing.assert_close(x.grad, (e / sigma).reshape(x.shape))
    assert model[1].weight.grad is not None and model[1].weight.grad.norm() > 0  # the norm's scale learns


class TorchvisionBasicBlock(nn.Module):
    """torchvision's ResNet block: one ReLU module applied twice."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def test_dfa_gives_an_activation_used_at_several_depths_one_feedback_per_use():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), TorchvisionBasicBlock(4), nn.Flatten(), nn.Linear(4 * 64, 5))
    model = converted(net, "dfa")
    relu = model[1].relu
    assert sorted(relu._buffers) == ["feedback", "feedback_1"] and not torch.equal(relu.feedback, relu.feedback_1)
    assert relu.feedback.shape == relu.feedback_1.shape == (5, 4, 8, 8)
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 5
    got = grads_of(model, x, y)
    assert got["1.conv1.weight"].norm() > 0 and got["0.weight"].norm() > 0
    for _ in range(2):  # the uses start again at every forward
        grads_of(model, x, y)


def test_dfa_lets_what_follows_the_output_layer_carry_its_error():
    """SqueezeNet's classifier: the last convolution, then a ReLU and global pooling."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    model = converted(net, "dfa")
    assert type(model[3]) is nn.ReLU and type(model[1]).__name__ == "DirectFeedback"
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 5
    got = grads_of(model, x, y)
    assert got["0.weight"].norm() > 0
    plain = grads_of(copy.deepcopy(net), x, y)
    torch.testing.assert_close(got["2.weight"], plain["2.weight"])  # the output layer's update is backprop's


def test_dfa_reaches_the_value_projection_inside_torchs_attention():
    """The attention's output before its projection is laid out (L x N, E) inside torch's code: DFA finds
    the batch there, so the value rows of the input projection learn too."""
    model = converted(vit(), "dfa")
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 5
    got = grads_of(model, x, y)
    q, k, v = got["blocks.0.attention.in_proj_weight"].chunk(3)
    assert q.norm() > 0 and k.norm() > 0 and v.norm() > 0


def test_a_parameter_used_as_a_matrix_is_weight_transport_and_refused():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w

    net = nn.Sequential(nn.Linear(4, 4), Bilinear(), nn.Linear(4, 2))
    for rule in ("ekdaa", "fa", "dfa"):
        with pytest.raises(ConversionError, match=r"module '1' \(Bilinear\) applies matmul to its parameter 'w': "
                                                  "that sends the error down through it"):
            converted(net, rule, torch.randn(2, 4))
    converted(net, "bp", torch.randn(2, 4))


def test_a_module_computing_its_weight_uses_its_feedback():
    """timm's StdConv2d: a Conv2d subclass whose forward standardises W before F.conv2d."""
    class StdConv2d(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), StdConv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    model = converted(net, "fa")
    assert hasattr(model[2], "feedback") and type(model[2]).__name__ == "RoutedStdConv2d"
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 5
    with torch.no_grad():
        model[2].feedback.zero_()  # nothing below it learns: its error went through the feedback, not W
    got = grads_of(model, x, y)
    assert got["2.weight"].norm() > 0 and "0.weight" not in got or got["0.weight"].norm() == 0


def test_zoo_models_load_where_their_package_is_and_say_what_to_install_where_not(monkeypatch):
    from ekdaa.models import build_model

    class Stem(nn.Module):  # a stand-in torchvision builder with a 3-channel stem
        def __init__(self, num_classes: int):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))

    models = types.ModuleType("torchvision.models")
    models.list_models = lambda module=None: ["stem"]
    models.get_model = lambda name, weights=None, num_classes=1000: Stem(num_classes)
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    model = build_model("torchvision:stem", (1, 8, 8), 7)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)  # grey images fed to the 3-channel stem
    with pytest.raises(ValueError, match="torchvision has no classification model 'nope': choose one of stem"):
        build_model("torchvision:nope", (3, 8, 8), 7)
    monkeypatch.setitem(sys.modules, "timm", None)  # not installed
    with pytest.raises(ValueError, match=r"model timm:resnet18 needs timm, which does not import here .*pip install timm"):
        build_model("timm:resnet18", (3, 8, 8), 7)
    with pytest.raises(ValueError, match="keeps its own activations"):
        build_model("torchvision:stem", (3, 8, 8), 7, activation="relu")


@pytest.mark.slow
def test_every_torchvision_classification_builder_under_every_rule():
    """About an hour on 2 CPU cores; `pytest -m slow` where torchvision imports."""
    tv = pytest.importorskip("torchvision.models", reason="torchvision does not import here")
    sizes = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, "vit_b_16": 224, "vit_b_32": 224}
    for name in tv.list_models(module=tv):
        if name in ("vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf"):
            continue  # too large for a test
        size = sizes.get(name, 32)
        torch.manual_seed(0)
        net = build_model(f"torchvision:{name}", (3, size, size), 10)
        x, y = torch.randn(2, 3, size, size), torch.arange(2)
        updated = set(grads_of(copy.deepcopy(net), x, y))
        for rule in sorted(RULES):
            got = grads_of(converted(net, rule, x), x, y)
            assert all(g.isfinite().all() for g in got.values()), (name, rule)
            assert rule == "last-layer" or updated <= set(got), (name, rule, sorted(updated - set(got))[:3])


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
    nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="circular"), nn.Conv2d(4, 6, 4, padding="same"),
    nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="replicate"), nn.Conv2d(4, 6, 2, padding="valid", bias=False)],
    ids=["groups", "depthwise-reflect", "dilated-circular", "same-even", "strided-replicate", "valid"])
def test_every_convolution_sends_its_error_through_the_feedback_as_autograd_sends_it_through_w(conv):
    """With B set to W, FA is backprop: so the feedback path (one convolution_backward with B, padding
    modes through autograd's padding) is autograd's, groups, dilation and asymmetric 'same' included."""
    torch.set_default_dtype(torch.float64)
    try:
        conv = conv.double()
        for dims, layer in ((2, conv), (1, nn.Conv1d(4, 6, 3, padding=1, groups=2)), (3, nn.Conv3d(4, 4, 3, padding=1))):
            torch.manual_seed(0)
            net = nn.Sequential(nn.Conv1d(2, 4, 1) if dims == 1 else nn.Conv2d(2, 4, 1) if dims == 2 else
                                nn.Conv3d(2, 4, 1), nn.Tanh(), layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(5))
            x, y = torch.randn(3, 2, *[6] * dims), torch.arange(3)
            net(x)  # the lazy layer's size
            fa = converted(net, "fa", x)
            with torch.no_grad():
                for m in fa.modules():
                    if hasattr(m, "feedback"):
                        m.feedback.copy_(m.weight)
            got, want = grads_of(fa, x, y), grads_of(copy.deepcopy(net), x, y)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14)
    finally:
        torch.set_default_dtype(torch.float32)


def test_an_in_place_activation_may_follow_a_linear_layer_on_tokens():
    """torchvision's Swin V2 applies ReLU(inplace=True) after a Linear on a 3-d table: the converted
    layer's output must be its own tensor, not a view made inside the layer's function."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3), nn.Flatten(), nn.Linear(15, 2))
    x = torch.randn(3, 5, 4)
    for rule in ("fa", "sign-symmetry", "kolen-pollack", "dfa"):
        model = converted(net, rule, x)
        torch.testing.assert_close(model(x), net(x))
        assert grads_of(model, x, torch.arange(3) % 2)["0.weight"].norm() > 0


def test_dfa_sends_a_tensor_the_samples_share_the_sum_of_their_errors():
    """Swin V2's relative position bias: an MLP of a constant table, shared by every sample; its hidden
    activation gets the batch's sum of B e_L, so the MLP's first layer learns too."""
    class SharedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(5, 2))
            self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))

        def forward(self, x):
            return x + self.mlp(self.table).view(1, 5)

    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), SharedBias(), nn.Tanh(), nn.Linear(5, 4))
    x = torch.randn(6, 3)
    model = converted(net, "dfa", x)
    relu = model[2].mlp[1]
    assert type(relu).__name__ == "DirectFeedback" and relu.layout[0] is None and relu.feedback.shape == (4, 5, 8)
    got = grads_of(model, x, torch.arange(6) % 4)
    assert got["2.mlp.0.weight"].norm() > 0 and got["2.mlp.2.weight"].norm() > 0
