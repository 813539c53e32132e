"""Training loop, checkpoints and the ekdaa command, on the bundled digits data."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import sys

import pytest
import torch

import ekdaa

from ekdaa.checkpoint import digest
from ekdaa.cli import main
from ekdaa.data import load_dataset
from ekdaa.models import build_model
from ekdaa.train import Diverged, Run, TrainConfig, TrainError, load_checkpoint, train


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(dataset="digits", model="mlp", rule="ekdaa", epochs=2, batch_size=32, optimizer="sgd", lr=0.05,
                train_subset=320, val_split=100, out=str(tmp_path / name), device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def params(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def save_edited(state: dict, path) -> None:
    """Save a checkpoint edited by hand, with the digest of its new contents (as load_checkpoint checks)."""
    state.pop("digest", None)
    torch.save({**state, "digest": digest(state)}, path)


def load_metrics(run) -> list[dict]:
    return [json.loads(line) for line in open(f"{run}/metrics.jsonl").read().splitlines()]


def test_training_improves_and_writes_the_run_directory(tmp_path):
    cfg = tiny(tmp_path, epochs=3)
    result = train(cfg, log=lambda s: None)
    summary, out = result.summary, tmp_path / "run"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert summary["test_accuracy"] > 0.5  # chance is 0.1
    for key in ("rule", "dataset", "model", "epochs", "seed", "train_accuracy", "val_accuracy",
                "test_accuracy", "seconds"):
        assert key in summary
    assert all(0 <= summary[k] <= 1 for k in ("train_accuracy", "val_accuracy", "test_accuracy"))
    assert json.loads((out / "summary.json").read_text()) == summary
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["rule"] == "ekdaa" and config["environment"]["torch"] == torch.__version__
    state = load_checkpoint(out / "checkpoint.pt")
    assert any(k.endswith("error_kernel") for k in state["model"])
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind
    # the trained model comes back, and model.pt is it in plain PyTorch
    assert result.model.ekdaa_rule.name == "ekdaa"
    digits = load_dataset("digits")
    plain = build_model(cfg.model, digits.image_shape, digits.num_classes, activation=cfg.activation, bias=cfg.bias)
    plain.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    x = result.normalizer(digits.test_x[:50])
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), result.model.eval()(x))
    # the best epoch on validation is kept beside the last
    best = max(range(3), key=lambda i: (metrics[i]["val_accuracy"], -i))
    assert load_checkpoint(out / "checkpoint-best.pt")["epoch"] == best + 1


def test_same_seed_same_result(tmp_path):
    a = train(tiny(tmp_path, "a"), log=lambda s: None).summary
    b = train(tiny(tmp_path, "b"), log=lambda s: None).summary
    assert a["test_accuracy"] == b["test_accuracy"] and a["train_loss"] == b["train_loss"]
    pa, pb = params(tmp_path / "a" / "checkpoint.pt"), params(tmp_path / "b" / "checkpoint.pt")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c = train(tiny(tmp_path, "c", seed=1), log=lambda s: None).summary
    assert c["train_loss"] != a["train_loss"]


@pytest.mark.parametrize("extra", [dict(), dict(augment=True, rule="kolen-pollack", model="small-cnn",
                                                 train_subset=96)])
def test_resume_is_bit_for_bit(tmp_path, extra):
    train(tiny(tmp_path, "full", **extra), log=lambda s: None)
    train(tiny(tmp_path, "split", epochs=1, **extra), log=lambda s: None)
    train(tiny(tmp_path, "split", epochs=2, **extra), resume=True, log=lambda s: None)
    full, split = params(tmp_path / "full" / "checkpoint.pt"), params(tmp_path / "split" / "checkpoint.pt")
    assert all(torch.equal(full[k], split[k]) for k in full)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_ctrl_c_mid_epoch_saves_and_resumes_bit_for_bit(tmp_path):
    train(tiny(tmp_path, "full", lr_schedule="cosine", augment=True), log=lambda s: None)
    run = Run(tiny(tmp_path, "cut", lr_schedule="cosine", augment=True), log=lambda s: None)
    calls = {"n": 0}
    step = run._step

    def ctrl_c_during(*a, **k):
        calls["n"] += 1
        if calls["n"] == 13:  # epoch 2, step 3
            os.kill(os.getpid(), signal.SIGINT)
        return step(*a, **k)

    run._step = ctrl_c_during
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (1, 3)
    with pytest.raises(TrainError, match="would change the run's cosine schedule"):
        Run(tiny(tmp_path, "cut", epochs=3, lr_schedule="cosine", augment=True), resume=True)
    with pytest.raises(TrainError, match="--augment False .the run's: True. would change it"):
        Run(tiny(tmp_path, "cut", lr_schedule="cosine"), resume=True)
    train(tiny(tmp_path, "cut", lr_schedule="cosine", augment=True), resume=True, log=lambda s: None)
    full, cut = params(tmp_path / "full" / "checkpoint.pt"), params(tmp_path / "cut" / "checkpoint.pt")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_ctrl_c_in_the_first_epoch_resumes(tmp_path):
    train(tiny(tmp_path, "full", epochs=1), log=lambda s: None)
    run = Run(tiny(tmp_path, "cut", epochs=1), log=lambda s: None)
    step = run._step

    def ctrl_c_during(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return step(*a, **k)

    run._step = ctrl_c_during
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    assert not (tmp_path / "cut" / "metrics.jsonl").exists()
    train(tiny(tmp_path, "cut", epochs=1), resume=True, log=lambda s: None)
    full, cut = params(tmp_path / "full" / "checkpoint.pt"), params(tmp_path / "cut" / "checkpoint.pt")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_cli_resume_continues_the_run_with_its_own_config(tmp_path, capsys):
    run = str(tmp_path / "r")
    args = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--train-subset", "200",
            "--optimizer", "sgd", "--lr", "0.05", "--device", "cpu"]
    assert main([*args, "--out", run]) == 0
    assert main(["train", "--out", run, "--resume"]) == 0  # nothing left to train: still 2 epochs
    assert TrainConfig.load(run).epochs == 2 and len(load_metrics(run)) == 2
    assert main(["train", "--out", run, "--resume", "--epochs", "3", "--lr", "0.05"]) == 0  # same lr: fine
    assert TrainConfig.load(run).epochs == 3 and [m["epoch"] for m in load_metrics(run)] == [1, 2, 3]
    capsys.readouterr()
    assert main(["train", "--out", run, "--resume", "--lr", "0.5", "--rule", "fa"]) == 1
    err = capsys.readouterr().err
    assert "--rule 'fa' (the run's: 'ekdaa'), --lr 0.5 (the run's: 0.05)" in err and len(err.splitlines()) == 1
    assert main(["train", "--resume"]) == 1 and "--resume needs --out" in capsys.readouterr().err
    assert main(["train", "--out", run, "--resume", "--epochs", "2"]) == 1
    assert "would shorten the run's 3 epochs" in capsys.readouterr().err
    # a run's config.json as --config: the same run again, elsewhere
    assert main(["train", "--config", f"{run}/config.json", "--epochs", "3", "--out", str(tmp_path / "again")]) == 0
    a, b = params(f"{run}/checkpoint.pt"), params(tmp_path / "again" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_kind_of_device_and_floats_are_floats(tmp_path):
    train(tiny(tmp_path, epochs=1), log=lambda s: None)
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as if written on a GPU
    save_edited(state, path)
    with pytest.raises(TrainError, match="written on cuda.*resume it on cuda"):
        Run(tiny(tmp_path, epochs=2), resume=True)
    cfg = TrainConfig.from_dict({"tau": 2, "lr": 1})
    assert type(cfg.tau) is float and type(cfg.lr) is float and cfg == TrainConfig(tau=2.0, lr=1.0)


def test_mid_epoch_checkpoint_resumes_only_under_its_world_size(tmp_path):
    train(tiny(tmp_path, epochs=1), log=lambda s: None)
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    state.update(world=2, step=3)
    save_edited(state, path)
    with pytest.raises(TrainError, match="mid-epoch by 2 process.*this run has 1.*nproc-per-node 2"):
        Run(tiny(tmp_path, epochs=2), resume=True)
    state["step"] = 0  # an epoch-end checkpoint resumes under any number of processes
    save_edited(state, path)
    Run(tiny(tmp_path, epochs=2), resume=True)


def test_an_existing_run_is_not_overwritten(tmp_path):
    train(tiny(tmp_path, epochs=1), log=lambda s: None)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainError, match="already holds a run.*--resume"):
        train(tiny(tmp_path, epochs=1), log=lambda s: None)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    train(cfg, log=lambda s: None)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    run = Run(tiny(tmp_path, epochs=2), resume=True, log=lambda s: None)
    with torch.no_grad():
        next(run.model.parameters())[0, 0] = float("nan")
    with pytest.raises(Diverged, match=r"diverged.*lower --lr .now 0.05. .last good checkpoint: .*checkpoint.pt.$"):
        run.fit()
    assert ckpt.read_bytes() == before


def test_cli_divergence_exit_code(tmp_path, capsys):
    code = main(["train", "--model", "mlp", "--rule", "bp", "--epochs", "1", "--lr", "1e30", "--activation", "relu",
                 "--train-subset", "200", "--out", str(tmp_path / "d"), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "last good checkpoint" not in err and not (tmp_path / "d" / "checkpoint.pt").exists()
    assert f"lower --lr (now 1e+30) in a new --out (no checkpoint was written: {tmp_path / 'd'} holds only" in err


class _CallsPrint:
    def __reduce__(self):
        return print, ("code ran while loading a checkpoint",)


def test_bad_checkpoints_are_clear_errors(tmp_path, capsys):
    train(tiny(tmp_path, epochs=1), log=lambda s: None)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(TrainError, match=r"truncated.pt is unreadable: its \d+ bytes are not a whole torch file") as cut:
        load_checkpoint(truncated)
    assert "miniz" not in str(cut.value) and "central directory" not in str(cut.value)  # no torch internals
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(TrainError, match="not an ekdaa checkpoint"):
        load_checkpoint(foreign)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_CallsPrint()))  # would run print() if unpickled freely
    with pytest.raises(TrainError, match="unreadable.*holds Python objects") as refused:
        load_checkpoint(evil)
    assert "weights_only=False" not in str(refused.value)
    assert "code ran" not in capsys.readouterr().out
    with pytest.raises(TrainError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    for name in ("config.json", "train.log"):  # a run's other files, given by mistake
        with pytest.raises(TrainError, match=rf"run.{name} is not a checkpoint \(a torch file\): pass the run's "
                                             "checkpoint.pt"):
            load_checkpoint(tmp_path / "run" / name)


def test_cli_train_config_file_and_eval(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "mlp"\nrule = "fa"\nepochs = 5\ntrain-subset = 200\nlr = 0.05\n')
    out = tmp_path / "cli"
    assert main(["train", "--config", str(toml), "--epochs", "1", "--out", str(out), "--device", "cpu"]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert (saved["rule"], saved["model"], saved["epochs"], saved["train_subset"]) == ("fa", "mlp", 1, 200)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu"]) == 0
    result = json.loads((out / "eval-digits-test.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert result["accuracy"] == summary["test_accuracy"]
    assert "accuracy" in capsys.readouterr().out
    (out / "eval-digits-test.json").unlink()
    assert main(["eval", "--checkpoint", str(out), "--device", "cpu"]) == 0  # the run directory does too
    assert json.loads((out / "eval-digits-test.json").read_text())["accuracy"] == result["accuracy"]


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"ekdaa {ekdaa.__version__}"


@pytest.mark.parametrize("argv,message", [
    (["train", "--rule", "nope"], "invalid choice: 'nope'"),
    (["train", "--activation", "swish"], "choose from"),
    (["train", "--epochs", "x"], "invalid int value"),
])
def test_cli_bad_values_list_valid_ones(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["train", "--epochs", "0"], "epochs must be >= 1"),
    (["train", "--optimizer", "sgd", "--lr", "0"], "lr must be > 0"),
    (["train", "--config", "/nonexistent.toml"], "does not exist"),
    (["eval", "--checkpoint", "/nonexistent.pt"], "does not exist"),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent", "--no-download"], "cifar"),
    (["train", "--rule", "bp", "--beta", "0.5"], "beta is an option of rule ekdaa, not of 'bp'"),
    (["train", "--activation", "sign", "--tau", "0"], "tau must be > 0, got 0.0"),
    (["train", "--rule", "kolen-pollack", "--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["train", "--device", "cpu", "--cuda-graph"], "--cuda-graph needs one CUDA device"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text,message", [
    ("learning_rate = 0.1\n", "unknown config keys ['learning_rate']"),
    ('epochs = "ten"\n', "epochs = 'ten' should be of type int"),
    ("augment = 1\n", "augment = 1 should be of type bool"),
])
def test_bad_config_files(tmp_path, capsys, text, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    assert main(["train", "--config", str(toml)]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["train"], ["eval"]])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    expected = {(): ["train", "eval", "bench"], ("train",): ["--beta", "--gamma", "--resume", "--config",
                                                             "--data-dir", "--val-split", "--augment"],
                ("eval",): ["--checkpoint", "--dataset"]}[tuple(command)]
    assert all(word in text for word in expected)


def test_every_rule_option_is_a_config_field_and_a_flag(capsys):
    from ekdaa import RULES
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    def words(t: str) -> str:  # argparse may wrap a line after a word's hyphen ("one-sided")
        return " ".join(t.split()).replace("- ", "-")
    text = words(capsys.readouterr().out)
    options = [(name, o) for name, rule in RULES.items() for o in rule.OPTIONS if o.train]
    assert options  # EKDAA's at least
    for rule, option in options:
        assert f"--{option.name.replace('_', '-')}" in text and words(option.help) in text
        cfg = TrainConfig(rule=rule, **{option.name: option.default})
        assert cfg.rule_options()[option.name] == option.default
    assert "loss_reduction" not in TrainConfig().rule_options()  # not a training option: the loop's loss is a mean


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_matches_eager(tmp_path):
    """--compile trains the same network: EKDAA's error map and the feedback layers survive
    inductor (torch 2.13 mis-compiled torch.add(..., alpha=) in the error map)."""
    kw = dict(model="small-cnn", epochs=1, train_subset=64, batch_size=16, lr=0.05)
    train(tiny(tmp_path, "eager", **kw), log=lambda s: None)
    train(tiny(tmp_path, "compiled", compile=True, **kw), log=lambda s: None)
    pe, pc = params(tmp_path / "eager" / "checkpoint.pt"), params(tmp_path / "compiled" / "checkpoint.pt")
    assert pe.keys() == pc.keys()  # checkpoints hold the plain model's names, not torch.compile's
    for k in pe:
        torch.testing.assert_close(pc[k], pe[k], rtol=1e-4, atol=1e-5, msg=k)



def test_models_recommend_rule_options_that_runs_leave_unset(capsys, monkeypatch):
    from ekdaa.models import RECOMMENDED
    monkeypatch.setitem(RECOMMENDED, "resnet20", {"beta": 0.1})
    assert TrainConfig(model="resnet20").beta == 0.1 and TrainConfig(model="resnet56").beta == 0.9
    assert TrainConfig(model="resnet20", beta=0.9).beta == 0.9  # a choice made is kept
    assert TrainConfig().beta == 0.9 and TrainConfig(model="small-cnn").beta == 0.9  # the rule's default
    TrainConfig(model="resnet20", rule="bp").validate()  # not bp's option: the rule's default, no complaint
    dataclasses.replace(TrainConfig(model="resnet20"), rule="bp").validate()  # the model's choice, unused: fine
    with pytest.raises(TrainError, match="beta is an option of rule ekdaa"):
        TrainConfig(model="resnet20", rule="bp", beta=0.5).validate()
    assert TrainConfig.from_dict({"model": "resnet20", "tau": 2}).beta == 0.1
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default 0.9; resnet20: 0.1)" in " ".join(capsys.readouterr().out.split())


def test_a_recommendation_of_no_rule_option_is_an_error(monkeypatch):
    from ekdaa.models import RECOMMENDED
    monkeypatch.setitem(RECOMMENDED, "mlp", {"betta": 0.1})
    with pytest.raises(TrainError, match=r"model 'mlp' recommends \['betta'\], which no registered rule has"):
        TrainConfig(model="mlp")


@pytest.mark.slow
def test_resnet20_ekdaa_on_digits_with_the_defaults(tmp_path):
    """`ekdaa train --dataset digits --model resnet20 --rule ekdaa --epochs 5` with no rule option: error kernels
    on W's own scale (auto: the network has BatchNorm) and beta 0.9 (seeds 0-2: 91.6 % mean under Adam)."""
    summary = train(TrainConfig(dataset="digits", model="resnet20", rule="ekdaa", epochs=5), log=lambda s: None).summary
    options = summary["rule_options"]
    assert options["beta"] == 0.9 and options["error_kernel_init"] == "matched" and summary["test_accuracy"] >= 0.85


def test_eval_recomputes_batchnorm_statistics_under_the_final_weights(tmp_path, capsys):
    from ekdaa.train import load_model, prepare_data, recompute_batchnorm
    cfg = tiny(tmp_path, model="resnet20", epochs=1, train_subset=64, beta=0.9)
    train(cfg, log=lambda s: None)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    kept = checkpoint.read_bytes()
    trained = load_model(checkpoint, "cpu")
    images = prepare_data(cfg, torch.device("cpu")).train[0][:48]
    # independently: each norm's input per batch of 32 (then 16) in train mode, its channel mean and
    # unbiased variance, averaged over the two batches
    norms = [m for m in trained.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen: dict[torch.nn.Module, list] = {m: [] for m in norms}
    hooks = [m.register_forward_pre_hook(lambda m, i: seen[m].append(i[0].detach())) for m in norms]
    trained.model.train()
    with torch.no_grad():
        for xb in (images[:32], images[32:]):
            trained.model(trained.normalizer(xb))
    for h in hooks:
        h.remove()
    assert recompute_batchnorm(trained.model, images, trained.normalizer, batch_size=32) == len(norms) > 0
    for m in norms:
        mean = torch.stack([x.mean((0, 2, 3)) for x in seen[m]]).mean(0)
        var = torch.stack([x.var((0, 2, 3)) for x in seen[m]]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, var, rtol=1e-4, atol=1e-5)
        assert m.momentum == 0.1  # restored for any later training
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--device", "cpu", "--recompute-bn", "48"]) == 0
    result = json.loads((tmp_path / "run" / "eval-digits-test.json").read_text())
    assert result["recompute_bn_images"] == 48 and checkpoint.read_bytes() == kept  # the checkpoint is untouched
    plain = tiny(tmp_path, "plain", epochs=1, train_subset=64)
    train(plain, log=lambda s: None)
    assert main(["eval", "--checkpoint", str(tmp_path / "plain" / "checkpoint.pt"), "--recompute-bn", "10"]) == 1
    assert "model (mlp) has no BatchNorm to recompute" in capsys.readouterr().err


def test_tensorboard_logs_every_steps_loss_and_each_epoch(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny(tmp_path, epochs=2, log="tensorboard", track_alignment=True, train_subset=300)  # 9 x 32, 1 x 12
    train(cfg, log=lambda s: None)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    steps = events.Scalars("train/loss_step")
    assert [e.step for e in steps] == list(range(1, 21))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sizes = [32] * 9 + [12]
    for epoch, record in enumerate(records):
        losses = [e.value for e in steps[10 * epoch:10 * (epoch + 1)]]
        mean = sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes)
        assert mean == pytest.approx(record["train_loss"], rel=1e-5)  # each step's own loss
    assert [e.value for e in events.Scalars("epoch/test_accuracy")] == pytest.approx(
        [r["test_accuracy"] for r in records])
    assert [e.value for e in events.Scalars("alignment/1/update_angle")] == pytest.approx(
        [r["alignment"]["1"]["update_angle"] for r in records])
    with pytest.raises(TrainError, match="--log tensorboard writes into the run directory: give --out"):
        train(dataclasses.replace(cfg, out=None), log=lambda s: None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(TrainError, match=r"needs the tensorboard package: pip install 'ekdaa\[tensorboard\]'"):
        train(tiny(tmp_path, "none", log="tensorboard"), log=lambda s: None)
    assert not (tmp_path / "none").exists()  # nothing written: the same command works once it is installed
