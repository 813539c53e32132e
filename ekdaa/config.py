"""What defines a run: :class:`TrainConfig`, its validation, and the errors training raises."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "step")
AMP = ("none", "bf16")
#: TrainConfig fields that say where and how fast a run computes, not what: a resumed run may
#: change them (and ``epochs``, to extend it); any other change is refused.
MACHINE_FIELDS = ("out", "device", "data_dir", "download", "eval_batch_size", "compile")


class TrainError(Exception):
    """A bad configuration or a broken file: one line saying what and how to fix it."""


class Diverged(TrainError):
    """NaN/inf loss or parameters; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a run (the defaults train the digits quickstart)."""

    dataset: str = "digits"
    model: str = "paper-cnn"
    rule: str = "ekdaa"
    activation: str = "tanh"
    bias: bool = False
    epochs: int = 10
    batch_size: int = 50
    optimizer: str = "adam"  # Adam lr 1e-3 won the validation sweep (ekdaa/suites/sweep-cpu.toml)
    lr: float = 0.001
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    # EKDAA options (ignored by the other rules)
    beta: float = 0.9
    gamma: float = 1.0
    error_kernel_init: str = "random"
    pool_routing: str = "max"
    error_norm: str = "none"
    target_function: str = "activation"  # 'smooth': through tanh(u / tau) for sign (not the paper's)
    tau: float = 1.0
    # data
    data_dir: str | None = None
    download: bool = True
    val_split: int = 0
    train_subset: int = 0
    normalization: str = "half"
    augment: bool = False
    # machine
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False  # torch.compile the training step's model (evaluation stays eager)
    eval_batch_size: int = 1000
    track_alignment: bool = False  # log per-layer angles and Sign layers' flips each epoch (ekdaa.analysis)
    out: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rule_options(self) -> dict[str, Any]:
        if self.rule != "ekdaa":
            return {}
        return dict(beta=self.beta, gamma=self.gamma, error_kernel_init=self.error_kernel_init,
                    pool_routing=self.pool_routing, error_norm=self.error_norm,
                    target_function=self.target_function, tau=self.tau)

    def validate(self) -> None:
        for name, value, choices in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("lr_schedule", self.lr_schedule, SCHEDULES), ("amp", self.amp, AMP)):
            if value not in choices:
                raise TrainError(f"invalid {name} {value!r}: choose one of {', '.join(choices)}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if self.val_split < 0 or self.train_subset < 0:
            raise TrainError("val_split and train_subset must be >= 0")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        """The config a run directory's ``config.json`` (or that file itself) holds."""
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        try:
            values = json.loads(path.read_text())["config"]
        except FileNotFoundError:
            raise TrainError(f"{path} does not exist: pass a run directory written by ekdaa train --out") from None
        except (ValueError, KeyError, TypeError) as err:
            raise TrainError(f"{path} is not a run's config.json (no 'config' object): {err}") from None
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TrainError(f"unknown config keys {unknown}: valid keys are {', '.join(sorted(names))}")
        defaults = cls()
        for key, value in values.items():
            default = getattr(defaults, key)
            want = (str, type(None)) if default is None else (int, float) if type(default) is float else type(default)
            if not isinstance(value, want) or (isinstance(value, bool) and type(default) is not bool):
                raise TrainError(f"config key {key} = {value!r} should be of type {type(default).__name__}"
                                 f"{' or null' if default is None else ''}, like its default {default!r}")
        return cls(**values)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise TrainError(f"invalid device {name!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("device 'cuda' requested but no CUDA GPU is available: use --device cpu or auto")
    return device


def resumed_config(saved: TrainConfig, asked: TrainConfig) -> TrainConfig:
    """The run's own config, with the machine fields and ``epochs`` of ``asked``; any other
    difference is refused, naming the option."""
    changed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in (*MACHINE_FIELDS, "epochs")
               and getattr(asked, f.name) != getattr(saved, f.name)]
    if changed:
        what = ", ".join(f"--{n.replace('_', '-')} {getattr(asked, n)!r} (the run's: {getattr(saved, n)!r})"
                         for n in changed)
        raise TrainError(f"--resume continues a run with its own config, but {what} would change it: "
                         "drop the option, or start a new run with another --out")
    if asked.epochs != saved.epochs and saved.lr_schedule != "none":
        raise TrainError(f"--resume with --epochs {asked.epochs} would change the run's "
                         f"{saved.lr_schedule} schedule over {saved.epochs} epochs: keep --epochs "
                         f"{saved.epochs} or start a new run")
    return dataclasses.replace(saved, epochs=asked.epochs, **{n: getattr(asked, n) for n in MACHINE_FIELDS})
