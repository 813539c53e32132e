"""The ``ekdaa`` command: a thin layer over :mod:`ekdaa.train` and friends."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .data import DATASETS, NORMALIZATIONS, DataError
from .models import ACTIVATIONS, MODELS
from .rules import RULES, ConversionError
from .train import AMP, OPTIMIZERS, SCHEDULES, Diverged, TrainConfig, TrainError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _train_options(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; defaults are None so a config file can sit between."""
    d = TrainConfig()
    g = p.add_argument_group("what to train")
    g.add_argument("--dataset", choices=list(DATASETS), help=f"dataset (default {d.dataset})")
    g.add_argument("--model", choices=list(MODELS), help=f"network (default {d.model})")
    g.add_argument("--rule", choices=list(RULES), help=f"learning rule (default {d.rule})")
    g.add_argument("--activation", choices=list(ACTIVATIONS), help=f"activation (default {d.activation})")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, help="biases in every layer (default off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"epochs (default {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"batch size (default {d.batch_size})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"optimizer (default {d.optimizer})")
    g.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    g.add_argument("--weight-decay", type=float, help=f"weight decay, also on learned feedback (default {d.weight_decay})")
    g.add_argument("--lr-schedule", choices=SCHEDULES, help="per-epoch schedule: cosine to 0, or x0.1 every "
                   f"epochs/3 (default {d.lr_schedule})")
    g = p.add_argument_group("EKDAA options (ignored by other rules)")
    g.add_argument("--beta", type=float, help=f"target step: h~ = h - beta*d (default {d.beta})")
    g.add_argument("--gamma", type=float, help=f"error-kernel learning rate relative to W's (default {d.gamma})")
    g.add_argument("--error-kernel-init", choices=("random", "transpose"),
                   help=f"random: Glorot, no weight transport; transpose: E = W at init (default {d.error_kernel_init})")
    g.add_argument("--pool-routing", choices=("max", "bilinear"),
                   help=f"how d passes max-pools (default {d.pool_routing})")
    g.add_argument("--error-norm", choices=("none", "max"),
                   help=f"divide each sample's d by max|d| when > 1 (default {d.error_norm})")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="folder with one sub-folder per dataset (fashion-mnist/, cifar-10/, "
                   "svhn/); default: $EKDAA_DATA or the user cache, downloading what is missing")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, help="download missing files (default on)")
    g.add_argument("--val-split", type=int, help="hold out this many training images for validation, fixed "
                   f"by seed (default {d.val_split})")
    g.add_argument("--train-subset", type=int, help="train on the first N training images only (0: all)")
    g.add_argument("--normalization", choices=NORMALIZATIONS,
                   help=f"half: x/255-0.5; standard: per-channel mean/std (default {d.normalization})")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="random crop (pad 4), plus horizontal flip for cifar10 (default off)")
    g = p.add_argument_group("machine and output")
    g.add_argument("--seed", type=int, help=f"seed of weights, feedback, split and order (default {d.seed})")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--amp", choices=AMP, help="bf16 autocast for the forward pass (default none)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="channels_last memory format")
    g.add_argument("--eval-batch-size", type=int, help=f"batch size for evaluation (default {d.eval_batch_size})")
    g.add_argument("--out", help="run directory for config, metrics, summary and checkpoint (default none)")


def _config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise TrainError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise TrainError(f"config file {path} is not valid TOML: {err}") from None
        values = {k.replace("-", "_"): v for k, v in values.items()}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train
    cfg = _config(args)
    summary = train(cfg, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("rule", "dataset", "epochs", "test_accuracy", "seconds")}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                                 device=args.device, split=args.split)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"eval-{result['dataset']}-{args.split}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['dataset']} {args.split}: accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
          f"({result['images']} images) -> {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    return bench.main(args.rest) or 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ekdaa", description="Train convolutional networks with EKDAA, "
                                "backprop, FA, DFA, sign symmetry or Kolen-Pollack.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model", description="Train one run. Precedence: defaults < "
                       "--config file < flags.")
    t.add_argument("--config", help="TOML file of options (keys as flags, e.g. batch_size = 50)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint "
                   "(its saved config, with the new --epochs)")
    _train_options(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint", description="Accuracy of a checkpoint; "
                       "writes JSON beside it (or to --out).")
    e.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt")
    e.add_argument("--dataset", choices=list(DATASETS), help="dataset (default: the run's)")
    e.add_argument("--split", choices=("test", "train", "val"), default="test", help="split (default test)")
    e.add_argument("--data-dir", help="folder with one sub-folder per dataset (default: the run's)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    e.add_argument("--out", help="JSON file to write (default: eval-DATASET-SPLIT.json beside the checkpoint)")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="time a training step of every rule (python -m ekdaa.bench)",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Diverged as err:
        print(f"ekdaa: error: {err}", file=sys.stderr)
        return 2
    except (TrainError, DataError, ConversionError, ValueError) as err:
        print(f"ekdaa: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ekdaa: interrupted; the checkpoint was saved: continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
