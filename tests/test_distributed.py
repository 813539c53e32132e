"""Two CPU processes (gloo, loopback) with batch B reach what one process with 2B does.

An MLP: with max-pooling, rounding-level differences can flip a tie between equal pixels
(digits are mostly zeros) and route an error to another unit, a discrete, not a numeric, gap."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from ekdaa.train import Run, TrainConfig, load_checkpoint, train

ARGS = ["--dataset", "digits", "--model", "mlp", "--train-subset", "256", "--epochs", "2",
        "--optimizer", "sgd", "--lr", "0.05", "--device", "cpu", "--seed", "3"]
# SGD: Adam's per-weight normalisation would amplify float rounding where gradients are ~0.


@pytest.mark.parametrize("rule", ["bp", "ekdaa", "last-layer"])  # last-layer: hidden weights get no grad
def test_two_ranks_match_one_process_with_double_batch(tmp_path, rule):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ekdaa", "train", *ARGS, "--rule", rule, "--batch-size", "16", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"test_accuracy"') == 1  # rank 0 alone reports
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the same kernels, the same rounding
    try:
        single = train(TrainConfig(dataset="digits", model="mlp", train_subset=256, epochs=2, optimizer="sgd",
                                   lr=0.05, device="cpu", seed=3, rule=rule, batch_size=32,
                                   out=str(tmp_path / "one")), log=lambda s: None).summary
    finally:
        torch.set_num_threads(threads)
    a = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert a["world"] == 2 and b["world"] == 1
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    ddp_metrics = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(ddp_metrics) == 2
    import json
    assert json.loads(ddp_metrics[-1])["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=0.01)
    # an epoch-end checkpoint from 2 ranks resumes in 1 process
    resumed = train(dataclasses.replace(TrainConfig.load(tmp_path / "ddp"), epochs=3), resume=True,
                    log=lambda s: None).summary
    assert resumed["epochs"] == 3


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resumes(tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree (one all-reduce) on the step to stop at."""
    import signal
    import time
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ekdaa",
           "train", *ARGS[:-4], "--epochs", "500", "--rule", "ekdaa", "--batch-size", "16", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert err.count("stopped by SIGTERM") == 1, err[-3000:]  # rank 0 says it; rank 1 stops with it
    state = load_checkpoint(out / "checkpoint.pt")
    log = (out / "train.log").read_text()
    assert f"stopped by SIGTERM at epoch {state['epoch'] + 1} step {state['step']}" in log
    assert state["world"] == 2 and state["step"] == 0  # 8 steps an epoch: the agreed checks fall at its end
    run = Run(TrainConfig.load(out), resume=True, log=lambda s: None)  # an epoch-end checkpoint: in one process
    assert run.state.epoch == state["epoch"]
    run.close()
