"""The ``ekdaa`` command: a thin layer over :mod:`ekdaa.train` and friends."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .analysis import ATTACKS, PICTURES, SCORE_ATTACKS
from .config import Diverged, Stopped, TrainConfig, TrainError, names_from
from .data import DATASET_NAMES, DataError, dataset_label
from .models import RECOMMENDED
from .rules import ConversionError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _train_options(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag, from the field's own declaration (its help, choices,
    group); defaults are None so a config file can sit between."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        meta, option = f.metadata, f.metadata["option"]
        if not meta["cli"]:
            continue
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        choices = option.choices() if callable(option.choices) else option.choices
        default = option.default  # a rule option's: the rule's default
        flag, kind = f"--{f.name.replace('_', '-')}", bool if str(f.type).startswith("bool") else type(default)
        if f.name == "model":
            choices = None  # torchvision:NAME and timm:NAME too: TrainConfig checks it
        models = [f"{m}: {r[f.name]}" for m, r in RECOMMENDED.items() if f.name in r]
        described = f"{option.help} (default {default}{''.join('; ' + m for m in models)})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=described)
        else:
            group.add_argument(flag, type=str if default is None else kind, help=described,
                               choices=choices)


def _config(args: argparse.Namespace) -> TrainConfig:
    """defaults < --config file (TOML, or a run's config.json) < flags; with --resume the run's
    own config (its checkpoint's) takes the place of the defaults and the file."""
    values: dict[str, Any] = {}
    if args.resume:
        if not args.out:
            raise TrainError("--resume needs --out RUN_DIR, the run to continue")
        if args.config:
            raise TrainError("--resume continues a run with its own config: drop --config")
        from .checkpoint import run_config
        values = dataclasses.asdict(run_config(args.out))
    elif args.config and args.config.endswith(".json"):
        values = dataclasses.asdict(TrainConfig.load(args.config))
        values["out"] = None  # a new run: its own --out
    elif args.config:
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
    from .distributed import teardown
    cfg = _config(args)
    try:
        summary = train(cfg, resume=args.resume).summary
    except BaseException:
        teardown()
        raise
    teardown(finished=True)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: summary[k] for k in ("rule", "dataset", "epochs", "test_accuracy", "seconds")}))
        print(f"run directory: {cfg.out}" if cfg.out else "no --out: nothing of this run was kept (pass --out "
              "runs/NAME for its checkpoint, metrics and model.pt)", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint
    checkpoint = Path(args.checkpoint)
    checkpoint = checkpoint / "checkpoint.pt" if checkpoint.is_dir() else checkpoint  # a run directory
    result = evaluate_checkpoint(checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                                 device=args.device, split=args.split, recompute_bn=args.recompute_bn)
    out = Path(args.out) if args.out else checkpoint.with_name(f"eval-{dataset_label(result['dataset'])}-{args.split}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['dataset']} {args.split}: accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
          f"({result['images']} images) -> {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    bench.execute(args)
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from .analysis import visualize
    for path in visualize(args.runs, args.what, args.out, device=args.device, data_dir=args.data_dir,
                          tsne_samples=args.tsne_samples):
        print(f"wrote {path}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from .analysis import (check_settings, markdown, merge_summaries, read_summary, robustness, robustness_summary,
                           summary_markdown, write_result, write_summary)
    if args.summary:
        earlier = read_summary(args.out)  # rows of other datasets or attacks stay
        if earlier is not None:
            check_settings(earlier, dict(eps_unit=args.eps_unit, samples=args.samples, steps=args.steps,
                                         queries=args.queries, seed=0))
        summary = robustness_summary(args.runs, args.attack, args.eps, args.eps_unit, args.substitute or (),
                                     args.samples, args.steps, args.queries, data_dir=args.data_dir,
                                     device=args.device)
        if earlier is not None:
            summary = merge_summaries(earlier, summary)
        print(summary_markdown(summary))
        paths = write_summary(summary, args.out)
    else:
        if len(args.attack) != 1 or len(args.substitute or ()) > 1 or args.attack[0] not in ATTACKS:
            raise ValueError("several attacks or substitutes, or square, need --summary (one table over all)")
        result = robustness(args.runs, args.attack[0], args.eps, args.eps_unit,
                            args.substitute[0] if args.substitute else None, args.samples, args.steps,
                            data_dir=args.data_dir, device=args.device)
        print(markdown(result))
        paths = write_result(result, args.out)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _attack_list(text: str) -> list[str]:
    return names_from(text, ATTACKS + SCORE_ATTACKS, "attack")


def _eps_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0,2,4,8") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"epsilons must be >= 0, got {text!r}")
    return values


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def _analysis_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with one sub-folder per dataset (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def _csv(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce
    seeds = [int(s) for s in args.seeds] if args.seeds else None
    records = reproduce(args.suite, args.datasets, args.rules, seeds, args.activations, args.data_dir, args.device,
                        args.results, args.runs, download=args.download, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"{len(records)} finished runs under {args.results}; write the table with: ekdaa report")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .reproduce import headline, report
    if args.headline:
        print(headline(args.results))
        return 0
    print(f"wrote {report(args.results, args.out)}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ekdaa", description="Train convolutional networks with EKDAA, "
                                "backprop, FA, DFA, sign symmetry or Kolen-Pollack.")
    p.add_argument("--version", action="version", version=f"ekdaa {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model", description="Train one run. Precedence: defaults < "
                       "--config file < flags.")
    t.add_argument("--config", help="TOML file of options (keys as flags, e.g. batch_size = 50), or a run's "
                   "config.json to train that run's config again (with a new --out)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, "
                   "with its own config; --epochs N extends it, --data-dir/--compile and --device (within cpu or "
                   "cuda) may change, any other change is refused")
    _train_options(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint", description="Accuracy of a checkpoint; "
                       "writes JSON beside it (or to --out).")
    e.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt, or its run directory")
    e.add_argument("--dataset", choices=DATASET_NAMES, help="dataset (default: the run's)")
    e.add_argument("--split", choices=("test", "train", "val"), default="test", help="split (default test)")
    e.add_argument("--data-dir", help="folder with one sub-folder per dataset (default: the run's)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    e.add_argument("--recompute-bn", type=_count, default=0, metavar="N",
                   help="first recompute every BatchNorm's statistics from N training images (unaugmented) under "
                        "the final weights, as 'precise BN' does; the checkpoint is not changed (default 0: off)")
    e.add_argument("--out", help="JSON file to write (default: eval-DATASET-SPLIT.json beside the checkpoint)")
    e.set_defaults(func=cmd_eval)

    from .reproduce import SUITES
    r = sub.add_parser("reproduce", help="run every missing run of a suite",
                       description="Train each run of a suite that has no record under --results yet; "
                       "interrupted runs resume from their checkpoints.")
    r.add_argument("--suite", required=True, help=f"a shipped suite ({', '.join(SUITES)}) or a .toml path")
    r.add_argument("--datasets", type=_csv, help="comma-separated subset of the suite's datasets")
    r.add_argument("--rules", type=_csv, help="comma-separated subset of the suite's rows (rule names/labels)")
    r.add_argument("--activations", type=_csv, help="comma-separated subset of the suite's activations")
    r.add_argument("--seeds", type=_csv, help="comma-separated seeds (default: the suite's)")
    r.add_argument("--data-dir", help="folder with one sub-folder per dataset")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    r.add_argument("--results", default="results", help="where run records go (default results)")
    r.add_argument("--runs", default="runs", help="where the runs' own directories (checkpoints) go, so that "
                   "an interrupted run resumes from there (default runs)")
    r.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download missing datasets; with --no-download a dataset whose files are absent is "
                   "skipped and noted for the report (default on)")
    r.add_argument("--dry-run", action="store_true", help="list each run as done, train, resume or skip; "
                   "train nothing")
    r.set_defaults(func=cmd_reproduce)

    rp = sub.add_parser("report", help="write RESULTS.md from finished runs",
                        description="Table of every finished suite run (mean ± std over seeds) and learning curves.")
    rp.add_argument("--results", default="results", help="run records folder (default results)")
    rp.add_argument("--out", default="RESULTS.md", help="Markdown file to write (default RESULTS.md)")
    rp.add_argument("--headline", action="store_true", help="print the README's results table instead")
    rp.set_defaults(func=cmd_report)

    from . import bench
    b = sub.add_parser("bench", help="time a training step of every rule (python -m ekdaa.bench)",
                       description=bench.__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_options(b)
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("visualize", help="draw filters, error kernels, t-SNE, learning/alignment curves",
                       description="PNG pictures of runs: per run filters, kernels, tsne; one plot of all "
                       "runs for curves and alignment.")
    v.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (written by train --out)")
    v.add_argument("--what", choices=(*PICTURES, "all"), default="all", help="which picture (default all)")
    v.add_argument("--out", default="results/figures", help="folder for the PNGs (default results/figures)")
    v.add_argument("--tsne-samples", type=_count, default=1000, help="first N test images for t-SNE (default 1000)")
    _analysis_options(v)
    v.set_defaults(func=cmd_visualize)

    a = sub.add_parser("attack", help="accuracy under FGSM/PGD/Square Attack, white-box, transferred or "
                       "score-based", description="Accuracy-vs-epsilon table (JSON, Markdown) and plot of one or "
                       "several target runs; white-box unless --substitute. With --summary: many targets (rules "
                       "x seeds), attacks and substitutes in one table, mean and std over seeds (summary.json).")
    a.add_argument("runs", nargs="+", metavar="RUN_DIR", help="target run directories")
    a.add_argument("--attack", type=_attack_list, default=["fgsm"], help="comma list of L-inf attacks: fgsm, "
                   "pgd (gradient; transfer with --substitute), square (queries the target's outputs only; "
                   "--summary) (default fgsm)")
    a.add_argument("--summary", action="store_true", help="summarise over seeds: summary.json/md/png in --out (rows already there for "
                   "other datasets or attacks are kept)")
    a.add_argument("--queries", type=bench.positive_int, default=300,
                   help="Square Attack queries per image (default 300)")
    a.add_argument("--eps", type=_eps_list, default=[0.0, 2.0, 4.0, 8.0], help="comma-separated epsilons "
                   "(default 0,2,4,8)")
    a.add_argument("--eps-unit", type=float, default=255.0, help="eps is in 1/UNIT of the pixel range "
                   "(default 255: grey levels)")
    a.add_argument("--substitute", metavar="RUN_DIR", action="append", help="craft on this run (e.g. an "
                   "independent bp run) and transfer to the targets (black-box); repeat it with --summary; "
                   "default: white-box on each target")
    a.add_argument("--samples", type=_count, default=1000, help="first N test images (0: all; default 1000)")
    a.add_argument("--steps", type=bench.positive_int, default=10, help="PGD steps (default 10)")
    a.add_argument("--out", default="results/robustness", help="folder for the table and plot "
                   "(default results/robustness)")
    _analysis_options(a)
    a.set_defaults(func=cmd_attack)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Diverged as err:
        print(f"ekdaa: error: {err}", file=sys.stderr)
        return 2
    except Stopped as err:
        if os.environ.get("RANK", "0") == "0":  # every process stopped at the same step: one says so
            print(f"ekdaa: {err}", file=sys.stderr)
        return 128 + err.signum
    except (TrainError, DataError, ConversionError, ValueError) as err:
        print(f"ekdaa: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the output's reader stopped early (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a path given that cannot be read or written
        where = f"{err.filename}: " if err.filename else ""
        print(f"ekdaa: error: {where}{err.strerror or err}: check the path, its permissions and the free space "
              "there", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print(f"ekdaa: interrupted{_what_was_kept(args)}", file=sys.stderr)
        return 130


def _what_was_kept(args: argparse.Namespace) -> str:
    """For an interrupted ``ekdaa train``: where its last checkpoint is, if it has one."""
    if args.func is not cmd_train:
        return ""
    out = getattr(args, "out", None)
    if out is None:
        return "; nothing was kept (no --out)"
    if (Path(out) / "checkpoint.pt").exists():
        return f"; the last checkpoint in {out} is intact: continue with ekdaa train --resume --out {out}"
    return f"; {out} holds no checkpoint yet (it starts again from the beginning with --resume)"


if __name__ == "__main__":
    sys.exit(main())
