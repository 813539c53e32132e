"""Training: ``train(TrainConfig(...))`` runs a whole experiment and returns its summary.

A run directory gets ``config.json`` (all that is needed to rerun), ``metrics.jsonl``
(one object per epoch), ``summary.json`` and ``checkpoint.pt`` (model with its
feedback tensors, optimizer, scheduler, RNG states), written atomically at every
epoch end and on Ctrl-C. ``resume=True`` continues bit-for-bit from the checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__, distributed
from .data import Normalizer, augment, batches, load_dataset, split_validation
from .models import build_model
from .rules import convert, param_groups

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "step")
AMP = ("none", "bf16")
CHECKPOINT_FORMAT = "ekdaa-checkpoint-v1"
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


# -- checkpoints ---------------------------------------------------------------

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


# -- the pieces of a run --------------------------------------------------------

@dataclass
class Data:
    """The splits of a dataset on the training device (uint8) and their normaliser."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor] | None
    test: tuple[Tensor, Tensor]
    normalizer: Normalizer
    image_shape: tuple[int, int, int]
    num_classes: int


def prepare_data(cfg: TrainConfig, device: torch.device) -> Data:
    ds = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    train = (ds.train_x, ds.train_y)
    val = None
    if cfg.val_split:
        train, val = split_validation(ds.train_x, ds.train_y, cfg.val_split, cfg.seed)
    if cfg.train_subset:
        train = (train[0][:cfg.train_subset], train[1][:cfg.train_subset])
    normalizer = Normalizer(cfg.normalization, train[0]).to(device)
    move = lambda pair: tuple(t.to(device) for t in pair)  # noqa: E731
    return Data(move(train), move(val) if val else None, move((ds.test_x, ds.test_y)), normalizer,
                ds.image_shape, ds.num_classes)


def build(cfg: TrainConfig, data: Data, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Model (converted to the rule), optimizer and LR scheduler, seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.image_shape, data.num_classes, activation=cfg.activation,
                        bias=cfg.bias)
    example = data.normalizer(data.train[0][: min(2, len(data.train[0]))]).cpu()
    model = convert(model, cfg.rule, example_input=example, **cfg.rule_options()).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    extra = dict(weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(param_groups(model, cfg.lr, **extra), lr=cfg.lr, momentum=cfg.momentum)
    else:
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        opt = cls(param_groups(model, cfg.lr, **extra), lr=cfg.lr)
    sched = None
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    elif cfg.lr_schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return model, opt, sched


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, normalizer: Normalizer, batch_size: int = 1000,
             amp: str = "none", channels_last: bool = False,
             dist: distributed.Dist = distributed.Dist()) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on uint8 images ``x`` (each rank
    evaluates every ``dist.world``-th image; the sums are combined)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=x.device, dtype=torch.float64)  # loss, correct, count
    x, y = x[dist.rank::dist.world], y[dist.rank::dist.world]
    for xb, yb in batches(x, y, batch_size, shuffle=False, generator=None):
        inp = _inputs(normalizer, xb, channels_last)
        with _autocast(x.device, amp):
            logits = model(inp)
        sums[0] += F.cross_entropy(logits.float(), yb, reduction="sum")
        sums[1] += (logits.argmax(1) == yb).sum()
        sums[2] += len(yb)
    model.train(was_training)
    loss, correct, n = dist.all_sum(sums).tolist()
    return loss / max(n, 1), correct / max(n, 1)


def _inputs(normalizer: Normalizer, xb: Tensor, channels_last: bool) -> Tensor:
    inp = normalizer(xb)
    return inp.contiguous(memory_format=torch.channels_last) if channels_last else inp


def _autocast(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _rng_state(gen: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(gen: torch.Generator, state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def environment() -> dict[str, Any]:
    return dict(ekdaa=__version__, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), threads=torch.get_num_threads())


def _resumed_config(saved: TrainConfig, asked: TrainConfig) -> TrainConfig:
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


# -- the loop ------------------------------------------------------------------

class Run:
    """One training run; ``fit()`` trains to ``cfg.epochs`` and returns the summary."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool | None = None):
        cfg.validate()
        self.cfg, self.log, self.progress = cfg, log, progress
        self.device = resolve_device(cfg.device)
        self.dist = distributed.setup(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if not self.dist.is_main:
            self.log = lambda line: None
        self.out = Path(cfg.out) if cfg.out else None
        state = None
        if resume:
            if self.out is None or not (self.out / "checkpoint.pt").exists():
                raise TrainError(f"--resume: no checkpoint.pt in {self.out}: start the run without --resume")
            state = load_checkpoint(self.out / "checkpoint.pt")  # on the CPU: RNG states must stay there
            self.cfg = cfg = _resumed_config(TrainConfig.from_dict(state["config"]), cfg)
            if state["step"] and state.get("world", 1) != self.dist.world:
                raise TrainError(
                    f"{self.out}/checkpoint.pt was written mid-epoch by {state['world']} process(es), and this "
                    f"run has {self.dist.world}: resume it with {state['world']} (torchrun --nproc-per-node "
                    f"{state['world']}, or no torchrun for 1) to the end of epoch {state['epoch'] + 1}, then "
                    "with any number")
        self.data = prepare_data(cfg, self.device)
        self.model, self.opt, self.sched = build(cfg, self.data, self.device)
        self.net = self.model  # what the step calls: DistributedDataParallel across ranks
        if self.dist.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.aug_gen = torch.Generator(device=self.device)  # reseeded every epoch: see train_epoch
        if len(self.data.train[1]) < cfg.batch_size * self.dist.world:
            raise TrainError(f"{len(self.data.train[1])} training images are fewer than one global batch "
                             f"({self.dist.world} processes x batch {cfg.batch_size}): lower --batch-size")
        self.epoch, self.step, self.seconds = 0, 0, 0.0
        self.running = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, seen
        self.history: list[dict[str, Any]] = []
        if state is not None:
            self._restore(state)
        elif self.out is not None and (self.out / "checkpoint.pt").exists():  # every rank looks
            raise TrainError(f"{self.out} already holds a run: continue it with --resume or choose "
                             "another --out")
        if self.out is not None and self.dist.is_main:  # a resumed run's config.json gets its new epochs
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / "config.json", json.dumps(
                dict(config=dataclasses.asdict(cfg), environment=environment()), indent=2) + "\n")
        self.tracker = None  # the per-epoch look inside (alignment, sign flips), from the state reached
        if cfg.track_alignment:
            from .analysis import Tracker
            self.tracker = Tracker(self)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state["scheduler"] is not None:
            self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.seconds = state["epoch"], state["step"], state["seconds"]
        self.running = state["running"].to(self.device)
        _set_rng_state(self.aug_gen, state["rng"], self.device)
        metrics = self.out / "metrics.jsonl"  # absent if the run stopped in its first epoch
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        self.history = [r for r in map(json.loads, filter(str.strip, lines)) if r["epoch"] <= self.epoch]
        if self.dist.is_main:
            self._write_metrics()

    def checkpoint(self) -> None:
        if self.out is None or not self.dist.is_main:
            return
        save_atomic(dict(
            format=CHECKPOINT_FORMAT, config=dataclasses.asdict(self.cfg), model=self.model.state_dict(),
            optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict() if self.sched else None,
            epoch=self.epoch, step=self.step, seconds=self.seconds, running=self.running.cpu(),
            rng=_rng_state(self.aug_gen, self.device),
            normalizer=self.data.normalizer.state_dict(), image_shape=list(self.data.image_shape),
            num_classes=self.data.num_classes, world=self.dist.world), self.out / "checkpoint.pt")

    def _check_finite(self, loss_sum: Tensor) -> None:
        bad = torch.stack([~torch.isfinite(loss_sum)] + [~torch.isfinite(p).all() for p in self.model.parameters()])
        if self.dist.all_sum(bad.any().to(torch.int32)).item():
            where = f" (last good checkpoint: {self.out / 'checkpoint.pt'})" if self.out else ""
            raise Diverged(f"training diverged at epoch {self.epoch + 1} step {self.step}: loss or "
                           f"parameters are NaN/inf; lower --lr (now {self.cfg.lr}){where}")

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This epoch's batches (order fixed by seed and epoch), from the step reached. With
        N processes a global batch holds N x batch_size images and each rank takes its slice
        (the last, incomplete global batch is dropped)."""
        order = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
        x, y = self.data.train
        b, rank, world = self.cfg.batch_size, self.dist.rank, self.dist.world
        for i, (xb, yb) in enumerate(batches(x, y, b * world, shuffle=True, generator=order, drop_last=world > 1)):
            if i >= self.step:
                yield xb[rank * b:(rank + 1) * b], yb[rank * b:(rank + 1) * b]

    def train_epoch(self) -> None:
        self.model.train()
        if self.step == 0:  # augmentation draws fixed by (seed, epoch, rank); mid-epoch: the saved state
            self.aug_gen.manual_seed((self.cfg.seed * 1_000_003 + self.epoch) * 1_009 + self.dist.rank)
        n = len(self.data.train[1])
        global_batch = self.cfg.batch_size * self.dist.world
        n_steps = n // global_batch if self.dist.world > 1 else math.ceil(n / global_batch)
        bar = tqdm(total=n_steps, initial=self.step, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                   leave=False, disable=not self.progress if self.progress is not None else None)
        start = time.perf_counter()
        try:
            for xb, yb in self._batches():
                self._step(xb, yb)
                if self.step % 20 == 0 or self.step == n_steps:
                    loss_sum, correct, seen = self.running.tolist()
                    self._check_finite(self.running[0])
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
                bar.update(1)
                if self.interrupted:  # Ctrl-C: stop at this step boundary, resumable exactly
                    self.seconds += time.perf_counter() - start
                    self._check_finite(self.running[0])
                    self.checkpoint()
                    raise KeyboardInterrupt
        finally:
            bar.close()
        self.seconds += time.perf_counter() - start

    def _step(self, xb: Tensor, yb: Tensor) -> None:
        cfg = self.cfg
        inp = _inputs(self.data.normalizer, xb, cfg.channels_last)
        if cfg.augment:
            inp = augment(inp, self.aug_gen, flip=cfg.dataset == "cifar10")
        with _autocast(self.device, cfg.amp):
            logits = self.net(inp)
            loss = F.cross_entropy(logits.float(), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.running[0] += loss.detach().double() * len(yb)  # in place: no host tensor per step
        self.running[1] += (logits.argmax(1) == yb).sum()
        self.running[2] += len(yb)
        self.step += 1

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs``. The first Ctrl-C stops at the next step boundary after
        writing the checkpoint (then KeyboardInterrupt); a second one stops at once."""
        cfg = self.cfg
        with self._catch_ctrl_c():
            while self.epoch < cfg.epochs:
                self._epoch()
        return self._summary()

    @contextlib.contextmanager
    def _catch_ctrl_c(self) -> Iterator[None]:
        self.interrupted = False
        if threading.current_thread() is not threading.main_thread() or self.dist.world > 1:
            yield
            return

        def handler(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, previous)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _epoch(self) -> None:
        """Train one epoch (or its rest), evaluate, log, checkpoint."""
        t0 = self.seconds
        self.train_epoch()
        self._check_finite(self.running[0])
        loss_sum, correct, seen = self.dist.all_sum(self.running).tolist()
        record = dict(epoch=self.epoch + 1, train_loss=loss_sum / seen, train_accuracy=correct / seen,
                      images_per_s=seen / max(self.seconds - t0, 1e-9), lr=self.opt.param_groups[0]["lr"])
        record.update(self._evaluate())
        if self.tracker is not None:
            record.update(self.tracker())
        if self.sched is not None:
            self.sched.step()
        self.epoch, self.step = self.epoch + 1, 0
        self.running.zero_()
        record["seconds"] = self.seconds
        self.history.append(record)
        self._write_metrics()
        self.checkpoint()
        self.log(_epoch_line(record, self.cfg.epochs))

    def _evaluate(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for split, pair in (("val", self.data.val), ("test", self.data.test)):
            if pair is None:
                out[f"{split}_loss"] = out[f"{split}_accuracy"] = None
                continue
            loss, acc = evaluate(self.model, *pair, self.data.normalizer, self.cfg.eval_batch_size,
                                 self.cfg.amp, self.cfg.channels_last, self.dist)
            out[f"{split}_loss"], out[f"{split}_accuracy"] = loss, acc
        return out

    def _write_metrics(self) -> None:
        if self.out is not None and self.dist.is_main:
            write_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def _summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        cfg = self.cfg
        summary = dict(rule=cfg.rule, dataset=cfg.dataset, model=cfg.model, activation=cfg.activation,
                       epochs=self.epoch, seed=cfg.seed,
                       train_accuracy=last.get("train_accuracy"), val_accuracy=last.get("val_accuracy"),
                       test_accuracy=last.get("test_accuracy"), train_loss=last.get("train_loss"),
                       test_loss=last.get("test_loss"), images_per_s=last.get("images_per_s"),
                       seconds=self.seconds, device=str(self.device), processes=self.dist.world,
                       rule_options=cfg.rule_options())
        if self.out is not None and self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"epoch {r['epoch']}/{epochs}  train loss {fmt(r['train_loss'])} acc {fmt(r['train_accuracy'])}  "
            f"val loss {fmt(r['val_loss'])} acc {fmt(r['val_accuracy'])}  "
            f"test loss {fmt(r['test_loss'])} acc {fmt(r['test_accuracy'])}  "
            f"{r['images_per_s']:.0f} img/s")


def train(cfg: TrainConfig, resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Train a run to ``cfg.epochs`` and return its summary (see :class:`Run`)."""
    return Run(cfg, resume=resume, **kwargs).fit()


def load_model(checkpoint: str | os.PathLike, device: str = "auto") -> tuple[nn.Module, TrainConfig, Normalizer]:
    """The trained model (converted, in eval mode), its config and normaliser from a checkpoint."""
    dev = resolve_device(device)
    state = load_checkpoint(checkpoint, dev)
    cfg = TrainConfig.from_dict(state["config"])
    normalizer = Normalizer.from_state_dict(state["normalizer"]).to(dev)
    image_shape, num_classes = tuple(state["image_shape"]), state["num_classes"]
    with torch.random.fork_rng(devices=[]):  # the weights come from the checkpoint: leave the RNG alone
        model = build_model(cfg.model, image_shape, num_classes, activation=cfg.activation, bias=cfg.bias)
        model = convert(model, cfg.rule, example_input=torch.zeros(2, *image_shape), **cfg.rule_options())
    model.image_shape, model.num_classes = image_shape, num_classes
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise TrainError(f"checkpoint {checkpoint} does not fit model {cfg.model!r}: "
                         f"{str(err).splitlines()[0]}") from err
    return model.to(dev).eval(), cfg, normalizer


def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset: str | None = None, data_dir: str | None = None,
                        device: str = "auto", split: str = "test") -> dict[str, Any]:
    """Loss and accuracy of a checkpoint on a split of its (or another) dataset."""
    model, cfg, normalizer = load_model(checkpoint, device)
    dev = next(model.parameters()).device
    cfg = dataclasses.replace(cfg, dataset=dataset or cfg.dataset, data_dir=data_dir or cfg.data_dir,
                              train_subset=0)
    data = prepare_data(cfg, dev)
    if (data.image_shape, data.num_classes) != (model.image_shape, model.num_classes):
        raise TrainError(f"{cfg.dataset} has {data.num_classes} classes of {data.image_shape} images, but the "
                         f"checkpoint's model takes {model.num_classes} classes of {model.image_shape}")
    pair = dict(train=data.train, val=data.val, test=data.test)[split]
    if pair is None:
        raise TrainError("split 'val' is empty: the run used val_split=0; use --split test")
    loss, acc = evaluate(model, *pair, normalizer, cfg.eval_batch_size, cfg.amp, cfg.channels_last)
    return dict(checkpoint=str(checkpoint), dataset=cfg.dataset, split=split, rule=cfg.rule,
                model=cfg.model, accuracy=acc, loss=loss, images=len(pair[1]))
