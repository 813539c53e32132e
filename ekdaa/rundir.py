"""A run directory as a training run keeps it (``ekdaa train --out DIR``): the lock that makes one live
process its writer, ``train.log``, ``config.json``, ``metrics.jsonl``, ``summary.json``, the checkpoints
and ``model.pt``, and where a resumed run stands. Without ``--out``, or on a process other than the
main one under torchrun, every write is skipped and the log goes to ``log`` alone."""
from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import (RunLock, TrainState, load_checkpoint, read_metrics, remove_temporary_files, save_atomic,
                         save_checkpoint, train_state, write_atomic)
from .config import TrainConfig, TrainError, resumed_config
from .rules import unconvert


class RunDirectory:
    """The run directory ``out`` (None: none), written by the main process only."""

    def __init__(self, out: str | None, writes: bool, log: Callable[[str], None]):
        self.out = Path(out) if out else None
        self.writes = writes and self.out is not None
        self.lock, self.logfile = None, None
        self.log = log if writes else (lambda line: None)
        if self.writes:  # before anything is written: one writer per directory
            self.lock = RunLock(self.out)
            remove_temporary_files(self.out)
            try:
                self.logfile = open(self.out / "train.log", "a", buffering=1)
            except OSError as err:
                raise TrainError(f"could not write {self.out / 'train.log'} ({err.strerror}): choose another "
                                 "--out") from None
            console = self.log
            self.log = lambda line: (console(line), self.record(line))

    def record(self, line: str) -> None:
        """Append ``line`` to train.log, with the time."""
        if self.logfile is not None:
            self.logfile.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {line}\n")

    def start(self, asked: TrainConfig, resume: bool, device: torch.device,
              world: int) -> tuple[TrainConfig, dict[str, Any] | None]:
        """The run's config and its checkpoint to continue from (None: from the beginning), or a one-line
        refusal: a new run in a folder that holds one, or a checkpoint this process cannot continue."""
        out = self.out
        if not resume:
            if out is not None and any((out / f).exists() for f in ("checkpoint.pt", "config.json")):
                raise TrainError(f"{out} already holds a run: continue it with --resume or choose another --out")
            return asked, None
        if out is None or not (out / "checkpoint.pt").exists():
            if out is not None and (out / "config.json").exists():  # stopped before its first checkpoint
                self.log(f"{out} has no checkpoint yet: its run starts from the beginning")
                return resumed_config(TrainConfig.load(out), asked), None
            raise TrainError(f"--resume: no checkpoint.pt in {out}: start the run without --resume")
        saved = load_checkpoint(out / "checkpoint.pt")
        cfg = resumed_config(TrainConfig.from_dict(saved["config"]), asked)
        written_on = "cuda" if "cuda" in saved["rng"] else "cpu"
        if written_on != device.type:
            raise TrainError(f"{out}/checkpoint.pt was written on {written_on} and holds that device's random "
                             f"state: resume it on {written_on} (--device {written_on}), or start a new run")
        if saved["step"] and train_state(saved).world != world:
            saved_world = train_state(saved).world
            raise TrainError(
                f"{out}/checkpoint.pt was written mid-epoch by {saved_world} process(es), and this run has {world}: "
                f"resume it with {saved_world} (torchrun --nproc-per-node {saved_world}, or no torchrun for 1) to "
                f"the end of epoch {saved['epoch'] + 1}, then with any number")
        return cfg, saved

    def history(self, saved: dict[str, Any], epoch: int) -> list[dict[str, Any]]:
        """The epochs' records a checkpoint holds (one written before they carried them: from
        metrics.jsonl), written back to metrics.jsonl as the checkpoint says."""
        history = saved["history"] if "history" in saved else [
            r for r in read_metrics(self.out / "metrics.jsonl") if r["epoch"] <= epoch]
        self.write_metrics(history)
        return history

    def write_config(self, cfg: TrainConfig, environment: dict[str, Any]) -> None:
        """``config.json`` (a resumed run's gets its new epochs)."""
        if self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / "config.json", json.dumps(
                dict(config=dataclasses.asdict(cfg), environment=environment), indent=2) + "\n")

    def save(self, name: str, cfg: TrainConfig, state: TrainState, model: nn.Module, run: Any) -> None:
        """The checkpoint ``name`` (``run``: its optimizer, scheduler, data and history)."""
        if self.writes:
            save_checkpoint(self.out / name, cfg, state, model, run.opt, run.sched, run.data.normalizer,
                            run.data.image_shape, run.data.num_classes, run.history)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        if self.writes:
            write_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writes:
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")

    def export(self, model: nn.Module) -> None:
        """``model.pt``: the trained model's plain PyTorch state_dict (:func:`ekdaa.unconvert`), loadable
        into the unconverted architecture."""
        if self.writes:
            save_atomic(unconvert(model).state_dict(), self.out / "model.pt")

    def close(self) -> None:
        """Let go of the directory: its log and its lock."""
        if self.logfile is not None:
            self.logfile.close()
            self.logfile = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
