"""Adversarial robustness: FGSM and PGD (L-inf), white-box or transferred from a substitute,
and Square Attack, which only queries the target's outputs; one run at a time
(:func:`robustness`) or many runs summarised over seeds (:func:`robustness_summary`).

Images are attacked in pixel space (floats in 0..255, the run's normalisation applied inside
the model); eps is given in units of ``1 / eps_unit`` of the pixel range, e.g. eps 8 with
eps_unit 255 moves every pixel by at most 8 grey levels.

* white-box: examples are crafted with the target's own true input gradient, from its plain
  (autograd) twin: a converted model's backward is its rule's, not the gradient.
* transfer (black-box, as in the EKDAA paper): examples are crafted on a substitute run (e.g.
  a backprop-trained one, any architecture on the same dataset) and shown to the targets.

A target whose input gradient is zero (``sign`` activations) cannot be attacked white-box:
its examples stay unperturbed, and the result says so instead of reporting robustness.

Why a few dozen lines of our own rather than an attack library: torchattacks needs
torchvision (a second build tied to each torch release) and pins requests~=2.25; foolbox
needs eagerpy and GitPython; ART is a large toolbox. FGSM and PGD are a few lines each, and
what matters here is ours anyway: differentiating the plain twin, attacking in pixel space
through the run's normaliser, and reusing one set of examples across targets.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Normalizer
from .pictures import plot_robustness
from .runs import RunDir

ATTACKS = ("fgsm", "pgd")
#: Attacks that only query the model's outputs (no gradient, no substitute).
SCORE_ATTACKS = ("square",)
PIXEL_RANGE = (0.0, 255.0)
#: What a summary row holds per seed (with its mean and std over seeds).
MEASURES = ("accuracy", "clean_accuracy", "fraction_of_clean")
#: Two rules are compared at equal clean accuracy when theirs differ by at most this (2 points).
CLEAN_GAP = 0.02
#: The settings a summary's rows were measured with: rows merge only when these agree.
SETTINGS = ("eps_unit", "samples", "steps", "queries", "seed")


class PixelModel(nn.Module):
    """A model on raw pixel values (floats in 0..255): applies the run's normalisation first,
    with the same arithmetic as :class:`~ekdaa.data.Normalizer`."""

    def __init__(self, model: nn.Module, normalizer: Normalizer):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.register_buffer("mean", normalizer.mean.float().view(-1, 1, 1))
        self.register_buffer("std", normalizer.std.float().view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """d loss / d x of the summed cross-entropy."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Fast gradient sign method (Goodfellow et al., 2015): one step of eps along sign(grad)."""
    return (x + eps * input_gradient(model, x, y).sign()).clamp(*PIXEL_RANGE)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 10,
        generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient descent, L-inf (Madry et al., 2018): a uniform random start in the
    eps-ball, then ``steps`` signed steps of 2.5 eps / steps, each projected back onto the ball
    and the pixel range."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).mul_(2).sub_(1)
    adv = (x + eps * noise).clamp(*PIXEL_RANGE)
    for _ in range(steps):
        adv = adv + 2.5 * eps / steps * input_gradient(model, adv, y).sign()
        adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(*PIXEL_RANGE)
    return adv


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """The true class's logit minus the largest other one: the image is misclassified below 0."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - logits.scatter(1, y[:, None], float("-inf")).amax(1)


# the fractions of a 10,000-query run at which Square Attack halves its square's area
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@torch.no_grad()
def square(model: nn.Module, x: Tensor, y: Tensor, eps: float, queries: int = 300, p_init: float = 0.05,
           generator: torch.Generator | None = None, batch_size: int = 128) -> Tensor:
    """Square Attack, L-inf (Andriushchenko et al., 2020): a score-based black-box attack that
    only queries the model's outputs. Start from vertical stripes of +-eps; at each query set a
    random square (area a fraction p of the image, p halving on the paper's schedule) to +-eps per
    channel and keep the change where it lowers the margin; images already misclassified stop.
    The model sees ``batch_size`` images at a time (on CPU, larger activations are fresh memory
    at every query: a third of the time went to page faults at 1,000 images)."""

    def scores(images: Tensor, labels: Tensor) -> Tensor:
        return torch.cat([margin(model(images[i:i + batch_size].clamp(*PIXEL_RANGE)), labels[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])

    n, c, h, w = x.shape
    rand = dict(generator=generator, device=x.device)
    stripes = torch.randint(0, 2, (n, c, 1, w), **rand).to(x.dtype).mul_(2).sub_(1)
    delta = (eps * stripes).expand(n, c, h, w).clone()
    best = scores(x + delta, y)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    for i in range(queries):
        active = (best > 0).nonzero().squeeze(1)
        if not len(active):
            break
        p = p_init / 2 ** sum(i * 10_000 / queries > t for t in _HALVINGS)
        side = max(1, min(h, w, round((p * h * w) ** 0.5)))
        top = torch.randint(0, h - side + 1, (len(active),), **rand)
        left = torch.randint(0, w - side + 1, (len(active),), **rand)
        inside = (((rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side))[:, :, None]
                  & ((cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side))[:, None, :])
        signs = torch.randint(0, 2, (len(active), c, 1, 1), **rand).to(x.dtype).mul_(2).sub_(1)
        candidate = torch.where(inside[:, None], eps * signs, delta[active])
        score = scores(x[active] + candidate, y[active])
        better = score < best[active]
        delta[active[better]] = candidate[better]
        best[active[better]] = score[better]
    return (x + delta).clamp(*PIXEL_RANGE)


def craft(attack: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 10,
          seed: int = 0, batch_size: int = 500) -> Tensor:
    """Adversarial examples for the pixel images ``x`` (eps in pixels), in batches."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")
    if eps == 0:
        return x.clone()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    parts = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        parts.append(fgsm(model, xb, yb, eps) if attack == "fgsm" else pgd(model, xb, yb, eps, steps, generator))
    return torch.cat(parts)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / max(1, len(y))


def zero_gradient_fraction(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Fraction of images whose input gradient is exactly zero (nothing for an attack to follow)."""
    zero = sum(int((input_gradient(model, x[i:i + batch_size], y[i:i + batch_size]).flatten(1)
                    .abs().amax(1) == 0).sum()) for i in range(0, len(x), batch_size))
    return zero / max(1, len(y))


def _vanishing_note(run: RunDir, fraction: float, whitebox: bool) -> str | None:
    if fraction == 0:
        return None
    cause = f"input gradients of {run.name} (activation {run.cfg.activation!r}) are zero for {fraction:.0%} of the images"
    if whitebox:
        return (f"{cause}: the white-box attack cannot move them, so accuracy here is not evidence of "
                "robustness; use a transfer attack (--substitute)")
    return f"{cause}: the substitute cannot craft examples for them; pick a differentiable substitute"


def _targets(targets: Sequence[str | Path], eps: Sequence[float], eps_unit: float, device: str) -> list[RunDir]:
    """The target runs, once the request is checked."""
    if not targets:
        raise ValueError("give at least one target run directory")
    if any(e < 0 for e in eps) or not eps_unit > 0:
        raise ValueError("eps must be >= 0 and eps_unit > 0")
    return [RunDir(path, device) for path in targets]


def robustness(targets: Sequence[str | Path], attack: str = "fgsm", eps: Sequence[float] = (0, 2, 4, 8),
               eps_unit: float = 255.0, substitute: str | Path | None = None, samples: int = 1000,
               steps: int = 10, data_dir: str | None = None, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Accuracy of each target run under ``attack`` at each ``eps`` (in 1/eps_unit of the pixel
    range) on the first ``samples`` test images (0: all). White-box without ``substitute``;
    otherwise transfer: examples crafted on the substitute run, whose own (white-box) accuracy is
    one row, role "substitute", also when it is among the targets."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")
    runs = _targets(targets, eps, eps_unit, device)
    sub = RunDir(substitute, device) if substitute is not None else None
    for run in runs + ([sub] if sub else []):
        if run.cfg.dataset != runs[0].cfg.dataset:
            raise ValueError(f"runs {runs[0].name} and {run.name} use different datasets "
                             f"({runs[0].cfg.dataset}, {run.cfg.dataset}): attack runs of one dataset")
    x, y, _ = runs[0].test_images(samples, data_dir)
    pixels = x.float()
    pixel_eps = [e * 255.0 / eps_unit for e in eps]
    steps = steps if attack == "pgd" else 1
    if sub is not None and sub.key in {run.key for run in runs}:  # the substitute is also a target
        sub = next(run for run in runs if run.key == sub.key)
    models = {run.key: PixelModel(run.plain(), run.normalizer) for run in runs + ([sub] if sub else [])}

    def row(run: RunDir, role: str, acc: list[float], note: str | None) -> dict[str, Any]:
        return dict(run=run.name, path=str(run.path), rule=run.cfg.rule, model=run.cfg.model,
                    activation=run.cfg.activation, role=role, accuracy=acc, note=note)

    rows = []
    if sub is None:
        for run in runs:
            model = models[run.key]
            acc = [accuracy(model, craft(attack, model, pixels, y, e, steps, seed), y) for e in pixel_eps]
            rows.append(row(run, "target", acc, _vanishing_note(run, zero_gradient_fraction(model, pixels, y), True)))
        title = f"{attack.upper()} white-box on {', '.join(run.label for run in runs)}"
    else:
        crafter = models[sub.key]
        accs: dict[str, list[float]] = {key: [] for key in models}
        for e in pixel_eps:
            adv = craft(attack, crafter, pixels, y, e, steps, seed)
            for key, model in models.items():
                accs[key].append(accuracy(model, adv, y))
        note = _vanishing_note(sub, zero_gradient_fraction(crafter, pixels, y), False)
        rows = [row(run, "target", accs[run.key], None) for run in runs if run is not sub]
        rows.append(row(sub, "substitute", accs[sub.key], note))
        title = f"{attack.upper()} transfer from {sub.label} to {', '.join(run.label for run in runs)}"
    return dict(attack=attack, mode="white-box" if sub is None else "transfer", title=title,
                substitute=None if sub is None else sub.name, dataset=runs[0].cfg.dataset,
                samples=len(y), steps=steps, seed=seed, eps=list(eps), eps_unit=eps_unit, rows=rows)


def markdown(result: dict[str, Any]) -> str:
    """The accuracy-vs-epsilon table of a :func:`robustness` result, with its notes."""
    unit = result["eps_unit"]
    heads = [f"{e:g}" if unit == 1 else f"{e:g}/{unit:g}" for e in result["eps"]]
    lines = [f"### {result['title']}", "",
             f"{result['dataset']}, first {result['samples']} test images"
             + (f", {result['steps']} steps" if result["attack"] == "pgd" else "") + "; accuracy at each eps",
             "", "| run | rule | model | role | " + " | ".join(heads) + " |",
             "|" + " --- |" * (4 + len(heads))]
    for r in result["rows"]:
        role = "substitute (white-box)" if r["role"] == "substitute" else r["role"]
        lines.append(f"| {r['run']} | {r['rule']} | {r['model']} | {role} | "
                     + " | ".join(f"{a:.4f}" for a in r["accuracy"]) + " |")
    notes = [f"- {r['run']}: {r['note']}" for r in result["rows"] if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_result(result: dict[str, Any], out: str | Path) -> list[Path]:
    """``result`` as JSON, Markdown and a PNG plot in ``out``; returns the three paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "whitebox" if result["substitute"] is None else f"transfer-from-{result['substitute']}"
    targets = "+".join(r["run"] for r in result["rows"] if r["role"] == "target")
    stem = f"{result['attack']}-{mode}-{targets}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return [json_path, md_path, plot_robustness(result, out / f"{stem}.png")]


def robustness_summary(targets: Sequence[str | Path], attacks: Sequence[str] = ("fgsm", "pgd", "square"),
                       eps: Sequence[float] = (4, 8, 16, 32), eps_unit: float = 255.0,
                       substitutes: Sequence[str | Path] = (), samples: int = 1000, steps: int = 10,
                       queries: int = 300, data_dir: str | None = None, device: str = "auto",
                       seed: int = 0) -> dict[str, Any]:
    """Accuracy under attack of many target runs (several rules, several seeds, any datasets),
    summarised over seeds: one row per dataset, attack, eps, rule and substitute, with the seeds,
    each seed's accuracy, their mean and standard deviation, and each target's clean accuracy.

    FGSM and PGD transfer from each substitute of the target's dataset (white-box on each target
    when no substitute is given); Square Attack queries each target itself (``queries`` per image).
    Substitutes must be independent of every target (none of them a target), and each must share
    its dataset with some target."""
    unknown = [a for a in attacks if a not in ATTACKS + SCORE_ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"unknown attacks {unknown}: choose from {', '.join(ATTACKS + SCORE_ATTACKS)}")
    runs = _targets(targets, eps, eps_unit, device)
    subs = [RunDir(path, device) for path in substitutes]
    shared = {r.key for r in runs} & {s.key for s in subs}
    if shared:
        raise ValueError(f"substitute {Path(next(iter(shared))).name} is also a target: use substitutes "
                         "independent of every target (e.g. another seed or architecture)")
    datasets = sorted({r.cfg.dataset for r in runs})
    idle = [s for s in subs if s.cfg.dataset not in datasets]
    if idle:
        raise ValueError(f"substitute {idle[0].name} was trained on {idle[0].cfg.dataset}, which no target was: "
                         f"drop it, or add a target trained on {idle[0].cfg.dataset}")
    records: list[dict[str, Any]] = []
    for dataset in datasets:
        group = [r for r in runs if r.cfg.dataset == dataset]
        crafters = [s for s in subs if s.cfg.dataset == dataset]
        x, y, _ = group[0].test_images(samples, data_dir)
        pixels = x.float()
        models = {r.key: PixelModel(r.plain(), r.normalizer) for r in group + crafters}
        clean = {r.key: accuracy(models[r.key], pixels, y) for r in group}

        def record(attack: str, e: float, run: RunDir, substitute: str, acc: float) -> None:
            records.append(dict(dataset=dataset, attack=attack, eps=e, rule=run.cfg.rule, substitute=substitute,
                                seed=run.cfg.seed, run=run.name, accuracy=acc, clean_accuracy=clean[run.key],
                                fraction_of_clean=acc / clean[run.key] if clean[run.key] else 0.0))

        for attack in attacks:
            for e in eps:
                pixel_eps = e * 255.0 / eps_unit
                if attack in SCORE_ATTACKS:
                    for run in group:
                        generator = torch.Generator(device=pixels.device).manual_seed(seed)
                        adv = square(models[run.key], pixels, y, pixel_eps, queries, generator=generator)
                        record(attack, e, run, "none (score-based)", accuracy(models[run.key], adv, y))
                elif not crafters:
                    for run in group:
                        adv = craft(attack, models[run.key], pixels, y, pixel_eps, steps, seed)
                        record(attack, e, run, "none (white-box)", accuracy(models[run.key], adv, y))
                for sub in crafters if attack in ATTACKS else ():
                    adv = craft(attack, models[sub.key], pixels, y, pixel_eps, steps, seed)
                    for run in group:
                        record(attack, e, run, sub.name, accuracy(models[run.key], adv, y))
    rows: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        key = (rec["dataset"], rec["attack"], rec["eps"], rec["rule"], rec["substitute"])
        row = rows.setdefault(key, dict(zip(("dataset", "attack", "eps", "rule", "substitute"), key),
                                        **{field: [] for field in ("seeds", "runs") + MEASURES}))
        row["seeds"].append(rec["seed"])
        row["runs"].append(rec["run"])
        for field in MEASURES:
            row[field].append(rec[field])
    for row in rows.values():
        for field in MEASURES:
            values = row[field]
            row[f"{field}_mean"] = statistics.mean(values)
            row[f"{field}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return dict(eps_unit=eps_unit, samples=samples, steps=steps, queries=queries, seed=seed,
                substitutes=[dict(dataset=s.cfg.dataset, run=s.name) for s in subs], rows=list(rows.values()))


def differences(summary: dict[str, Any], rule: str = "ekdaa", baseline: str = "bp") -> list[dict[str, Any]]:
    """``rule`` minus ``baseline`` per dataset, attack, substitute and eps, paired by seed: the
    mean and standard deviation of the per-seed differences of accuracy and of accuracy as a
    fraction of clean accuracy, over the seeds both have; with the clean accuracies' mean
    difference and whether it is within :data:`CLEAN_GAP` (``equal_clean``: a fair comparison)."""
    by_key = {(r["dataset"], r["attack"], r["substitute"], r["eps"], r["rule"]): r for r in summary["rows"]}
    out = []
    for (dataset, attack, substitute, e, name), row in by_key.items():
        other = by_key.get((dataset, attack, substitute, e, baseline))
        if name != rule or other is None:
            continue
        pairs = [(i, other["seeds"].index(s)) for i, s in enumerate(row["seeds"]) if s in other["seeds"]]
        if not pairs:
            continue
        diff = {field: [row[field][i] - other[field][j] for i, j in pairs] for field in MEASURES}
        spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        clean_gap = statistics.mean(diff["clean_accuracy"])
        out.append(dict(dataset=dataset, attack=attack, substitute=substitute, eps=e, seeds=len(pairs),
                        difference_mean=statistics.mean(diff["accuracy"]), difference_std=spread(diff["accuracy"]),
                        fraction_difference_mean=statistics.mean(diff["fraction_of_clean"]),
                        fraction_difference_std=spread(diff["fraction_of_clean"]),
                        clean_difference_mean=clean_gap, equal_clean=abs(clean_gap) <= CLEAN_GAP + 1e-9))
    return out


def check_settings(earlier: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuses to add rows measured with other :data:`SETTINGS` to an ``earlier`` summary."""
    changed = [k for k in SETTINGS if earlier.get(k) != settings[k]]
    if changed:
        raise ValueError("the summary already in --out was measured with other "
                         + ", ".join(f"{k} ({earlier.get(k)} there, {settings[k]} now)" for k in changed)
                         + ": use another --out, or the same settings")


def read_summary(out: str | Path) -> dict[str, Any] | None:
    """The ``summary.json`` in ``out`` (None when there is none)."""
    path = Path(out) / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary.get("rows"), list):
            raise ValueError("no rows")
        return summary
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a robustness summary ({err}): move it away, or use another --out") from None


def merge_summaries(earlier: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with the rows of ``earlier`` whose dataset and attack it did not measure (a
    summary built in pieces, e.g. Square Attack at fewer eps than the transfer attacks). Refuses
    summaries measured with different settings (images, steps, queries, eps unit, seed)."""
    check_settings(earlier, summary)
    measured = {(r["dataset"], r["attack"]) for r in summary["rows"]}
    kept = [r for r in earlier["rows"] if (r["dataset"], r["attack"]) not in measured]
    for row in kept:  # rows written before fractions of clean accuracy were recorded
        if "fraction_of_clean" not in row:
            row["fraction_of_clean"] = [a / c if c else 0.0 for a, c in zip(row["accuracy"], row["clean_accuracy"])]
            row["fraction_of_clean_mean"] = statistics.mean(row["fraction_of_clean"])
            row["fraction_of_clean_std"] = (statistics.stdev(row["fraction_of_clean"])
                                            if len(row["fraction_of_clean"]) > 1 else 0.0)
    subs = summary["substitutes"] + [s for s in earlier["substitutes"] if s not in summary["substitutes"]
                                     and any(r["substitute"] == s["run"] and r["dataset"] == s["dataset"]
                                             for r in kept)]
    return dict(summary, substitutes=subs, rows=kept + summary["rows"])


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: each rule's clean accuracy on the attacked images, with a flag where
    EKDAA's and BP's differ by more than :data:`CLEAN_GAP`; per dataset and attack, accuracy (%)
    mean ± std over seeds at each eps; then EKDAA minus BP, paired by seed."""
    unit = summary["eps_unit"]
    lines = [f"First {summary['samples']} test images; eps in 1/{unit:g} of the pixel range; PGD {summary['steps']} "
             f"steps; Square Attack {summary['queries']} queries. Accuracy in %, mean ± std over seeds (n).", ""]
    pct = lambda m, s, n: f"{100 * m:.1f} ± {100 * s:.1f} ({n})"  # noqa: E731
    clean = {(r["dataset"], r["rule"]): r for r in summary["rows"]}
    lines += ["### Clean accuracy of the targets on these images", "", "| dataset | rule | clean | seeds |",
              "|---|---|---|---|"]
    lines += [f"| {d} | {rule} | {pct(r['clean_accuracy_mean'], r['clean_accuracy_std'], len(r['seeds']))} | "
              f"{', '.join(map(str, r['seeds']))} |" for (d, rule), r in sorted(clean.items())]
    diffs = differences(summary)
    for dataset in sorted({d["dataset"] for d in diffs if not d["equal_clean"]}):
        gap = next(d["clean_difference_mean"] for d in diffs if d["dataset"] == dataset)
        lines += ["", f"**{dataset}: not at equal clean accuracy.** EKDAA's clean accuracy is {100 * gap:+.1f} "
                  f"points from BP's (more than {100 * CLEAN_GAP:g}): its EKDAA - BP rows compare networks of "
                  "different accuracy; read the fractions of clean accuracy, or train targets that match."]
    lines.append("")
    for dataset, attack in sorted({(r["dataset"], r["attack"]) for r in summary["rows"]}):
        rows = [r for r in summary["rows"] if (r["dataset"], r["attack"]) == (dataset, attack)]
        eps = sorted({r["eps"] for r in rows})
        lines += [f"### {dataset}, {attack}", "", "| rule | substitute | clean | " + " | ".join(f"{e:g}" for e in eps)
                  + " |", "|" + " --- |" * (3 + len(eps))]
        for rule, sub in sorted({(r["rule"], r["substitute"]) for r in rows}):
            cells = {r["eps"]: r for r in rows if (r["rule"], r["substitute"]) == (rule, sub)}
            first = next(iter(cells.values()))
            lines.append(f"| {rule} | {sub} | {pct(first['clean_accuracy_mean'], first['clean_accuracy_std'], len(first['seeds']))} | "
                         + " | ".join(pct(cells[e]["accuracy_mean"], cells[e]["accuracy_std"], len(cells[e]["seeds"]))
                                      if e in cells else "-" for e in eps) + " |")
        lines.append("")
    if diffs:
        lines += ["### EKDAA minus BP (points, paired by seed: mean ± std)", "",
                  "Accuracy under attack, and accuracy as a fraction of each network's clean accuracy; clean gap: "
                  f"EKDAA's clean accuracy minus BP's (flagged beyond {100 * CLEAN_GAP:g} points).", "",
                  "| dataset | attack | substitute | eps | EKDAA - BP | as fraction of clean | clean gap | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {d['dataset']} | {d['attack']} | {d['substitute']} | {d['eps']:g} | "
                  f"{100 * d['difference_mean']:+.1f} ± {100 * d['difference_std']:.1f} | "
                  f"{100 * d['fraction_difference_mean']:+.1f} ± {100 * d['fraction_difference_std']:.1f} | "
                  f"{100 * d['clean_difference_mean']:+.1f}{'' if d['equal_clean'] else ' (not equal)'} | "
                  f"{d['seeds']} |" for d in sorted(diffs, key=lambda d: (d["dataset"], d["attack"], d["substitute"],
                                                                          d["eps"]))]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out: str | Path) -> list[Path]:
    """``summary.json``, ``summary.md`` and ``summary.png`` (error bars over seeds) in ``out``."""
    from .pictures import plot_summary
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "summary.json", out / "summary.md"
    json_path.write_text(json.dumps(dict(summary, differences=differences(summary)), indent=2) + "\n")
    md_path.write_text(summary_markdown(summary))
    return [json_path, md_path, plot_summary(summary, out / "summary.png")]
