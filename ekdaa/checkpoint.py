"""Run directories and checkpoints: the checkpoint format, atomic writes, and a run's
trained model with its normaliser. Training writes them; analysis and evaluation read them.

A run directory (``ekdaa train --out DIR``) holds ``config.json``, ``metrics.jsonl`` (one
object per epoch), ``summary.json`` and ``checkpoint.pt``: the model with its feedback
tensors, optimizer, scheduler and :class:`TrainState`, plus the normaliser and data shape
needed to rebuild the model.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import TrainConfig, TrainError, resolve_device
from .data import Normalizer
from .models import build_model
from .rules import convert

CHECKPOINT_FORMAT = "ekdaa-checkpoint-v1"


@dataclass
class TrainState:
    """Where a run stands: epochs done, steps into the current one, training seconds, the
    running sums of the epoch (loss, correct, seen), the RNG states, and how many processes
    wrote it (a mid-epoch state resumes only under the same number)."""

    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    running: Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    rng: dict[str, Tensor] = field(default_factory=dict)
    world: int = 1


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an ekdaa checkpoint safely (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist: pass the checkpoint.pt of a run directory")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainError(f"checkpoint {path} is unreadable (truncated or not an ekdaa checkpoint): "
                         f"{reason[:200]}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"checkpoint {path} is not an ekdaa checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def save_checkpoint(path: Path, cfg: TrainConfig, state: TrainState, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, normalizer: Normalizer,
                    image_shape: tuple[int, int, int], num_classes: int) -> None:
    """Write a run's checkpoint atomically (a broken write never replaces a good one)."""
    save_atomic(dict(
        format=CHECKPOINT_FORMAT, config=asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler else None, **asdict(state),
        normalizer=normalizer.state_dict(), image_shape=list(image_shape), num_classes=num_classes), path)


def train_state(checkpoint: dict[str, Any]) -> TrainState:
    """The :class:`TrainState` a loaded checkpoint holds."""
    return TrainState(epoch=checkpoint["epoch"], step=checkpoint["step"], seconds=checkpoint["seconds"],
                      running=checkpoint["running"], rng=checkpoint["rng"], world=checkpoint.get("world", 1))


@dataclass
class TrainedModel:
    """A run's trained model (converted to its rule, in eval mode) with what it needs."""

    model: nn.Module
    config: TrainConfig
    normalizer: Normalizer
    image_shape: tuple[int, int, int]
    num_classes: int


def load_model(checkpoint: str | os.PathLike, device: str = "auto") -> TrainedModel:
    """The trained model, its config and normaliser from a checkpoint, loaded once."""
    dev = resolve_device(device)
    state = load_checkpoint(checkpoint, dev)
    cfg = TrainConfig.from_dict(state["config"])
    normalizer = Normalizer.from_state_dict(state["normalizer"]).to(dev)
    image_shape, num_classes = tuple(state["image_shape"]), state["num_classes"]
    with torch.random.fork_rng(devices=[]):  # the weights come from the checkpoint: leave the RNG alone
        model = build_model(cfg.model, image_shape, num_classes, activation=cfg.activation, bias=cfg.bias)
        model = convert(model, cfg.rule, example_input=torch.zeros(2, *image_shape), **cfg.rule_options())
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise TrainError(f"checkpoint {checkpoint} does not fit model {cfg.model!r}: "
                         f"{str(err).splitlines()[0]}") from err
    return TrainedModel(model.to(dev).eval(), cfg, normalizer, image_shape, num_classes)
