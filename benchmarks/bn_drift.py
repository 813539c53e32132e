"""Does a rule drift a network's BatchNorm statistics? Train as a suite row would and, every N steps, print
the running training loss and accuracy, the validation accuracy in eval mode (running statistics) and in
train mode (the batch's own), and the largest shift of any BatchNorm's running mean from the validation
batch's mean, in the batch's standard deviations.

    python benchmarks/bn_drift.py --steps 1400 --every 200 error_map=one-sided
    python benchmarks/bn_drift.py --steps 1400 --every 200 error_map=centered

KEY=VALUE pairs are TrainConfig fields (defaults: the modern-cpu suite's mobilenet row on Fashion-MNIST,
EKDAA, data from ../shared/datasets).
"""
from __future__ import annotations

import argparse
import copy
import tomllib

import torch
import torch.nn.functional as F
from torch import nn

from ekdaa.data import batches
from ekdaa.train import TrainConfig, build, prepare_data

SUITE_ROW = dict(dataset="fashion-mnist", model="mobilenet", rule="ekdaa", batch_size=64, optimizer="adam", lr=1e-3,
                 val_split=5000, normalization="standard", augment=False, seed=0, data_dir="../shared/datasets")


def config(pairs: list[str]) -> TrainConfig:
    """The suite row with KEY=VALUE pairs over it, each VALUE a TOML value or else a bare string."""
    def value(text: str) -> object:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    return TrainConfig.from_dict({**SUITE_ROW, **{k: value(v) for k, v in (p.split("=", 1) for p in pairs)}})


def largest_shift(model: nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """max over BatchNorms and channels of |running mean - batch mean| / batch std, on ``x`` (train mode, on a
    copy: the model's statistics stay as they are)."""
    twin = copy.deepcopy(model).train()
    shifts = {}

    def record(name: str):
        def hook(module: nn.BatchNorm2d, inputs: tuple, output: torch.Tensor) -> None:
            h = inputs[0]
            mean, std = h.mean((0, 2, 3)), h.var((0, 2, 3)).sqrt().clamp_min(1e-6)
            shifts[name] = ((module.running_mean - mean).abs() / std).max().item()
        return hook

    for name, module in twin.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(record(name))
    with torch.no_grad():
        twin(x)
    name = max(shifts, key=shifts.get)
    return shifts[name], name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("fields", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = config(args.fields)
    device = torch.device("cpu")
    data = prepare_data(cfg, device)
    model, opt, _ = build(cfg, data, device)
    vx, vy = data.normalizer(data.val[0][:2000]), data.val[1][:2000]
    x, y = data.train
    gen = torch.Generator().manual_seed(cfg.seed)
    step, loss_sum, correct, seen = 0, 0.0, 0, 0
    model.train()
    while step < args.steps:
        for xb, yb in batches(x, y, cfg.batch_size, shuffle=True, generator=gen, drop_last=True):
            out = model(data.normalizer(xb))
            loss = F.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum, correct, seen = loss_sum + loss.item() * len(yb), correct + (out.argmax(1) == yb).sum().item(), \
                seen + len(yb)
            step += 1
            if step % args.every == 0:
                with torch.no_grad():
                    val_eval = (model.eval()(vx).argmax(1) == vy).float().mean().item()
                    val_train = (copy.deepcopy(model).train()(vx[:500]).argmax(1) == vy[:500]).float().mean().item()
                shift, where = largest_shift(model, vx[:500])
                print(f"step {step}  train loss {loss_sum / seen:.3f} acc {correct / seen:.3f}  val eval-mode "
                      f"{val_eval:.3f} train-mode {val_train:.3f}  largest BN mean shift {shift:.2f} std ({where})",
                      flush=True)
                loss_sum, correct, seen = 0.0, 0, 0
                model.train()
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
