"""Run directories and checkpoints: the checkpoint format, atomic writes, and a run's
trained model with its normaliser. Training writes them; analysis and evaluation read them.

A run directory (``ekdaa train --out DIR``) holds ``checkpoint.pt``: the model with its feedback
tensors, optimizer, scheduler, :class:`TrainState` and the epochs' records, plus the config,
normaliser and data shape that rebuild the model, and a SHA-256 digest of all of it, checked on
every load. Every command takes the run from there. ``config.json``, ``metrics.jsonl`` (one record
per epoch), ``summary.json`` and ``train.log`` are for people and other tools; ``.lock`` says which
live process owns the directory (:class:`RunLock`).
"""
from __future__ import annotations

import datetime
import gc
import hashlib
import io
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import TrainConfig, TrainError, resolve_device
from .data import Normalizer
from .models import build_model
from .rules import convert

CHECKPOINT_FORMAT = "ekdaa-checkpoint-v2"
_UNCHECKED_FORMATS = ("ekdaa-checkpoint-v1",)  # written before checkpoints carried their digest


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


def _write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to the disk, then rename it over
    ``path``: a failed or cut-short write never replaces the old file. A failure is one line."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        kept = f" (the previous {path.name} is intact)" if path.exists() else ""
        raise TrainError(f"could not write {path}: {err.strerror or err}: free space there or choose another "
                         f"--out{kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically (serialised in memory first, so that a write error
    is the operating system's, not the serialiser's)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_bytes_atomic(path, buffer.getbuffer())


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _write_bytes_atomic(path, text.encode())


def writable_folder(folder: Path, flag: str) -> None:
    """Make ``folder`` (with its parents) and check that a file can be written there, or refuse in one
    line naming ``flag``, the option that chose it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TrainError(f"{flag} {folder}: cannot write there ({err.strerror}): choose a writable "
                         "folder") from None


def remove_temporary_files(folder: Path) -> None:
    """Delete what an atomic write cut short (by a signal, a kill) left in ``folder``."""
    for tmp in folder.glob(".*.tmp[0-9]*"):
        tmp.unlink(missing_ok=True)


def digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, every other value's
    repr, in the order they are held (dicts keep theirs through a save and a load)."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k, v in x.items():
                walk(k)
                walk(v)
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load an ekdaa checkpoint onto the CPU safely (``weights_only=True``: no code runs) and check its
    digest there (the RNG states it holds must stay on the CPU anyway)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist: pass the checkpoint.pt of a run directory")
    with open(path, "rb") as f:
        start = f.read(4)
    if start and start[:2] != b"PK" and start[:1] != b"\x80":  # neither a torch zip nor a pickle
        raise TrainError(f"{path} is not a checkpoint (a torch file): pass the run's checkpoint.pt (or model.pt, "
                         "checkpoint-best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...: torch's own text is for its developers
        if "weights only load failed" in str(err).lower():
            reason = "it holds Python objects, which an ekdaa checkpoint never does (loading them could run code)"
        else:
            reason = f"its {path.stat().st_size} bytes are not a whole torch file (cut short, or another kind of file)"
        raise TrainError(f"checkpoint {path} is unreadable: {reason}; restore it from a copy or train the run "
                         "again") from err
    if not isinstance(state, dict) or state.get("format") not in (CHECKPOINT_FORMAT, *_UNCHECKED_FORMATS):
        raise TrainError(f"checkpoint {path} is not an ekdaa checkpoint (format {CHECKPOINT_FORMAT})")
    if state["format"] == CHECKPOINT_FORMAT and state.pop("digest", None) != digest(state):
        raise TrainError(f"checkpoint {path} is corrupted: its contents do not match the digest saved with them; "
                         "nothing was loaded: restore the file from a copy or train the run again")
    return state


def run_config(out: str | os.PathLike) -> TrainConfig:
    """A run directory's config: its checkpoint's, or, for a run stopped before its first checkpoint,
    its ``config.json``'s."""
    out = Path(out)
    if (out / "checkpoint.pt").exists():
        return TrainConfig.from_dict(load_checkpoint(out / "checkpoint.pt")["config"])
    return TrainConfig.load(out)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if it is absent); a broken line is a one-line error."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise TrainError(f"{path}, line {number}, is not a JSON record (a write cut short?): delete that "
                             "line, or rewrite the file from the checkpoint with ekdaa train --resume --out "
                             f"{path.parent}") from None
    return records


class RunLock:
    """Ownership of a run directory by one live process: an advisory ``flock`` on ``DIR/.lock``,
    which the OS releases however the process ends (so a crash never leaves a stale lock). The
    file says who holds it, for the refusal a second writer gets. Where ``fcntl`` is missing
    (Windows) there is no lock."""

    def __init__(self, out: Path):
        self.fd: int | None = None
        writable_folder(out, "--out")
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:
            os.close(fd)
            return
        for attempt in range(2):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
                if attempt == 0 and owner.startswith(f"pid {os.getpid()} "):
                    gc.collect()  # this process's own Run that nobody holds any more lets go
                    continue
                os.close(fd)
                raise TrainError(f"{out} is in use by another run ({owner}): wait for it to end, or choose "
                                 "another --out") from None
        os.ftruncate(fd, 0)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes with it; the file stays (another process may hold it by now)
            self.fd = None

    __del__ = release


def save_checkpoint(path: Path, cfg: TrainConfig, state: TrainState, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, normalizer: Normalizer,
                    image_shape: tuple[int, int, int], num_classes: int, history: list[dict[str, Any]]) -> None:
    """Write a run's checkpoint, with its digest, atomically (a broken write never replaces a good one)."""
    state = dict(
        format=CHECKPOINT_FORMAT, config=asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler else None, **asdict(state),
        normalizer=normalizer.state_dict(), image_shape=list(image_shape), num_classes=num_classes,
        history=history)
    state["digest"] = digest(state)
    save_atomic(state, path)


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
    state = load_checkpoint(checkpoint)
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
