"""Runs that survive a cluster: stop signals, one writer per run directory, checkpoint integrity,
divergence, and every file error a user can cause as one line."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ekdaa.analysis.runs import RunDir
from ekdaa.checkpoint import load_checkpoint
from ekdaa.cli import main
from ekdaa.reproduce import provenance
from ekdaa.train import Diverged, Run, Stopped, TrainError, train
from test_train import params, tiny

QUIET = dict(log=lambda s: None)
CLI_RUN = ["train", "--dataset", "digits", "--model", "mlp", "--train-subset", "320", "--val-split", "100",
           "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--device", "cpu"]  # tiny()'s run


def signalled_at(run: Run, call: int, signum: int) -> None:
    """Make ``run`` send itself ``signum`` during its ``call``-th training step."""
    step, calls = run._step, {"n": 0}

    def signalling(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return step(*a, **k)

    run._step = signalling


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_mid_epoch_and_the_run_resumes_bit_for_bit(tmp_path, signum):
    train(tiny(tmp_path, "full", augment=True), **QUIET)
    run = Run(tiny(tmp_path, "cut", augment=True), **QUIET)
    signalled_at(run, 13, signum)  # epoch 2, step 3
    with pytest.raises(Stopped, match=f"stopped by {signal.Signals(signum).name} at epoch 2 step 3.*--resume") as err:
        run.fit()
    assert err.value.signum == signum
    assert signal.getsignal(signum) is signal.SIG_DFL  # the run's handler is gone with it
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (1, 3)
    train(tiny(tmp_path, "cut", augment=True), resume=True, **QUIET)
    full, cut = params(tmp_path / "full" / "checkpoint.pt"), params(tmp_path / "cut" / "checkpoint.pt")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    log = (tmp_path / "cut" / "train.log").read_text()
    assert "ended: stopped by" in log and "resume at epoch 2 step 3" in log and "finished: 2 epochs" in log


def test_cli_sigterm_exits_143_with_the_way_to_continue(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ekdaa", *CLI_RUN, "--epochs", "500", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:  # a step or two into epoch 2
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(err.strip().splitlines()) == 1 and "stopped by SIGTERM" in err and f"--resume --out {out}" in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert f"stopped by SIGTERM at epoch {state['epoch'] + 1} step {state['step']}" in err
    assert (out / "train.log").read_text().strip().splitlines()[-1].endswith(err.strip().split("ekdaa: ")[1])


def test_a_run_directory_has_one_writer(tmp_path):
    first = Run(tiny(tmp_path), **QUIET)  # alive: it holds the directory
    with pytest.raises(TrainError, match=f"{tmp_path / 'run'} is in use by another run .pid {os.getpid()} on"):
        Run(tiny(tmp_path, rule="bp"), **QUIET)
    first.fit()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["rule"] == "ekdaa"
    with pytest.raises(TrainError, match="already holds a run: continue it with --resume"):
        Run(tiny(tmp_path, rule="bp"), **QUIET)


def test_a_killed_owner_leaves_no_stale_lock_and_a_run_without_checkpoint_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ekdaa", *CLI_RUN, "--epochs", "2", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()  # no handler runs: only the OS lets go of the lock
    proc.wait()
    (out / "checkpoint.pt").unlink(missing_ok=True)  # as if killed in its first epoch
    (out / ".checkpoint.pt.tmp12345").write_bytes(b"half")  # a save cut short
    with pytest.raises(TrainError, match="already holds a run"):
        Run(tiny(tmp_path), **QUIET)
    summary = train(tiny(tmp_path), resume=True, **QUIET).summary  # from its beginning, with its own config
    assert summary["epochs"] == 2 and "resume at epoch 1 step 0" in (out / "train.log").read_text()
    assert not list(out.glob(".*.tmp*"))


def flip_bytes_in(path, tensor: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes()[:64])
    assert at > 0
    data[at + 16:at + 32] = bytes(b ^ 0xFF for b in data[at + 16:at + 32])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_refused_by_every_command(tmp_path, capsys):
    train(tiny(tmp_path, epochs=1), **QUIET)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    moment = next(iter(state["optimizer"]["state"].values()))["momentum_buffer"]
    weight = max(state["model"].values(), key=torch.Tensor.numel)
    for tensor in (moment, weight):
        good = ckpt.read_bytes()
        flip_bytes_in(ckpt, tensor)
        with pytest.raises(TrainError, match="checkpoint .* is corrupted.*nothing was loaded"):
            load_checkpoint(ckpt)
        with pytest.raises(TrainError, match="corrupted"):
            Run(tiny(tmp_path, epochs=2), resume=True, **QUIET)
        assert main(["eval", "--checkpoint", str(ckpt)]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "corrupted" in err
        ckpt.write_bytes(good)
    load_checkpoint(ckpt)


def test_commands_take_the_model_from_the_checkpoint_not_config_json(tmp_path, capsys):
    train(tiny(tmp_path, epochs=1), **QUIET)
    path = tmp_path / "run" / "config.json"
    edited = json.loads(path.read_text())
    edited["config"].update(activation="relu", rule="bp")
    path.write_text(json.dumps(edited))
    run = RunDir(tmp_path / "run", device="cpu")
    assert (run.cfg.activation, run.cfg.rule) == ("tanh", "ekdaa")
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--epochs", "2"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["rule"] == "ekdaa"


def test_a_finite_exploding_loss_stops_as_diverged(tmp_path):
    train(tiny(tmp_path, epochs=1), **QUIET)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(Diverged, match="passed --max-loss 230.*lower --lr"):  # 100 ln(10)
        run = Run(tiny(tmp_path, epochs=3), resume=True, **QUIET)
        for group in run.opt.param_groups:
            group["lr"] = 1e9  # an lr that explodes without a NaN
        run.fit()
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(Diverged, match="passed --max-loss 0.5"):  # a threshold of the user's own
        train(tiny(tmp_path, "low", max_loss=0.5), **QUIET)


def test_cli_exploding_lr_exits_2(tmp_path, capsys):
    assert main([*CLI_RUN, "--lr", "1e9", "--epochs", "50", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "d" / "train.log").read_text().count("ended: training diverged") == 1


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/fd")
def test_a_failed_save_keeps_the_checkpoint_and_the_metrics_in_step(tmp_path, monkeypatch):
    train(tiny(tmp_path, epochs=1), **QUIET)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    fsync = os.fsync

    def disk_full(fd):  # the checkpoint's data written, not all of it on the disk
        if "checkpoint" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(TrainError, match=r"could not write .*checkpoint.pt: No space left on device: free space "
                                         r"there or choose another --out \(the previous checkpoint.pt is intact\)"):
        train(tiny(tmp_path, epochs=2), resume=True, **QUIET)
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert not list((tmp_path / "run").glob(".*.tmp*"))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ")
def test_cli_a_full_disk_is_one_line(tmp_path):
    """A file-size limit: the checkpoint's write fails as on a full disk."""
    out = tmp_path / "run"
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
    done = subprocess.run([sys.executable, "-c", limit + "import sys; from ekdaa.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", *CLI_RUN, "--epochs", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"could not write {out / 'checkpoint.pt'}: File too large" in done.stderr
    assert not (out / "metrics.jsonl").exists() and not list(out.glob(".*.tmp*"))


def test_a_half_written_metrics_line_is_one_line_and_resume_rewrites_it(tmp_path, capsys):
    train(tiny(tmp_path, epochs=1), **QUIET)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "train_lo')
    with pytest.raises(TrainError, match=r"metrics.jsonl, line 2, is not a JSON record.*--resume --out"):
        RunDir(tmp_path / "run").metrics
    assert main(["visualize", str(tmp_path / "run"), "--what", "curves", "--out", str(tmp_path / "v")]) == 1
    assert "line 2, is not a JSON record" in capsys.readouterr().err
    train(tiny(tmp_path, epochs=2), resume=True, **QUIET)
    assert [r["epoch"] for r in RunDir(tmp_path / "run").metrics] == [1, 2]


@pytest.mark.parametrize("argv", [
    ["train", "--out", "{file}"], ["train", "--out", "/proc/x"], ["eval", "--checkpoint", "{ckpt}", "--out", "/proc/x/e.json"],
    ["report", "--results", "{results}", "--out", "/proc/x/R.md"],
    ["reproduce", "--suite", "cpu", "--datasets", "digits", "--results", "/proc/x"],
    ["reproduce", "--suite", "cpu", "--datasets", "digits", "--runs", "/proc/x"],
])
def test_unwritable_paths_are_one_line_before_any_training(tmp_path, capsys, argv):
    train(tiny(tmp_path, epochs=1), **QUIET)
    results = tmp_path / "results" / "s" / "digits" / "r"
    results.mkdir(parents=True)
    for f in ("config.json", "metrics.jsonl", "summary.json"):
        (results / f).write_bytes((tmp_path / "run" / f).read_bytes())
    (results / "provenance.json").write_text(json.dumps({**provenance("s"), "label": "ekdaa"}))
    (tmp_path / "file").write_text("")
    values = dict(file=tmp_path / "file", ckpt=tmp_path / "run" / "checkpoint.pt", results=tmp_path / "results")
    start = time.time()
    assert main([a.format(**values) for a in argv]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ekdaa: error: ") and "Traceback" not in err
    assert time.time() - start < 30  # refused before it trains


def test_an_interrupted_train_command_says_what_was_kept(tmp_path, monkeypatch, capsys):
    import ekdaa.train

    def interrupted(cfg, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(ekdaa.train, "train", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out)]) == 130
    assert f"{out} holds no checkpoint yet" in capsys.readouterr().err
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    assert main(["train", "--out", str(out)]) == 130
    assert f"the last checkpoint in {out} is intact: continue with ekdaa train --resume --out {out}" in \
        capsys.readouterr().err
    assert main(["train"]) == 130
    assert capsys.readouterr().err == "ekdaa: interrupted; nothing was kept (no --out)\n"
