"""Pictures of runs, as PNG files drawn with matplotlib's Agg canvas (no display, no pyplot).

* ``filters`` / ``kernels``: the first weight layer's W / feedback tensor (EKDAA's error
  kernels E, FA's B, ...) as a grid of images, RGB for 3-channel data, grey otherwise;
* ``tsne``: t-SNE of the penultimate layer on the first test images, coloured by class;
* ``curves``: loss and accuracy per epoch of one or several runs;
* ``alignment``: feedback and update angles per epoch, and sign flips of Sign networks
  (runs trained with track_alignment);
* :func:`plot_suite`: a suite's rows on one dataset (``ekdaa report``).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..rules import RULES
from .alignment import feedback_tensor, weight_layers
from .runs import RunDir

PICTURES = ("filters", "kernels", "tsne", "curves", "alignment")
DPI = 100
#: figure sizes in inches; a PNG is (width * DPI, height * DPI) pixels
SIZES = {"filters": (6.4, 6.8), "kernels": (6.4, 6.8), "tsne": (7.6, 6.4), "curves": (12.0, 4.8),
         "alignment": (12.0, 4.8), "robustness": (7.2, 5.0), "suite": (11.0, 5.5)}
MAX_TILES = 64
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "v", "D", "x")


def _figure(kind: str) -> Any:
    """A matplotlib Figure on an Agg canvas (matplotlib is imported here, on first use: the
    command line starts without it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=SIZES[kind], dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _colours(name: str = "tab10") -> Any:
    from matplotlib import colormaps
    return colormaps[name]


def rule_colour(rule: str) -> Any:
    """A rule's colour, the same in every plot: its place in the rule registry."""
    return _colours()(list(RULES).index(rule) % 10 if rule in RULES else 9)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def mosaic(weight: Tensor, image_shape: Sequence[int]) -> tuple[np.ndarray, int]:
    """The first ``MAX_TILES`` filters of a weight (conv: (n, c, kh, kw); linear: (n, c*h*w),
    shown as images of ``image_shape``) as one image in [0, 1] with 1-pixel white gaps; each
    filter scaled on its own so 0 is mid-grey. Returns the image and the number of columns."""
    w = weight.detach().float().cpu()
    w = (w.view(w.shape[0], *image_shape) if w.dim() == 2 else w)[:MAX_TILES]
    n, c, kh, kw = w.shape
    if c not in (1, 3):
        raise ValueError(f"first-layer filters have {c} input channels: only 1 (grey) or 3 (RGB) can be drawn")
    tiles = 0.5 + w / (2 * w.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.ones((rows * (kh + 1) + 1, cols * (kw + 1) + 1, c))
    for i, tile in enumerate(tiles.permute(0, 2, 3, 1).numpy()):
        r, q = divmod(i, cols)
        canvas[1 + r * (kh + 1):(r + 1) * (kh + 1), 1 + q * (kw + 1):(q + 1) * (kw + 1)] = tile
    return (canvas[..., 0] if c == 1 else canvas), cols


def has_kernels(run: RunDir) -> bool:
    """Whether the run's first layer has a feedback tensor of its own (not W, not none)."""
    layer = next(iter(weight_layers(run.model).values()))
    fb = feedback_tensor(layer)
    return fb is not None and fb is not layer.weight


def plot_filters(run: RunDir, out: Path, kernels: bool = False) -> Path:
    """The first weight layer's filters W, or with ``kernels`` its feedback tensor (EKDAA's error
    kernels E, FA's B, ...; at the first layer it sends no error anywhere, but shows what E learned)."""
    name, layer = next(iter(weight_layers(run.model).items()))
    what = "kernels" if kernels else "filters"
    if kernels and not has_kernels(run):
        raise ValueError(f"rule {run.cfg.rule!r} has no error kernels to draw (bp sends the error down "
                         "through W itself, see filters; dfa sends none through its weight layers)")
    tensor = feedback_tensor(layer) if kernels else layer.weight
    image, cols = mosaic(tensor, run.image_shape)
    kh, kw = tensor.shape[-2:] if tensor.dim() == 4 else run.image_shape[1:]
    fig = _figure(what)
    ax = fig.add_subplot()
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    rows = math.ceil(min(len(tensor), MAX_TILES) / cols)
    ax.set_xticks([1 + q * (kw + 1) + (kw - 1) / 2 for q in range(cols)], [str(q) for q in range(cols)])
    ax.set_yticks([1 + r * (kh + 1) + (kh - 1) / 2 for r in range(rows)], [str(r * cols) for r in range(rows)])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("filter index: column")
    ax.set_ylabel("filter index: first of row")
    label = "filters W"
    if kernels:
        label = layer.rule.feedback_label
    shown = f"{min(len(tensor), MAX_TILES)} of {len(tensor)}"
    ax.set_title(f"{run.label}: first-layer {label}, layer '{name}'\n{shown}, {kh}x{kw}, "
                 f"{'RGB' if image.ndim == 3 else 'grey'}, each scaled so 0 is mid-grey", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / f"{run.name}-{what}.png")


@torch.no_grad()
def penultimate(model: torch.nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """The input of the model's last weight layer (its penultimate representation), flattened."""
    last = list(weight_layers(model).values())[-1]
    captured: list[Tensor] = []
    handle = last.register_forward_pre_hook(lambda m, args: captured.append(args[0].flatten(1).cpu()))
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


def plot_tsne(run: RunDir, out: Path, samples: int = 1000, data_dir: str | None = None) -> Path:
    """t-SNE (scikit-learn, seed 0) of the penultimate layer on the first ``samples`` test images."""
    from sklearn.manifold import TSNE

    x, y, classes = run.test_images(samples, data_dir)
    features = penultimate(run.model, run.normalizer(x)).double().numpy()
    n = len(features)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 images, got {n}")
    points = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", learning_rate="auto",
                  random_state=0).fit_transform(features)
    labels = y.cpu().numpy()
    fig = _figure("tsne")
    ax = fig.add_subplot()
    cmap = _colours("tab10" if len(classes) <= 10 else "tab20")
    for k, cls in enumerate(classes):
        pick = labels == k
        ax.scatter(points[pick, 0], points[pick, 1], s=6, color=cmap(k), label=cls)
    ax.set_xlabel("t-SNE dimension 1")
    ax.set_ylabel("t-SNE dimension 2")
    ax.set_title(f"{run.label}: t-SNE of the penultimate layer ({features.shape[1]} units)\n"
                 f"first {n} {run.cfg.dataset} test images, coloured by class", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, title="class")
    fig.tight_layout()
    return _save(fig, out / f"{run.name}-tsne.png")


def _joint_name(runs: Sequence[RunDir]) -> str:
    return "+".join(run.name for run in runs)


def _series(records: list[dict[str, Any]], *keys: str) -> tuple[list[int], list[float]]:
    """Epochs and the values at ``record[keys[0]][keys[1]]...`` (NaN where missing) of a run's records."""
    values = []
    for value in records:
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        values.append(np.nan if value is None else value)
    return [r["epoch"] for r in records], values


#: How each split is drawn in learning curves: line style and marker (colour: the run).
SPLIT_STYLES = {"train": ("--", "o"), "val": (":", "s"), "test": ("-", "^")}


def plot_curves(runs: Sequence[RunDir], out: Path) -> Path:
    """Loss and accuracy per epoch (train: running mean over the epoch; val; test) of ``runs``:
    one row of panels per dataset, colour = run, line style and marker = split, a legend on every
    panel."""
    for run in runs:
        if not run.metrics:
            raise ValueError(f"run {run.path} has no metrics.jsonl records to plot")
    datasets = sorted({run.cfg.dataset for run in runs})
    fig = _figure("curves")
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height * len(datasets))
    cmap = _colours()
    for row, dataset in zip(fig.subplots(len(datasets), 2, squeeze=False), datasets):
        last = 1
        for i, run in enumerate(runs):
            if run.cfg.dataset != dataset:
                continue
            for split, (style, marker) in SPLIT_STYLES.items():
                for ax, quantity in zip(row, ("loss", "accuracy")):
                    epochs, values = _series(run.metrics, f"{split}_{quantity}")
                    if not np.isnan(values).all():
                        ax.plot(epochs, values, style, marker=marker, ms=4, color=cmap(i % 10),
                                label=f"{run.label} {split}")
                        last = max(last, epochs[-1])
        for ax, quantity in zip(row, ("loss (train: running mean over the epoch)", "accuracy")):
            ax.set(xlabel="epoch", ylabel=quantity.split(" ")[0], title=f"{dataset}: {quantity}",
                   xlim=(0.5, last + 0.5))  # one epoch too: a readable axis around it
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=7)
    fig.suptitle(f"Learning curves: {', '.join(run.label for run in runs)}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / f"{_joint_name(runs)}-curves.png")


def has_alignment(run: RunDir) -> bool:
    return any("alignment" in r for r in run.metrics)


def plot_alignment(runs: Sequence[RunDir], out: Path) -> Path:
    """Feedback and update angles per epoch, and for Sign networks the fraction of sign flips;
    colour = weight layer (k-th Conv2d/Linear from the input) or Sign layer, line style = run."""
    for run in runs:
        if not has_alignment(run):
            raise ValueError(f"run {run.path} logged no alignment: train it with --track-alignment")
    flips = any("sign_flips" in r for run in runs for r in run.metrics)
    fig = _figure("alignment")
    axes = fig.subplots(1, 3 if flips else 2)
    axes[1].sharey(axes[0])
    cmap = _colours()
    depth = 0
    for i, run in enumerate(runs):
        style = LINESTYLES[i % len(LINESTYLES)]
        records = [r for r in run.metrics if "alignment" in r]
        names = list(records[-1]["alignment"])
        depth = max(depth, len(names))
        for k, name in enumerate(names):
            for ax, key in zip(axes, ("feedback_angle", "update_angle")):
                epochs, values = _series(records, "alignment", name, key)
                ax.plot(epochs, values, style, marker="o", ms=3, color=cmap(k % 10))
        for k, name in enumerate(records[-1].get("sign_flips", {})):
            epochs, values = _series(records, "sign_flips", name)
            axes[2].plot(epochs, 100 * np.asarray(values), style, marker="s", ms=3, color=cmap(k % 10))
    titles = ("feedback tensor vs W", "rule's update vs backprop gradient\n(straight-through at Sign; same batch)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.axhline(90, color="grey", lw=0.8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("angle (degrees; 90 = orthogonal)")
    if flips:
        axes[2].set_title("Sign units whose sign flipped\nsince the previous epoch (same batch)", fontsize=10)
        axes[2].set_ylabel("% of units (colour: the Sign after weight layer k)")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=cmap(k % 10), label=f"weight layer {k + 1}") for k in range(depth)]
    handles += [Line2D([], [], color="black", ls=LINESTYLES[i % len(LINESTYLES)], label=run.label)
                for i, run in enumerate(runs)]
    axes[-1].legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Alignment with backprop: {', '.join(run.label for run in runs)}", fontsize=11)
    fig.tight_layout()
    return _save(fig, out / f"{_joint_name(runs)}-alignment.png")


def visualize(run_dirs: Sequence[str | Path], what: str = "all", out: str | Path = "results/figures",
              device: str = "auto", data_dir: str | None = None, tsne_samples: int = 1000,
              log: Callable[[str], None] = print) -> list[Path]:
    """Draw ``what`` (one of ``PICTURES`` or ``all``) for the runs into ``out``; returns the PNGs.
    Filters, kernels and t-SNE are one file per run; curves and alignment one file for all runs.
    ``all`` skips, with a line to ``log``, kernels of rules without any and untracked alignment."""
    if what not in (*PICTURES, "all"):
        raise ValueError(f"unknown picture {what!r}: choose one of {', '.join(PICTURES)}, all")
    runs = [RunDir(path, device) for path in run_dirs]
    out = Path(out)
    kinds = PICTURES if what == "all" else (what,)
    written: list[Path] = []
    for kind in kinds:
        if kind == "curves":
            written.append(plot_curves(runs, out))
        elif kind == "alignment":
            tracked = [run for run in runs if has_alignment(run)] if what == "all" else runs
            if len(tracked) < len(runs):
                log(f"alignment: skipped {', '.join(r.name for r in runs if r not in tracked)} "
                    "(trained without --track-alignment)")
            if tracked:
                written.append(plot_alignment(tracked, out))
        else:
            for run in runs:
                if kind == "kernels" and what == "all" and not has_kernels(run):
                    log(f"kernels: skipped {run.name} (rule {run.cfg.rule!r} has no error kernels)")
                elif kind == "tsne":
                    written.append(plot_tsne(run, out, tsne_samples, data_dir))
                else:
                    written.append(plot_filters(run, out, kernels=kind == "kernels"))
    return written


@dataclass
class SuiteRow:
    """One row of a suite's table: its label, rule, activation and each seed's metrics.jsonl."""

    label: str
    rule: str
    activation: str
    seeds: list[list[dict[str, Any]]]


def plot_suite(rows: Sequence[SuiteRow], title: str, path: Path) -> Path:
    """Test accuracy of a suite's rows on one dataset: per epoch, the mean over seeds with a
    band from the lowest to the highest seed; colour = rule, line style and marker = the row
    within its rule. A suite of one-epoch runs is drawn as bars (mean, whiskers min..max)."""
    fig = _figure("suite")
    ax = fig.add_subplot()
    rules = sorted({row.rule for row in rows}, key=lambda r: (list(RULES).index(r) if r in RULES else 99, r))
    colour = {rule: rule_colour(rule) for rule in rules}
    within: dict[str, int] = {}
    if all(len(m) == 1 for row in rows for m in row.seeds):
        rows = sorted(rows, key=lambda r: statistics.mean(100 * m[-1]["test_accuracy"] for m in r.seeds))
        for y, row in enumerate(rows):
            acc = [100 * m[-1]["test_accuracy"] for m in row.seeds]
            mean = statistics.mean(acc)
            ax.barh(y, mean, xerr=[[mean - min(acc)], [max(acc) - mean]], color=colour[row.rule], capsize=2)
            ax.text(max(acc) + 0.5, y, f"{mean:.1f}", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [f"{row.label} ({row.activation})" for row in rows], fontsize=7)
        ax.set_xlabel("test accuracy after one epoch (%; mean over seeds, whiskers min..max)")
        ax.grid(alpha=0.3, axis="x")
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color=colour[r], label=r) for r in rules], fontsize=7, loc="lower right")
    else:
        for row in rows:
            i = within[row.rule] = within.get(row.rule, -1) + 1
            epochs = [r["epoch"] for r in row.seeds[0]]
            acc = np.array([[100 * r["test_accuracy"] for r in m[:len(epochs)]] for m in row.seeds
                            if len(m) >= len(epochs)])
            ax.plot(epochs, acc.mean(0), LINESTYLES[i % len(LINESTYLES)], marker=MARKERS[i % len(MARKERS)], ms=4,
                    color=colour[row.rule], label=f"{row.label} ({row.activation}), {len(acc)} seed(s)")
            if len(acc) > 1:
                ax.fill_between(epochs, acc.min(0), acc.max(0), color=colour[row.rule], alpha=0.15, lw=0)
        ax.set(xlabel="epoch", ylabel="test accuracy (%; mean over seeds, band min..max)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_summary(summary: dict[str, Any], path: Path) -> Path:
    """Accuracy against eps (eps 0: the clean accuracy): one row of panels per dataset, one panel
    per attack; colour = rule (as in the suite plots), line style = substitute; the line is the
    mean over seeds, the band spans the lowest to the highest seed."""
    order = ("fgsm", "pgd", "square")
    datasets = sorted({r["dataset"] for r in summary["rows"]})
    attacks = sorted({r["attack"] for r in summary["rows"]}, key=lambda a: (order.index(a) if a in order else 9, a))
    fig = _figure("robustness")
    fig.set_size_inches(4.0 * len(attacks) + 3.0, 3.6 * len(datasets))
    axes = fig.subplots(len(datasets), len(attacks), squeeze=False)
    for row_axes, dataset in zip(axes, datasets):
        subs = sorted({r["substitute"] for r in summary["rows"] if r["dataset"] == dataset})
        for ax, attack in zip(row_axes, attacks):
            rows = [r for r in summary["rows"] if (r["dataset"], r["attack"]) == (dataset, attack)]
            if not rows:
                ax.set_axis_off()
                continue
            for rule, sub in sorted({(r["rule"], r["substitute"]) for r in rows}):
                line = sorted((r for r in rows if (r["rule"], r["substitute"]) == (rule, sub)), key=lambda r: r["eps"])
                eps = [0.0] + [r["eps"] for r in line]
                acc = np.array([line[0]["clean_accuracy"]] + [r["accuracy"] for r in line]) * 100
                style = LINESTYLES[subs.index(sub) % len(LINESTYLES)]
                label = f"{rule}, {len(line[0]['seeds'])} seed(s)" + ("" if sub.startswith("none") else f", from {sub}")
                ax.plot(eps, acc.mean(1), style, marker="o", ms=3, color=rule_colour(rule), label=label)
                if acc.shape[1] > 1:
                    ax.fill_between(eps, acc.min(1), acc.max(1), color=rule_colour(rule), alpha=0.15, lw=0)
            ax.set(title=f"{dataset}, {attack}", xlabel=f"eps (x/{summary['eps_unit']:g} of the pixel range)",
                   ylabel="test accuracy under attack (%)", ylim=(0, 100))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="upper right")
    fig.suptitle(f"first {summary['samples']} test images; mean over seeds, band min..max", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_robustness(result: dict[str, Any], path: Path) -> Path:
    """Accuracy against epsilon, one line per model, from :func:`~ekdaa.analysis.attacks.robustness`."""
    fig = _figure("robustness")
    ax = fig.add_subplot()
    eps = result["eps"]
    for row in result["rows"]:
        style = "--" if row["role"] == "substitute" else "-"
        suffix = " [gradients vanish: not robustness]" if row.get("note") else ""
        role = "substitute (white-box)" if row["role"] == "substitute" else row["role"]
        ax.plot(eps, row["accuracy"], style, marker="o", label=f"{row['run']} ({row['rule']}), {role}{suffix}")
    unit = result["eps_unit"]
    ax.set_xlabel("epsilon (L-inf, pixels in 0..1)" if unit == 1 else f"epsilon (L-inf, x/{unit:g} of the pixel range)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    steps = f", {result['steps']} steps" if result["attack"] == "pgd" else ""
    ax.set_title(f"{result['title']}\n{result['dataset']}, first {result['samples']} test images{steps}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
