"""How the feedback tensor's scale moves the error through BatchNorm (README, "Feedback scale").

    python benchmarks/feedback_scale.py                       # ResNet-20 at initialisation
    python benchmarks/feedback_scale.py --data-dir DIR --steps 21   # plus CIFAR-10 under resnet-cpu's SGD

1. Random 8x8 inputs (seed 0, 32 images): the first convolution's relative update |dW| / |W| under
   backprop and under every random-feedback rule, Glorot against ``layer-init`` feedback.
2. Digits (128 training images): RMS of the per-sample error d arriving at each of EKDAA's error
   maps, top to bottom, tanh and ReLU, beta 0.9, both error-kernel inits.
3. With ``--data-dir``: ``--steps`` SGD steps on CIFAR-10 batches of 128 with the resnet-cpu suite's
   optimizer, printing every third convolution's relative update every ten steps.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import ekdaa
from ekdaa.config import TrainConfig
from ekdaa.data import load_dataset
from ekdaa.models import build_model
from ekdaa.rules import RULES
from ekdaa.rules.ekdaa import ErrorMap
from ekdaa.train import build, prepare_data

RANDOM_FEEDBACK = [name for name, rule in RULES.items() if rule.init_option]


def options(rule: str, init: str | None) -> dict:
    """The rule's init ``init``, or its Glorot draw (the default this benchmark was written for; ``auto`` now
    takes W's own scale in a network with BatchNorm)."""
    return {RULES[rule].init_option: init or RULES[rule].glorot}


def relative_update(model: nn.Module) -> list[float]:
    return [(m.weight.grad.norm() / m.weight.norm()).item() for m in model.modules() if isinstance(m, nn.Conv2d)]


def at_initialisation() -> None:
    torch.manual_seed(0)
    net = build_model("resnet20", (3, 8, 8), 10)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    print("first convolution's |dW| / |W| at initialisation (ResNet-20, random 8x8 inputs):")
    runs = [("bp", None)] + [(rule, init) for rule in RANDOM_FEEDBACK for init in (None, "layer-init")]
    for rule, init in runs:
        torch.manual_seed(1)  # the same feedback draw whatever the order of the runs
        model = ekdaa.convert(copy.deepcopy(net), rule, **(options(rule, init) if rule != "bp" else {}))
        F.cross_entropy(model(x), y).backward()
        print(f"  {rule:14s} {init or 'default':10s} {relative_update(model)[0]:10.4g}")


def error_through_depth() -> None:
    ds = load_dataset("digits", None, download=False)
    x, y = ds.train_x[:128].float() / 255 - 0.5, ds.train_y[:128]
    print("RMS of d at EKDAA's error maps, top to bottom (ResNet-20, digits, beta 0.9):")
    for activation in ("tanh", "relu"):
        torch.manual_seed(0)
        net = build_model("resnet20", ds.image_shape, ds.num_classes, activation=activation)
        for init in ("random", "layer-init"):
            model = ekdaa.convert(copy.deepcopy(net), "ekdaa", beta=0.9, error_kernel_init=init)
            rms: list[float] = []
            for m in model.modules():
                if isinstance(m, ErrorMap):  # the gradient handed down is d / N under a batch-mean loss
                    m.register_full_backward_hook(lambda m, gi, go: rms.append(go[0].square().mean().sqrt().item()
                                                                               * len(x)))
            F.cross_entropy(model(x), y).backward()
            print(f"  {activation:5s} {init:10s} " + " ".join(f"{r:.3g}" for r in rms))


def cifar_steps(data_dir: str, steps: int) -> None:
    suite = dict(dataset="cifar10", model="resnet20", activation="relu", batch_size=128, optimizer="sgd", lr=0.05,
                 momentum=0.9, weight_decay=5e-4, lr_schedule="cosine", epochs=10, val_split=5000,
                 normalization="standard", data_dir=data_dir, download=False, seed=0)
    runs = [("bp", {}), ("ekdaa", dict(beta=0.9, error_norm="max", error_kernel_init="random")),
            ("ekdaa", dict(beta=0.9, error_norm="max", error_kernel_init="layer-init"))]
    print(f"every third convolution's |dW| / |W| over {steps} SGD steps (CIFAR-10, resnet-cpu's optimizer):")
    for rule, opts in runs:
        cfg = TrainConfig(**suite, rule=rule, **opts)
        data = prepare_data(cfg, torch.device("cpu"))
        model, opt, _ = build(cfg, data, torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        print(f"  {rule} {opts.get('error_kernel_init', '')}")
        for step in range(steps):
            idx = torch.randint(0, len(data.train[0]), (128,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(data.normalizer(data.train[0][idx])), data.train[1][idx]).backward()
            if step % 10 == 0:
                print(f"    step {step:3d}: " + " ".join(f"{r:.3g}" for r in relative_update(model)[::3]))
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder holding cifar-10/: also run part 3")
    parser.add_argument("--steps", type=int, default=21, help="SGD steps of part 3")
    args = parser.parse_args()
    at_initialisation()
    error_through_depth()
    if args.data_dir:
        cifar_steps(args.data_dir, args.steps)


if __name__ == "__main__":
    main()
