"""Convert zoo models under every rule and take one step: does every parameter backprop would update get
a finite update? One JSON line per model and rule.

    python benchmarks/zoo_check.py torchvision:resnet18 timm:convnext_atto@32 ...
    python benchmarks/zoo_check.py torchvision        # every torchvision classification builder

``NAME@SIZE`` sets the image side (default 32). Needs torchvision/timm installed beside torch.
"""
from __future__ import annotations

import copy
import json
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

import ekdaa
from ekdaa.models import build_model
from ekdaa.rules import RULES

#: torchvision builders too large for a CPU check, and the sides the others need
TOO_LARGE = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf"}
SIDES = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224}


def check(spec: str) -> None:
    name, _, side = spec.partition("@")
    size = int(side) if side else SIDES.get(name.split(":")[-1], 32)
    torch.manual_seed(0)
    net = build_model(name, (3, size, size), 10)
    x, y = torch.randn(2, 3, size, size), torch.arange(2)
    plain = copy.deepcopy(net)
    F.cross_entropy(plain(x), y).backward()
    want = {n for n, p in plain.named_parameters() if p.grad is not None}
    for rule in sorted(RULES):
        start = time.time()
        row: dict = dict(model=name, size=size, rule=rule)
        try:
            model = ekdaa.convert(copy.deepcopy(net), rule, example_input=x)
            F.cross_entropy(model(x), y).backward()
            got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            missing = sorted(want - set(got)) if rule != "last-layer" else []
            nonfinite = sorted(n for n, g in got.items() if not g.isfinite().all())
            row.update(ok=not missing and not nonfinite, missing=missing[:5], nonfinite=nonfinite[:5])
        except Exception as err:  # noqa: BLE001 - a row per failure, the check goes on
            row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:400]}", tb=traceback.format_exc()[-600:])
        print(json.dumps(dict(row, seconds=round(time.time() - start, 1))), flush=True)


def main(specs: list[str]) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if specs == ["torchvision"]:
        import torchvision.models as tv
        specs = [f"torchvision:{n}" for n in tv.list_models(module=tv) if n not in TOO_LARGE]
    for spec in specs:
        check(spec)


if __name__ == "__main__":
    main(sys.argv[1:])
