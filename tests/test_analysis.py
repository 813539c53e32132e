"""ekdaa.analysis: alignment angles, pictures, adversarial robustness, and their commands."""
from __future__ import annotations

import copy
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits
from torch import nn

import ekdaa
from ekdaa.analysis import (
    PICTURES,
    PixelModel,
    RunDir,
    Tracker,
    alignment,
    craft,
    differences,
    square,
    summary_markdown,
    fgsm,
    robustness,
    visualize,
    write_result,
)
from ekdaa.analysis.attacks import accuracy
from ekdaa.analysis import pictures
from ekdaa.analysis.pictures import DPI, SIZES
from ekdaa.cli import main
from ekdaa.models import build_model
from ekdaa.train import TrainConfig, load_checkpoint, train
from test_train import save_edited


def tiny(tmp, name, resume: bool = False, **kw) -> str:
    """Train a tiny digits run into tmp/name and return its directory."""
    cfg = dict(dataset="digits", model="mlp", rule="ekdaa", epochs=2, batch_size=32, lr=0.05,
               train_subset=200, out=str(tmp / name), device="cpu")
    cfg.update(kw)
    train(TrainConfig(**cfg), resume=resume, log=lambda s: None)
    return cfg["out"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks and t-SNE of a few points gain nothing from threads, and on a shared busy
    machine spinning OpenMP threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("runs")
    return dict(cnn=tiny(tmp, "cnn", model="small-cnn", lr=0.01, track_alignment=True),
                bp=tiny(tmp, "bp", rule="bp", activation="relu", train_subset=600, epochs=3, lr=0.02),
                sign=tiny(tmp, "sign", activation="sign", epochs=1))


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# -- alignment ------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["bp", "kolen-pollack", "ekdaa"])
def test_angles_are_zero_where_feedback_equals_w(rule):
    plain = net()
    options = {"error_kernel_init": "transpose"} if rule == "ekdaa" else {}
    model = ekdaa.convert(copy.deepcopy(plain), rule, **options)
    if rule == "kolen-pollack":  # B = W: the backward is exactly backprop's
        for layer in (model[0], model[2]):
            layer.feedback.data.copy_(layer.weight)
    angles = alignment(model, batch(), plain)
    assert list(angles) == ["0", "2"]
    for entry in angles.values():
        assert entry["feedback_angle"] == pytest.approx(0, abs=1e-6)
    if rule != "ekdaa":  # EKDAA's update differs from the gradient even with E = W
        assert all(e["update_angle"] == pytest.approx(0, abs=1e-4) for e in angles.values())
    assert angles["2"]["update_angle"] == pytest.approx(0, abs=1e-4)  # the output layer's update is BP's


def test_alignment_matches_a_hand_computation_for_fa():
    plain = net()
    model = ekdaa.convert(copy.deepcopy(plain), "fa")
    x, y = batch()
    angles = alignment(model, (x, y), plain)

    w1, w2 = (plain[i].weight.detach().double().numpy() for i in (0, 2))
    b1, b2 = (model[i].feedback.double().numpy() for i in (0, 2))
    xs = x.double().numpy()
    z1 = np.tanh(xs @ w1.T)
    h2 = z1 @ w2.T
    p = np.exp(h2 - h2.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e2 = (p - np.eye(3)[y.numpy()]) / len(xs)

    def dw1(back):
        return ((e2 @ back) * (1 - z1 ** 2)).T @ xs

    def deg(a, b):
        return math.degrees(math.acos(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)))

    assert angles["0"]["feedback_angle"] == pytest.approx(deg(b1, w1), abs=1e-6)
    assert angles["2"]["feedback_angle"] == pytest.approx(deg(b2, w2), abs=1e-6)
    assert angles["0"]["update_angle"] == pytest.approx(deg(dw1(b2), dw1(w2)), abs=1e-4)
    assert 10 < angles["0"]["update_angle"] < 170  # a real angle, not a trivial one


def test_alignment_for_dfa_and_sign_says_what_is_undefined():
    plain = net()
    model = ekdaa.convert(copy.deepcopy(plain), "dfa", example_input=batch()[0])
    angles = alignment(model, batch(), plain)
    assert all(e["feedback_angle"] is None and "sends no error" in e["note"] for e in angles.values())
    assert 0 < angles["0"]["update_angle"] < 180 and angles["2"]["update_angle"] == pytest.approx(0, abs=1e-4)

    plain = nn.Sequential(nn.Linear(6, 5), ekdaa.Sign(), nn.Linear(5, 3))
    angles = alignment(ekdaa.convert(copy.deepcopy(plain), "ekdaa"), batch(), plain)
    assert angles["0"]["update_angle"] is None and "backprop's gradient is zero" in angles["0"]["note"]
    assert angles["2"]["update_angle"] == pytest.approx(0, abs=1e-4)
    assert not any(isinstance(v, float) and math.isnan(v) for e in angles.values() for v in e.values())


def test_alignment_leaves_grads_mode_and_rng_alone():
    plain = net()
    model = ekdaa.convert(copy.deepcopy(plain), "ekdaa")
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    rng = torch.get_rng_state()
    alignment(model, batch(), plain)
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].weight.grad is None and model[0].error_kernel.grad is None
    assert model.training and torch.equal(torch.get_rng_state(), rng)


def test_tracking_is_logged_and_changes_no_training_result(tmp_path):
    small = dict(train_subset=96)
    tracked = tiny(tmp_path, "tracked", track_alignment=True, **small)
    tiny(tmp_path, "plain", **small)
    tiny(tmp_path, "resumed", epochs=1, track_alignment=True, **small)
    tiny(tmp_path, "resumed", epochs=2, track_alignment=True, resume=True, **small)
    a, b, c = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("tracked", "plain", "resumed"))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["alignment"]) for r in records] == [["1", "3", "5"]] * 2
    assert all(0 < r["alignment"]["1"]["feedback_angle"] < 180 for r in records)
    assert "alignment" not in json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    assert RunDir(tracked).metrics == records


@pytest.mark.parametrize("rule", ["ekdaa", "bp-ste"])
def test_tracker_counts_sign_flips_and_measures_against_the_straight_through_gradient(rule):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 6, 6) * 0.3, torch.arange(8) % 3
    model = ekdaa.convert(build_model("mlp", (1, 6, 6), 3, activation="sign"), rule)
    tracker = Tracker(model, (x, y))
    first = tracker()
    assert first["sign_flips"] == {"2": 0.0, "4": 0.0}  # nothing changed since the tracker was made
    angles = {name: e["update_angle"] for name, e in first["alignment"].items()}
    assert all(a is not None for a in angles.values())  # defined below Sign: the estimator's gradient
    if rule == "bp-ste":
        assert all(a == pytest.approx(0, abs=1e-4) for a in angles.values())
    else:
        assert 1 < angles["1"] < 179
    with torch.no_grad():
        model[1].weight.neg_()  # no bias: every unit of both Sign layers changes sign
    assert tracker()["sign_flips"] == {"2": 1.0, "4": 1.0}
    assert tracker()["sign_flips"] == {"2": 0.0, "4": 0.0}  # counted from the previous look


def test_tracking_a_sign_run_logs_flips(tmp_path):
    for target in ("activation", "smooth"):
        run = tiny(tmp_path, target, activation="sign", target_function=target, lr=0.01, track_alignment=True)
        records = RunDir(run).metrics
        flips = [r["sign_flips"] for r in records]
        assert [sorted(f) for f in flips] == [["2", "4"]] * 2
        assert all(0 < v < 1 for f in flips for v in f.values())


# -- pictures -------------------------------------------------------------------

@pytest.mark.parametrize("what", PICTURES)
def test_each_picture_is_a_png_of_the_expected_size(runs, tmp_path, what):
    paths = visualize([runs["cnn"]], what, tmp_path, device="cpu", tsne_samples=60)
    assert len(paths) == 1 and paths[0].parent == tmp_path
    width, height = SIZES[what]
    assert paths[0].stat().st_size > 10_000
    assert png_size(paths[0]) == (round(width * DPI), round(height * DPI))


def test_visualize_command_draws_all_for_several_runs(runs, tmp_path, capsys):
    assert main(["visualize", runs["cnn"], runs["bp"], "--what", "all", "--out", str(tmp_path),
                 "--tsne-samples", "40", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["bp-filters.png", "bp-tsne.png", "cnn+bp-curves.png", "cnn-alignment.png",
                     "cnn-filters.png", "cnn-kernels.png", "cnn-tsne.png"]
    assert "kernels: skipped bp" in out and "alignment: skipped bp" in out and out.count("wrote ") == 7
    with pytest.raises(ValueError, match="no error kernels"):
        visualize([runs["bp"]], "kernels", tmp_path, device="cpu")
    with pytest.raises(ValueError, match="--track-alignment"):
        visualize([runs["bp"]], "alignment", tmp_path, device="cpu")


def test_curves_have_a_row_per_dataset_a_legend_per_panel_and_room_around_one_epoch(runs, tmp_path,
                                                                                    monkeypatch):
    one = tiny(tmp_path, "one-epoch", epochs=1)
    other = tmp_path / "cifar-run"  # the same run, said to be of another dataset
    shutil.copytree(one, other)
    state = load_checkpoint(other / "checkpoint.pt")
    state["config"]["dataset"] = "cifar10"
    save_edited(state, other / "checkpoint.pt")
    figures = []
    monkeypatch.setattr(pictures, "_save", lambda fig, path: figures.append(fig) or path)
    pictures.plot_curves([RunDir(one), RunDir(runs["cnn"]), RunDir(other)], tmp_path)
    axes = figures[0].axes
    assert [ax.get_title().split(":")[0] for ax in axes] == ["cifar10", "cifar10", "digits", "digits"]
    assert all(ax.get_legend() is not None for ax in axes)
    assert axes[0].get_xlim() == (0.5, 1.5)  # the one-epoch run alone on its row
    markers = {line.get_label().rsplit(" ", 1)[1]: line.get_marker() for line in axes[2].get_lines()}
    assert markers == {"train": "o", "test": "^"}  # splits differ by marker, not only by line style


@pytest.mark.parametrize("command", ["visualize", "attack"])
def test_a_directory_without_checkpoint_is_a_one_line_error(tmp_path, capsys, command):
    assert main([command, str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert "has no checkpoint.pt" in err and len(err.splitlines()) == 1


# -- robustness -----------------------------------------------------------------

def test_a_runs_plain_twin_has_its_weights_and_forward(runs):
    run = RunDir(runs["cnn"], "cpu")
    plain = run.plain()
    assert not any(hasattr(m, "rule") for m in plain.modules())  # no converted layer or activation
    x = run.normalizer(run.test_images(20)[0])
    with torch.no_grad():
        assert torch.equal(plain(x), run.model(x))


def test_fgsm_eps_zero_changes_nothing_and_large_eps_hurts(runs):
    result = robustness([runs["bp"]], "fgsm", eps=[0, 64], device="cpu")
    clean = json.loads((Path(runs["bp"]) / "summary.json").read_text())["test_accuracy"]
    (row,) = result["rows"]
    assert row["accuracy"][0] == clean > 0.6 and row["note"] is None
    assert row["accuracy"][1] < clean - 0.3
    run = RunDir(runs["bp"], "cpu")
    x, y, _ = run.test_images(50)
    model = PixelModel(run.plain(), run.normalizer)
    assert torch.equal(fgsm(model, x.float(), y, 0.0), x.float())
    adv = craft("pgd", model, x.float(), y, 8.0, steps=3)
    assert (adv - x.float()).abs().max() <= 8.0 + 1e-4 and adv.min() >= 0 and adv.max() <= 255


def test_whitebox_on_sign_says_gradients_vanish(runs):
    (row,) = robustness([runs["sign"]], "fgsm", eps=[0, 32], samples=100, device="cpu")["rows"]
    assert row["accuracy"][0] == row["accuracy"][1]
    assert "zero for 100% of the images" in row["note"] and "not evidence of robustness" in row["note"]


def test_transfer_from_a_substitute_of_another_architecture_also_a_target(runs, tmp_path, capsys):
    assert main(["attack", runs["cnn"], runs["sign"], runs["bp"], "--attack", "pgd", "--steps", "2", "--eps", "0,32",
                 "--substitute", runs["bp"], "--samples", "100", "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    stem = tmp_path / "pgd-transfer-from-bp-cnn+sign"
    result = json.loads(stem.with_suffix(".json").read_text())
    assert [(r["run"], r["model"], r["role"]) for r in result["rows"]] == [
        ("cnn", "small-cnn", "target"), ("sign", "mlp", "target"), ("bp", "mlp", "substitute")]
    substitute = result["rows"][-1]["accuracy"]
    assert substitute[1] < substitute[0]
    assert "| cnn | ekdaa | small-cnn | target |" in stem.with_suffix(".md").read_text() and "| run |" in out
    assert png_size(stem.with_suffix(".png")) == tuple(round(s * DPI) for s in SIZES["robustness"])
    assert write_result(result, tmp_path)[0] == stem.with_suffix(".json")


def test_square_attack_queries_only_outputs_and_stays_in_the_ball(runs):
    run = RunDir(runs["bp"], "cpu")
    x, y, _ = run.test_images(100)
    pixels = x.float()
    model = PixelModel(run.plain(), run.normalizer)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    adv = square(model, pixels, y, 48.0, queries=40, generator=torch.Generator().manual_seed(0))
    assert calls and not any(calls)  # outputs only: never a gradient
    assert (adv - pixels).abs().max() <= 48.0 + 1e-4 and adv.min() >= 0 and adv.max() <= 255
    assert accuracy(model, adv, y) < accuracy(model, pixels, y) - 0.1
    chunked = square(model, pixels, y, 48.0, queries=40, generator=torch.Generator().manual_seed(0), batch_size=7)
    torch.testing.assert_close(chunked, adv)  # the model's batch size changes nothing


def test_summary_over_rules_seeds_and_substitutes(runs, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("seeds")
    targets = [tiny(tmp, f"{rule}-s{seed}", rule=rule, seed=seed, epochs=1)
               for rule in ("bp", "ekdaa") for seed in (0, 1)]
    out = tmp / "robustness"
    argv = ["attack", *targets, "--summary", "--attack", "fgsm,square", "--eps", "16,64", "--substitute", runs["bp"],
            "--samples", "60", "--queries", "10", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["attack"], r["eps"], r["rule"], r["substitute"]): r for r in summary["rows"]}
    assert set(rows) == {(a, e, rule, sub) for a, sub in (("fgsm", "bp"), ("square", "none (score-based)"))
                         for e in (16, 64) for rule in ("bp", "ekdaa")}
    row = rows[("fgsm", 16, "ekdaa", "bp")]
    assert row["seeds"] == [0, 1] and row["dataset"] == "digits"
    assert summary["substitutes"] == [dict(dataset="digits", run="bp")]
    alone = [robustness([t], "fgsm", [16], substitute=runs["bp"], samples=60, device="cpu")["rows"][0]["accuracy"][0]
             for t in targets[2:]]
    assert row["accuracy"] == pytest.approx(alone)  # each seed's own number, then their mean and std
    assert row["accuracy_mean"] == pytest.approx(sum(alone) / 2)
    assert row["accuracy_std"] == pytest.approx(abs(alone[0] - alone[1]) / 2 ** 0.5)
    diff = next(d for d in summary["differences"] if (d["attack"], d["eps"]) == ("fgsm", 16))
    bp_row = rows[("fgsm", 16, "bp", "bp")]
    assert diff["difference_mean"] == pytest.approx(row["accuracy_mean"] - bp_row["accuracy_mean"])
    assert "### digits, square" in (out / "summary.md").read_text() and (out / "summary.png").stat().st_size > 10_000
    assert row["fraction_of_clean"] == pytest.approx([a / c for a, c in zip(row["accuracy"], row["clean_accuracy"])])
    clean_gap = sum(row["clean_accuracy"]) / 2 - sum(bp_row["clean_accuracy"]) / 2
    assert diff["clean_difference_mean"] == pytest.approx(clean_gap)
    assert diff["equal_clean"] == (abs(clean_gap) <= 0.02)
    # a second summary into the same folder replaces its own attacks' rows and keeps the others
    assert main(["attack", *targets, "--summary", "--attack", "pgd", "--eps", "16", "--substitute", runs["bp"],
                 "--samples", "60", "--queries", "10", "--out", str(out), "--device", "cpu"]) == 0
    merged = json.loads((out / "summary.json").read_text())
    assert {(r["attack"], r["eps"]) for r in merged["rows"]} == {("fgsm", 16), ("fgsm", 64), ("square", 16),
                                                                ("square", 64), ("pgd", 16)}
    assert [r for r in merged["rows"] if r["attack"] == "fgsm"] == [r for r in summary["rows"] if r["attack"] == "fgsm"]
    capsys.readouterr()
    assert main(["attack", *targets, "--summary", "--attack", "pgd", "--eps", "16", "--substitute", runs["bp"],
                 "--samples", "30", "--queries", "10", "--out", str(out), "--device", "cpu"]) == 1
    assert "already in --out was measured with other samples (60 there, 30 now): use another --out" in \
        capsys.readouterr().err
    capsys.readouterr()
    assert main(["attack", targets[0], "--summary", "--substitute", targets[0], "--samples", "10",
                 "--device", "cpu", "--out", str(tmp / "other")]) == 1
    assert "is also a target: use substitutes independent of every target" in capsys.readouterr().err
    elsewhere = tmp / "cifar-substitute"  # a substitute of a dataset no target has would craft nothing
    shutil.copytree(runs["bp"], elsewhere)
    state = load_checkpoint(elsewhere / "checkpoint.pt")
    state["config"]["dataset"] = "cifar10"
    save_edited(state, elsewhere / "checkpoint.pt")
    assert main(["attack", targets[0], "--summary", "--substitute", runs["bp"], "--substitute", str(elsewhere),
                 "--samples", "10", "--device", "cpu", "--out", str(tmp / "other")]) == 1
    assert "cifar-substitute was trained on cifar10, which no target was: drop it" in capsys.readouterr().err
    assert main(["attack", targets[0], "--attack", "fgsm,pgd", "--device", "cpu"]) == 1
    assert "need --summary" in capsys.readouterr().err


def test_summary_flags_comparisons_at_unequal_clean_accuracy():
    def row(rule: str, clean: list[float], acc: list[float]) -> dict:
        out = dict(dataset="cifar10", attack="fgsm", eps=4.0, rule=rule, substitute="sub", seeds=[0, 1],
                   runs=["a", "b"], accuracy=acc, clean_accuracy=clean,
                   fraction_of_clean=[a / c for a, c in zip(acc, clean)])
        for field in ("accuracy", "clean_accuracy", "fraction_of_clean"):
            out[f"{field}_mean"], out[f"{field}_std"] = sum(out[field]) / 2, 0.0
        return out
    summary = dict(eps_unit=255.0, samples=1000, steps=10, queries=300, seed=0, substitutes=[],
                   rows=[row("bp", [0.64, 0.62], [0.32, 0.31]), row("ekdaa", [0.60, 0.59], [0.30, 0.30])])
    (diff,) = differences(summary)
    assert diff["clean_difference_mean"] == pytest.approx(-0.035) and not diff["equal_clean"]
    assert diff["fraction_difference_mean"] == pytest.approx((0.30 / 0.60 - 0.5 + 0.30 / 0.59 - 0.31 / 0.62) / 2)
    text = summary_markdown(summary)
    assert "cifar10: not at equal clean accuracy.** EKDAA's clean accuracy is -3.5 points from BP's" in text
    summary["rows"][1] = row("ekdaa", [0.63, 0.62], [0.30, 0.30])
    assert differences(summary)[0]["equal_clean"] and "not at equal" not in summary_markdown(summary)


@pytest.mark.parametrize("argv,message", [
    (["attack", "x", "--attack", "cw"], "unknown attack(s) cw"),
    (["attack", "x", "--eps", "1,a"], "not a comma-separated list"),
    (["attack", "x", "--eps", "-1"], "must be >= 0"),
    (["visualize", "x", "--what", "nope"], "invalid choice"),
])
def test_bad_analysis_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_help_lists_the_analysis_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "visualize" in text and "attack" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--track-alignment" in capsys.readouterr().out


@pytest.mark.parametrize("epochs", [1, 3])
def test_suite_plot_draws_every_row_with_its_seeds(tmp_path, epochs):
    from ekdaa.analysis.pictures import SuiteRow, plot_suite

    def seed(acc):
        return [dict(epoch=e + 1, test_accuracy=acc + 0.01 * e) for e in range(epochs)]

    rows = [SuiteRow("bp", "bp", "tanh", [seed(0.8), seed(0.82)]), SuiteRow("ekdaa", "ekdaa", "tanh", [seed(0.7)]),
            SuiteRow("ekdaa-smooth", "ekdaa", "sign", [seed(0.6), seed(0.5)])]
    path = plot_suite(rows, "title", tmp_path / "suite.png")
    width, height = SIZES["suite"]
    assert png_size(path) == (round(width * DPI), round(height * DPI)) and path.stat().st_size > 10_000
