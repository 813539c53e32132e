"""Suites of runs (shipped in ``ekdaa/suites/*.toml``, or any .toml file) and the results
table built from them.

A suite file states its whole protocol::

    [suite]                      # name, machine it is sized for, what it compares
    datasets = ["fashion-mnist", "cifar10", "svhn"]
    rules = ["bp", "fa", "ekdaa"]
    activations = ["tanh", "sign"]
    seeds = [0]
    models = ["mobilenet", "vit"]  # optional: every row per model (labelled ekdaa-vit, ...), each with its
                                   # own activations unless the suite names some
    [defaults]                   # TrainConfig fields shared by every run
    model = "paper-cnn"
    epochs = 10
    [rules.ekdaa]                # per-rule fields (learning rate, beta, ...)
    lr = 0.01
    [datasets.cifar10]           # per-dataset fields (augmentation, ...)
    [[variants]]                 # extra labelled rows, e.g. EKDAA with E = W at init
    label = "ekdaa-transpose"
    rule = "ekdaa"
    error_kernel_init = "transpose"
    activations = ["tanh"]       # optional: the row runs for these activations only

Rules that need f'(h) are skipped for ``sign``. A run is identified by a hash of its
full config: ``reproduce`` trains each missing run (checkpoints under
``runs/<suite>/``, resumed after an interruption) and copies its small record
(config, metrics, summary, provenance) to ``results/<suite>/<dataset>/<run>/``.
A dataset that cannot be had (absent under ``download=False``, or its download
failed) is skipped and noted for the report; ``dry_run`` lists what would happen.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .data import DataError, dataset_label, missing_files, reachable
from .rules import RULES
from .checkpoint import read_metrics, writable_folder
from .config import MACHINE_FIELDS, Diverged, TrainConfig, TrainError
from .train import train

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

#: Fields that do not change what a run computes, left out of its identity.
NOT_IDENTITY = (*MACHINE_FIELDS, "extra")
#: The fields runs were first identified by. A field added since (a new general field, or a
#: new rule option) is part of a run's identity only away from its default, so every run
#: recorded before it keeps its name.
FIRST_FIELDS = frozenset((
    "dataset", "model", "rule", "activation", "bias", "epochs", "batch_size", "optimizer", "lr", "momentum",
    "weight_decay", "lr_schedule", "beta", "gamma", "error_kernel_init", "pool_routing", "error_norm",
    "val_split", "train_subset", "normalization", "augment", "seed", "amp", "channels_last", "track_alignment"))
#: The defaults of options whose default has changed since, as runs were identified by: a run counts another
#: rule's option (which it leaves at its default) and a field added since (away from this) by these.
FIRST_DEFAULTS = {"error_kernel_init": "random", "feedback_init": "glorot"}


@dataclasses.dataclass
class PlannedRun:
    label: str
    config: TrainConfig

    @property
    def key(self) -> str:
        defaults = TrainConfig()
        own = {o.name for o in RULES[self.config.rule].OPTIONS}
        fields = {}
        for k, v in dataclasses.asdict(self.config).items():
            v = FIRST_DEFAULTS[k] if k in FIRST_DEFAULTS and k not in own else v  # another rule's: unused
            if k not in NOT_IDENTITY and (k in FIRST_FIELDS or v != FIRST_DEFAULTS.get(k, getattr(defaults, k))):
                fields[k] = v
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        c = self.config
        return f"{self.label}-{c.activation}-s{c.seed}-{self.key}"


SUITES_DIR = Path(__file__).parent / "suites"
#: The suites that ship with the package, by name.
SUITES = sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def suite_path(suite: str | Path) -> Path:
    """A shipped suite's file by name (``cpu``), or the .toml path given."""
    if str(suite).endswith(".toml") or Path(suite).is_file():
        return Path(suite)
    if suite not in SUITES:
        raise TrainError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}, or give a .toml path")
    return SUITES_DIR / f"{suite}.toml"


def load_suite(suite: str | Path) -> dict[str, Any]:
    """A suite by name or path, parsed."""
    path = suite_path(suite)
    if not path.is_file():
        raise TrainError(f"suite {path} does not exist (shipped suites: {', '.join(SUITES)})")
    try:
        suite = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise TrainError(f"suite {path} is not valid TOML: {err}") from None
    suite.setdefault("suite", {}).setdefault("name", path.stem)
    return suite


def plan(suite: dict[str, Any], datasets: list[str] | None = None, rules: list[str] | None = None,
         seeds: list[int] | None = None, activations: list[str] | None = None) -> list[PlannedRun]:
    """Every run of ``suite`` (optionally narrowed to some datasets, row labels, seeds
    or activations), in a deterministic order."""
    head = suite["suite"]
    rows = [(r, r, {}, None) for r in head.get("rules", [])]
    rows += [(v["label"], v["rule"], {k: x for k, x in v.items() if k not in ("label", "activations")},
              v.get("activations")) for v in suite.get("variants", [])]
    unknown = sorted({rule for _, rule, _, _ in rows} - set(RULES))
    if unknown:
        raise TrainError(f"suite {head['name']}: unknown rules {unknown}; valid: {', '.join(RULES)}")
    models = head.get("models")  # a models axis: each row once per model, labelled with it
    runs = []
    for dataset in datasets or head["datasets"]:
        for model in models or [None]:
            # with a models axis, each model's own activations unless the suite names some
            for activation in activations or head.get("activations", [None] if models else ["tanh"]):
                for label, rule, variant, only in rows:
                    if (rules and label not in rules) or (only is not None and activation not in only):
                        continue
                    if activation == "sign" and RULES[rule].uses_derivative:
                        continue
                    for seed in seeds or head.get("seeds", [0]):
                        values = {**suite.get("defaults", {}), **suite.get("rules", {}).get(rule, {}),
                                  **suite.get("datasets", {}).get(dataset, {}), **variant,
                                  "rule": rule, "dataset": dataset, "activation": activation, "seed": seed,
                                  **({"model": model} if model else {})}
                        runs.append(PlannedRun(f"{label}-{model}" if model else label, TrainConfig.from_dict(values)))
    return runs


def provenance(suite: str) -> dict[str, Any]:
    """Where a run comes from: the package's commit (``+dirty`` with uncommitted changes), whatever
    the working directory, and the machine."""
    try:
        git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,  # noqa: E731
                                           cwd=Path(__file__).parent).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD") or None
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(suite=suite, commit=commit, machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"))


def reproduce(suite: str | Path, datasets: list[str] | None = None, rules: list[str] | None = None,
              seeds: list[int] | None = None, activations: list[str] | None = None,
              data_dir: str | None = None, device: str = "auto",
              results: str | Path = "results", runs_dir: str | Path = "runs", download: bool = True,
              dry_run: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Train every missing run of a suite (``dry_run``: only say, per run, done / train /
    resume / skip, with totals and a time estimate); return the record folders of its finished runs."""
    suite = load_suite(suite)
    name = suite["suite"]["name"]
    done, skipped, failed, checked = [], {}, {}, set()
    to_train: list[tuple[PlannedRun, bool]] = []
    origin = provenance(name)  # the code this process runs
    if not Path(results).is_dir():
        log(f"no {results}/ folder here: no run counts as done (run from the folder that holds it, or pass "
            "--results)")
    if not dry_run:  # before hours of training, not after
        for folder, flag in ((Path(results) / name, "--results"), (Path(runs_dir) / name, "--runs")):
            writable_folder(folder, flag)
    for run in plan(suite, datasets, rules, seeds, activations):
        ds = run.config.dataset
        record = Path(results) / name / dataset_label(ds) / run.name
        if (record / "summary.json").exists():
            done.append(record)
            if dry_run:
                log(f"done    {ds}/{run.name}")
            continue
        if ds not in checked:  # once per dataset: can its files be had?
            checked.add(ds)
            reason = missing_files(ds, data_dir)
            if reason and not download:
                skipped[ds] = f"{reason} (downloads off)"
            elif reason and dry_run and not reachable(ds):
                skipped[ds] = f"{reason}, and its download host cannot be reached (no network?)"
            elif reason and dry_run:
                log(f"download {ds} first: {reason}")
            if ds in skipped:
                log(f"skip {ds}: {skipped[ds]}")
        if ds in skipped:
            continue
        work = Path(runs_dir) / name / dataset_label(ds) / run.name
        cfg = dataclasses.replace(run.config, out=str(work), data_dir=data_dir, device=device, download=download)
        # a run stopped before its first checkpoint (config.json only) restarts through the resume path
        checkpointed = (work / "checkpoint.pt").exists()
        resume = checkpointed or (work / "config.json").exists()
        action = "resume" if checkpointed else "restart" if resume else "train"
        log(f"{action}{'  ' if dry_run else ' '}{ds}/{run.name}")
        if dry_run:
            to_train.append((run, checkpointed))
            continue
        try:
            train(cfg, resume=resume, log=log)
        except Diverged as err:  # recorded for the report; the suite goes on
            failed[f"{ds}/{run.name}"] = str(err)
            log(f"diverged {ds}/{run.name}: {err}")
            continue
        except DataError as err:  # the dataset cannot be had: the other datasets go on
            skipped[ds] = str(err)
            log(f"skip {ds}: {err}")
            continue
        record.mkdir(parents=True, exist_ok=True)
        for file in ("config.json", "metrics.jsonl", "summary.json"):
            shutil.copy(work / file, record / file)
        (record / "provenance.json").write_text(json.dumps({**origin, "label": run.label}, indent=2))
        done.append(record)
    if dry_run:
        log(_totals(done, to_train, skipped))
    for file, notes in (("skipped.json", skipped), ("diverged.json", failed)):
        if notes and not dry_run:
            path = Path(results) / name / file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(notes, indent=2) + "\n")
    return done


def _totals(done: list[Path], to_train: list[tuple[PlannedRun, bool]], skipped: dict[str, str]) -> str:
    """A dry run's last line: how many runs are done, to train and skipped, and about how long the
    training would take at the pace of the finished records of the same dataset and model."""
    pace: dict[tuple[str, str], list[float]] = {}  # seconds per epoch
    for record in done:
        s = json.loads((record / "summary.json").read_text())
        if s.get("seconds") and s.get("epochs"):
            pace.setdefault((s["dataset"], s["model"]), []).append(s["seconds"] / s["epochs"])
    known = [(run, statistics.mean(pace[key])) for run, _ in to_train
             if (key := (run.config.dataset, run.config.model)) in pace]
    hours = sum(per_epoch * run.config.epochs for run, per_epoch in known) / 3600
    line = (f"{len(done)} done, {len(to_train)} to train ({sum(r for _, r in to_train)} resuming), "
            f"{len(skipped)} dataset(s) skipped")
    if known:
        line += (f"; about {hours:.1f} h for {len(known)} of them at the pace of the finished records (full runs; "
                 "a resumed one needs less)")
    if len(known) < len(to_train):
        line += f"; no estimate for {len(to_train) - len(known)} (no finished run of their dataset and model)"
    return line


# -- the report ------------------------------------------------------------------

def _records(results: Path) -> Iterator[dict[str, Any]]:
    for summary in sorted(results.glob("*/*/*/summary.json")):
        folder = summary.parent
        prov = json.loads((folder / "provenance.json").read_text())
        metrics = read_metrics(folder / "metrics.jsonl")
        yield dict(folder=folder, summary=json.loads(summary.read_text()), provenance=prov, metrics=metrics,
                   suite=folder.parts[-3], dataset=folder.parts[-2])


def _runs_report(folder: Path, out: Path) -> Path:
    """RESULTS.md for run directories anywhere under ``folder`` (``ekdaa train --out``), one row each."""
    runs = sorted(p.parent for p in folder.glob("**/summary.json") if (p.parent / "config.json").exists())
    if not runs:
        raise TrainError(f"no finished runs under {folder}: pass --results pointing at suite records (ekdaa "
                         "reproduce) or at a folder of run directories (ekdaa train --out)")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = ["# Runs", "", f"Every finished run directory under `{folder}` (`ekdaa train --out`); accuracies in %.",
             "", "| run | rule | dataset | model | activation | epochs | seed | test acc | val acc | train acc | "
             "wall time (s) |", "|" + " --- |" * 11]
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        lines.append(f"| {run.relative_to(folder).as_posix()} | {s['rule']} | {s['dataset']} | {s['model']} | "
                     f"{s['activation']} | {s['epochs']} | {s['seed']} | {pct(s['test_accuracy'])} | "
                     f"{pct(s['val_accuracy'])} | {pct(s['train_accuracy'])} | {s['seconds']:.0f} |")
    out.write_text("\n".join(lines) + "\n")
    return out


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def report(results: str | Path = "results", out: str | Path = "RESULTS.md") -> Path:
    """Write the results table (mean ± std over seeds per suite, dataset, row,
    activation) and learning-curve PNGs under ``results/figures``. A suite's
    ``results/SUITE/NOTES.md``, if any, is quoted under its heading. A folder of run directories
    written by ``ekdaa train --out`` (no suite records) gets one table of its runs."""
    results = Path(results)
    if not any(results.glob("*/*/*/provenance.json")):
        return _runs_report(results, Path(out))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in _records(results):
        s = rec["summary"]
        groups.setdefault((rec["suite"], rec["dataset"], rec["provenance"]["label"], s["activation"]), []).append(rec)
    lines = ["# Results", "", "Every row is measured by us: `ekdaa reproduce --suite SUITE` trains the runs, "
             "`ekdaa report` writes this file. Accuracies in %, mean ± std over seeds (test set; "
             "train accuracy is the running mean over the last epoch).", ""]
    for suite in sorted({k[0] for k in groups}):
        lines += [f"## Suite `{suite}`", ""]
        notes = results / suite / "NOTES.md"  # hand-written: what the rows show, targets met or missed
        if notes.exists():
            lines += [notes.read_text().strip(), ""]
        skipped = results / suite / "skipped.json"
        for dataset in sorted({k[1] for k in groups if k[0] == suite}):
            keys = sorted((k for k in groups if k[:2] == (suite, dataset)), key=lambda k: (k[3], k[2]))
            figure = _curves(results, suite, dataset, {k: groups[k] for k in keys})
            lines += [f"### {dataset}", "", f"![learning curves]({figure.as_posix()})", "",
                      "| rule | activation | test acc | val acc | train acc | epochs | seeds | wall time (s) | images/s | commit | machine |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for key in keys:
                recs = groups[key]
                summ = [r["summary"] for r in recs]
                vals = [s["val_accuracy"] for s in summ if s["val_accuracy"] is not None]
                prov = recs[0]["provenance"]
                lines.append(
                    f"| {key[2]} | {key[3]} | {_mean_std([s['test_accuracy'] for s in summ])} | {_mean_std(vals)} | "
                    f"{_mean_std([s['train_accuracy'] for s in summ])} | {summ[0]['epochs']} | {len(summ)} | "
                    f"{statistics.mean(s['seconds'] for s in summ):.0f} | "
                    f"{statistics.mean(s['images_per_s'] or 0 for s in summ):.0f} | {prov['commit']} | "
                    f"{prov['machine']}, {prov['cpus']} cpus |")
            lines += [""] + _best_by_validation({k: groups[k] for k in keys})
        if skipped.exists():
            for dataset, reason in json.loads(skipped.read_text()).items():
                lines += [f"### {dataset}", "", f"Skipped: {reason}", ""]
        diverged = results / suite / "diverged.json"
        if diverged.exists():
            lines += ["### Diverged runs", ""] + [f"- {run}: {why}" for run, why in
                                                  json.loads(diverged.read_text()).items()] + [""]
    lines += _robustness(results)
    out = Path(out)
    out.write_text("\n".join(lines) + "\n")
    return out


#: The README's results table: per row a suite, a dataset, what the row is, and which run of each rule it
#: shows: a label (``{rule}`` for the rule's name), or None for the rule's row with the best validation
#: accuracy (never test: ``_best_by_validation``'s choice).
HEADLINE = (
    ("quickstart", "digits", "paper-cnn, tanh, Adam, 10 epochs", "{rule}"),
    ("digits-defaults", "digits", "ResNet-20, tanh, Adam, 5 epochs", "{rule}"),
    ("digits-defaults", "digits", "ResNet-20, tanh, SGD lr 0.05, 5 epochs", "{rule}-sgd"),
    ("cpu", "fashion-mnist", "small-cnn, tanh, SGD or Adam, 5 epochs", None),
    ("cpu", "cifar10", "small-cnn, tanh, SGD or Adam, 5 epochs", None),
    ("resnet-cpu", "cifar10", "ResNet-20, ReLU, SGD, 10 epochs", None),
    *(("modern-cpu", dataset, f"{model}, Adam, 3 epochs", f"{{rule}}-{model}") for dataset in ("fashion-mnist", "cifar10")
      for model in ("mobilenet", "convnext", "vit")),
)
HEADLINE_RULES = ("bp", "ekdaa", "kolen-pollack", "sign-symmetry", "fa", "dfa", "last-layer")


def headline(results: str | Path = "results") -> str:
    """The README's results table from the records (``HEADLINE``): test accuracy in %, the mean over the
    seeds recorded (their number in brackets), "-" where a rule has no record."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in _records(Path(results)):
        if rec["summary"]["activation"] != "sign":  # the sign networks' rows are their own table's
            groups.setdefault((rec["suite"], rec["dataset"], rec["provenance"]["label"]), []).append(rec)
    lines = ["| suite | dataset | network, optimizer, budget | " + " | ".join(HEADLINE_RULES) + " |",
             "| --- | --- | --- |" + " --- |" * len(HEADLINE_RULES)]
    for suite, dataset, what, label in HEADLINE:
        rows = {k[2]: v for k, v in groups.items() if k[:2] == (suite, dataset)}
        cells = []
        for rule in HEADLINE_RULES:
            if label is not None:
                recs = rows.get(label.format(rule=rule), [])
            else:
                chosen = _chosen_labels({(suite, dataset, lbl, None): recs for lbl, recs in rows.items()})
                recs = rows.get(chosen.get(rule, rule), [])
            accs = [r["summary"]["test_accuracy"] for r in recs]
            cells.append(f"{100 * statistics.mean(accs):.2f} ({len(accs)})" if accs else "-")
        lines.append(f"| `{suite}` | {dataset} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _robustness(results: Path) -> list[str]:
    """The robustness summaries (``ekdaa attack --summary --out results/robustness[/NAME]``), each
    with its plot, under their hand-written ``results/robustness/NOTES.md``."""
    folder = results / "robustness"
    summaries = sorted(folder.glob("**/summary.md"))
    if not summaries:
        return []
    lines = ["## Robustness", ""]
    if (folder / "NOTES.md").exists():
        lines += [(folder / "NOTES.md").read_text().strip(), ""]
    for md in summaries:
        where = md.parent.relative_to(results)
        lines += [f"### `{where.as_posix()}`", "", f"![accuracy under attack]({(md.parent / 'summary.png').as_posix()})", "",
                  md.read_text().replace("\n### ", "\n#### ").strip(), ""]
    return lines


def _chosen_labels(rows: dict[tuple, list[dict[str, Any]]]) -> dict[str, str]:
    """Each rule's row with the best mean validation accuracy (its own methods aside, as
    :func:`_best_by_validation` keeps them), by rule; a rule with no validation record is left out."""
    scores: dict[str, list[tuple[float, str]]] = {}
    for (_, _, label, _), recs in rows.items():
        summary = recs[0]["summary"]
        options = summary.get("rule_options", {})
        if options.get("error_kernel_init") == "transpose" or options.get("target_function", "activation") != "activation":
            continue
        vals = [r["summary"]["val_accuracy"] for r in recs if r["summary"]["val_accuracy"] is not None]
        if vals:
            scores.setdefault(summary["rule"], []).append((statistics.mean(vals), label))
    return {rule: max(s)[1] for rule, s in scores.items()}


def _best_by_validation(rows: dict[tuple, list[dict[str, Any]]]) -> list[str]:
    """Where a rule has several rows (a sweep), name the one with the best mean
    validation accuracy per rule and activation: the choice never looks at test. EKDAA
    with E = W at initialisation transports weights, so it is chosen among its own rows;
    EKDAA with a smooth target is not the paper's equation, so it too is its own method."""
    scores: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for (_, _, label, activation), recs in rows.items():
        vals = [r["summary"]["val_accuracy"] for r in recs if r["summary"]["val_accuracy"] is not None]
        summary = recs[0]["summary"]
        method = summary["rule"]
        options = summary.get("rule_options", {})
        if options.get("error_kernel_init") == "transpose":
            method += " (E = W at init)"
        if options.get("target_function", "activation") != "activation":
            method += f" ({options['target_function']} target)"
        if vals:
            scores.setdefault((method, activation, summary.get("model")), []).append((statistics.mean(vals), label))
    chosen = [f"- {method} ({activation}): `{max(s)[1]}`, validation {100 * max(s)[0]:.2f} % (best of {len(s)} rows)"
              for (method, activation, _), s in sorted(scores.items()) if len(s) > 1]
    return ["Chosen on validation accuracy (never test):", ""] + chosen + [""] if chosen else []


def _curves(results: Path, suite: str, dataset: str, rows: dict[tuple, list[dict[str, Any]]]) -> Path:
    from .analysis.pictures import SuiteRow, plot_suite
    table = [SuiteRow(label, recs[0]["summary"]["rule"], activation, [r["metrics"] for r in recs])
             for (_, _, label, activation), recs in rows.items()]
    return plot_suite(table, f"{dataset}: test accuracy, suite {suite}",
                      results / "figures" / f"{suite}-{dataset}-curves.png")
