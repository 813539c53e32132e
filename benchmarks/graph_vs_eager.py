"""How far a run replayed from a CUDA graph ends from the same run eager: the largest relative
difference of any weight after two epochs (digits, paper-cnn), with cuDNN/cuBLAS's default kernels
and with deterministic ones; and, for Adam, how far its capturable arithmetic (on the device, as
ekdaa runs it on a GPU) ends from the non-capturable one. Tells rounding from a real difference.

    python benchmarks/graph_vs_eager.py [--rules bp,sign-symmetry,ekdaa] [--epochs 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

import ekdaa.train  # noqa: E402
from ekdaa.checkpoint import load_checkpoint  # noqa: E402
from ekdaa.train import TrainConfig, train  # noqa: E402


def weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    train(cfg, log=lambda line: None, progress=False)
    return load_checkpoint(Path(cfg.out) / "checkpoint.pt")["model"]


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest max|a - b| / max|a| over the tensors, and the tensor's name."""
    return max((((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max().clamp_min(1e-30)).item(), k)
               for k in a if a[k].is_floating_point())


def deterministic(on: bool) -> None:
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on, warn_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="bp,sign-symmetry,ekdaa")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    runs = iter(range(10_000))

    def cfg(**kw) -> TrainConfig:
        base = dict(dataset="digits", model="paper-cnn", epochs=args.epochs, device="cuda")
        return TrainConfig(**{**base, **kw, "out": str(tmp / str(next(runs)))})

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: max |w_a - w_b| / max |w_a| after "
          f"{args.epochs} epochs (the tensor)")
    for det in (False, True):
        deterministic(det)
        kernels = "deterministic" if det else "default"
        for rule in args.rules.split(","):
            sgd = dict(rule=rule, optimizer="sgd", lr=0.01, lr_schedule="cosine")
            a, b = weights(cfg(**sgd)), weights(cfg(**sgd, cuda_graph=True))
            diff, name = worst(a, b)
            print(f"{kernels:13s} sgd  {rule:14s} graph vs eager   {diff:.2e} ({name})")
            again = weights(cfg(**sgd))
            print(f"{kernels:13s} sgd  {rule:14s} eager vs eager   {worst(a, again)[0]:.2e}")
        adam = dict(rule="ekdaa")
        a, b = weights(cfg(**adam)), weights(cfg(**adam, cuda_graph=True))
        diff, name = worst(a, b)
        print(f"{kernels:13s} adam ekdaa          graph vs eager   {diff:.2e} ({name})")
        plain = ekdaa.train.set_capturable
        ekdaa.train.set_capturable = lambda opt, on: plain(opt, False)  # the step count on the CPU
        try:
            c = weights(cfg(**adam))
        finally:
            ekdaa.train.set_capturable = plain
        print(f"{kernels:13s} adam ekdaa          non-capturable vs capturable eager {worst(a, c)[0]:.2e}")


if __name__ == "__main__":
    main()
