"""Training: ``train(TrainConfig(...))`` runs a whole experiment and returns its summary and model.

:class:`Run` reads top to bottom: prepare the data, build model, optimizer and schedule
(restored from the checkpoint on resume), then per epoch train, evaluate, log and write
the run directory (:mod:`ekdaa.checkpoint`: ``config.json``, ``metrics.jsonl``,
``summary.json``, ``checkpoint.pt``, ``train.log``, atomically, at every epoch end and when a stop
signal arrives; ``checkpoint-best.pt`` at the best validation accuracy so far; ``model.pt``, the plain
trained model, at the end). ``resume=True`` continues bit-for-bit from the checkpoint. The directory is locked to
the run while it lives (:class:`ekdaa.checkpoint.RunLock`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__, distributed
from .analysis.alignment import Tracker
from .checkpoint import (RunLock, TrainState, load_checkpoint, load_model, read_metrics, remove_temporary_files,
                         save_atomic, save_checkpoint, train_state, write_atomic)
from .config import (AMP, MACHINE_FIELDS, OPTIMIZERS, SCHEDULES, Diverged, Stopped, TrainConfig, TrainError,
                     resolve_device, resumed_config)
from .data import Normalizer, augment, batches, load_dataset, split_validation
from .graphs import GraphedStep, set_capturable
from .layers import tracks_statistics
from .models import build_model
from .rules import compile as compile_model
from .rules import convert, param_groups, unconvert
from .tensorboard import TensorBoard

__all__ = ["AMP", "MACHINE_FIELDS", "OPTIMIZERS", "SCHEDULES", "Data", "Diverged", "Result", "Run", "Stopped",
           "TrainConfig", "TrainError", "build", "evaluate", "evaluate_checkpoint", "load_checkpoint", "load_model",
           "prepare_data", "train"]

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
    ds = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, **cfg.dataset_options())
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
             dist: distributed.Dist = distributed.Dist(), progress: bool | None = None,
             desc: str = "eval") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on uint8 images ``x`` (each rank
    evaluates every ``dist.world``-th image; the sums are combined). ``progress``: a progress
    bar (None: when the output is a terminal)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=x.device, dtype=torch.float64)  # loss, correct, count
    x, y = x[dist.rank::dist.world], y[dist.rank::dist.world]
    bar = tqdm(batches(x, y, batch_size, shuffle=False, generator=None), total=math.ceil(len(y) / batch_size),
               desc=desc, leave=False, disable=_hidden(progress) if dist.is_main else True)
    for xb, yb in bar:
        inp = _inputs(normalizer, xb, channels_last)
        with _autocast(x.device, amp):
            logits = model(inp)
        sums[0] += F.cross_entropy(logits.float(), yb, reduction="sum")
        sums[1] += (logits.argmax(1) == yb).sum()
        sums[2] += len(yb)
    model.train(was_training)
    loss, correct, n = dist.all_sum(sums).tolist()
    return loss / max(n, 1), correct / max(n, 1)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: Tensor, normalizer: Normalizer, batch_size: int,
                        channels_last: bool = False) -> int:
    """Replace every BatchNorm's running statistics by their average over the batches of uint8
    images ``x`` (in order, unaugmented) under the model's current weights ("precise BN"): running
    averages gathered while the weights moved can lag them. Returns the number of norms reset."""
    norms = [m for m in model.modules() if tracks_statistics(m)]
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches that follow
    model.train()
    for start in range(0, len(x), batch_size):
        model(_inputs(normalizer, x[start:start + batch_size], channels_last))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(norms)


def _converted_options(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """The options the model's rule took, as it resolved them (``auto`` inits: what they drew)."""
    rule = getattr(getattr(model, "_orig_mod", getattr(model, "module", model)), "ekdaa_rule", None)
    return {k: v for k, v in rule.options().items() if k in cfg.rule_options()} if rule is not None else {}


def _hidden(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` choice (None: tqdm decides, shown on a terminal)."""
    return None if progress is None else not progress


def _inputs(normalizer: Normalizer, xb: Tensor, channels_last: bool) -> Tensor:
    inp = normalizer(xb)
    return inp.contiguous(memory_format=torch.channels_last) if channels_last else inp


def _autocast(device: torch.device, amp: str, cache: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16", cache_enabled=cache)


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


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (no trimming; mmap only above 32 MB, its
    largest threshold) instead of handing it back to the OS after each step, whose pages the next
    step then faults in again: on the CPU that costs a paper-cnn step 5-10 % (README: "Benchmark").
    Process-wide; the resident size stays at the run's peak, as it is mid-step anyway. Returns
    whether it applied (False without glibc, e.g. on macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long))
                and mallopt(m_trim_threshold, 2**31 - 1))


def environment() -> dict[str, Any]:
    return dict(ekdaa=__version__, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), threads=torch.get_num_threads())


#: Training steps between two looks at the host (progress, divergence, stop signals, TensorBoard)
SYNC_EVERY = 20

#: The signals that stop a run as Ctrl-C does (SIGTERM: what schedulers send first; SIGUSR1: a requeue)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


# -- the loop ------------------------------------------------------------------

class Run:
    """One training run; ``fit()`` trains to ``cfg.epochs`` and returns the summary."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool | None = None):
        cfg.validate()
        self.cfg, self.log, self.progress = cfg, log, progress
        self._join_processes()
        self.out = Path(cfg.out) if cfg.out else None
        self.lock, self.logfile, self.board = None, None, None
        if self.out is not None and self.dist.is_main:  # before anything is written: one writer per directory
            self._claim_run_directory()
        saved = None
        if resume:
            self.cfg, saved = self._resume_point(cfg)
        elif self.out is not None and any((self.out / f).exists() for f in ("checkpoint.pt", "config.json")):
            raise TrainError(f"{self.out} already holds a run: continue it with --resume or choose "
                             "another --out")  # every rank looks
        self.data = prepare_data(self.cfg, self.device)
        self._build(saved)
        if self.out is not None and self.dist.is_main:  # a resumed run's config.json gets its new epochs
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / "config.json", json.dumps(
                dict(config=dataclasses.asdict(self.cfg), environment=environment()), indent=2) + "\n")
            if self.cfg.log == "tensorboard":
                self.board = TensorBoard(self.out / "tensorboard", self.device, SYNC_EVERY)
        self.tracker = self._tracker() if self.cfg.track_alignment else None
        self.max_loss = self.cfg.max_loss or 100 * math.log(self.data.num_classes)
        self.stop_signal, self.stopping = 0, False  # a signal seen here; one seen by any process
        self._record(f"{'resume' if resume else 'start'} at epoch {self.state.epoch + 1} step {self.state.step}: "
                     f"{self.cfg.rule} on {self.cfg.dataset} ({self.cfg.model}), {self.cfg.epochs} epochs, "
                     f"{self.device}, {self.dist.world} process(es), pid {os.getpid()}")

    def _join_processes(self) -> None:
        """The device and, under torchrun, the process group; only the main process logs."""
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        self.dist = distributed.setup(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if not self.dist.is_main:
            self.log = lambda line: None
        if self.device.type == "cpu":
            keep_freed_memory()
        if cfg.cuda_graph and (self.device.type != "cuda" or self.dist.world > 1 or cfg.compile):
            raise TrainError(f"--cuda-graph needs one CUDA device, no torchrun and no --compile (this run: "
                             f"{self.device.type}, {self.dist.world} process(es), compile {cfg.compile}): "
                             "drop --cuda-graph or train on one GPU")

    def _claim_run_directory(self) -> None:
        """Lock the run directory, remove what a killed save left, open train.log."""
        self.lock = RunLock(self.out)
        remove_temporary_files(self.out)
        self.logfile = self._open_log()
        self.log = self._tee(self.log)

    def _build(self, saved: dict[str, Any] | None) -> None:
        """Model, optimizer, schedule and state, from the checkpoint ``saved`` when resuming."""
        cfg = self.cfg
        self.model, self.opt, self.sched = build(cfg, self.data, self.device)
        self.net = self.model  # what the step calls: DistributedDataParallel across ranks
        if self.dist.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = compile_model(self.net)
        self.aug_gen = torch.Generator(device=self.device)  # reseeded every epoch: see train_epoch
        if len(self.data.train[1]) < cfg.batch_size * self.dist.world:
            raise TrainError(f"{len(self.data.train[1])} training images are fewer than one global batch "
                             f"({self.dist.world} processes x batch {cfg.batch_size}): lower --batch-size")
        self.state = TrainState(running=torch.zeros(3, dtype=torch.float64, device=self.device))
        self.history: list[dict[str, Any]] = []  # one record per epoch done
        if saved is not None:
            self._restore(saved)
        # on a GPU Adam/AdamW always run capturable (step count and bias corrections on the device), so that a
        # run computes the same with and without --cuda-graph, and one resumed across them continues it;
        # after the restore: a checkpoint's groups may say otherwise
        set_capturable(self.opt, self.device.type == "cuda")
        self.graphed = GraphedStep(self._train_step, self.opt) if cfg.cuda_graph else None

    def _tracker(self) -> Tracker:
        """The per-epoch look inside (alignment, sign flips) on the first training batch, from the state reached."""
        x, y = self.data.train
        return Tracker(self.model, (self.data.normalizer(x[:self.cfg.batch_size]), y[:self.cfg.batch_size]))

    def _open_log(self) -> Any:
        try:
            return open(self.out / "train.log", "a", buffering=1)
        except OSError as err:
            raise TrainError(f"could not write {self.out / 'train.log'} ({err.strerror}): choose another "
                             "--out") from None

    def _record(self, line: str) -> None:
        """Append ``line`` to the run directory's train.log (main process, with --out), with the time."""
        if self.logfile is not None:
            self.logfile.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {line}\n")

    def _tee(self, log: Callable[[str], None]) -> Callable[[str], None]:
        def both(line: str) -> None:
            log(line)
            self._record(line)
        return both

    def close(self) -> None:
        """Let go of the run directory (its lock and logs); ``fit`` does this when it returns or fails."""
        if self.board is not None:
            self.board.close()
            self.board = None
        if self.logfile is not None:
            self.logfile.close()
            self.logfile = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _resume_point(self, asked: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
        """The run's own config (with the changes ``asked`` may make) and its checkpoint, or a
        one-line refusal."""
        if self.out is None or not (self.out / "checkpoint.pt").exists():
            if self.out is not None and (self.out / "config.json").exists():  # stopped before its first checkpoint
                self.log(f"{self.out} has no checkpoint yet: its run starts from the beginning")
                return resumed_config(TrainConfig.load(self.out), asked), None
            raise TrainError(f"--resume: no checkpoint.pt in {self.out}: start the run without --resume")
        saved = load_checkpoint(self.out / "checkpoint.pt")
        cfg = resumed_config(TrainConfig.from_dict(saved["config"]), asked)
        written_on = "cuda" if "cuda" in saved["rng"] else "cpu"
        if written_on != self.device.type:
            raise TrainError(f"{self.out}/checkpoint.pt was written on {written_on} and holds that device's "
                             f"random state: resume it on {written_on} (--device {written_on}), or start a new run")
        world = train_state(saved).world
        if saved["step"] and world != self.dist.world:
            raise TrainError(
                f"{self.out}/checkpoint.pt was written mid-epoch by {world} process(es), and this run has "
                f"{self.dist.world}: resume it with {world} (torchrun --nproc-per-node {world}, or no "
                f"torchrun for 1) to the end of epoch {saved['epoch'] + 1}, then with any number")
        return cfg, saved

    def _restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        if self.sched is not None and saved["scheduler"] is not None:
            self.sched.load_state_dict(saved["scheduler"])
        self.state = train_state(saved)
        self.state.running = self.state.running.to(self.device)
        _set_rng_state(self.aug_gen, self.state.rng, self.device)
        if "history" in saved:
            self.history = saved["history"]
        else:  # a checkpoint written before they carried the records
            self.history = [r for r in read_metrics(self.out / "metrics.jsonl") if r["epoch"] <= self.state.epoch]
        if self.dist.is_main:  # metrics.jsonl as the checkpoint says, whatever happened to the file
            self._write_metrics()

    def checkpoint(self, name: str = "checkpoint.pt") -> None:
        """Write the run's state to ``name`` in the run directory (main process, with --out)."""
        if self.out is None or not self.dist.is_main:
            return
        state = dataclasses.replace(self.state, running=self.state.running.cpu(), world=self.dist.world,
                                    rng=_rng_state(self.aug_gen, self.device))
        save_checkpoint(self.out / name, self.cfg, state, self.model, self.opt, self.sched,
                        self.data.normalizer, self.data.image_shape, self.data.num_classes, self.history)

    def _best_on_validation(self) -> bool:
        """Whether the last epoch has the best validation accuracy so far (False without a split)."""
        val = [r["val_accuracy"] for r in self.history]
        return val[-1] is not None and all(val[-1] > v for v in val[:-1] if v is not None)

    def export(self) -> None:
        """``model.pt`` in the run directory: the trained model's plain PyTorch state_dict
        (:func:`ekdaa.unconvert`), loadable into the unconverted architecture."""
        if self.out is not None and self.dist.is_main:
            save_atomic(unconvert(self.model).state_dict(), self.out / "model.pt")

    def _check(self) -> bool:
        """Raise :class:`Diverged` if the loss or a parameter is NaN/inf, or the epoch's mean loss has
        passed ``max_loss``, on any process; return whether any process got a stop signal. Every
        process gets the same answers (one all-reduce), so all stop at the same step."""
        loss_sum, seen = self.state.running[0], self.state.running[2]
        nonfinite = torch.stack([~torch.isfinite(loss_sum)]
                                + [~torch.isfinite(p).all() for p in self.model.parameters()])
        flags = torch.stack([nonfinite.any(), loss_sum > self.max_loss * seen,
                             torch.tensor(self.stop_signal > 0, device=self.device)]).to(torch.int32)
        nan, exploded, stop = self.dist.all_sum(flags).tolist()
        if nan or exploded:
            where = f" (last good checkpoint: {self.out / 'checkpoint.pt'})" if self.out else ""
            why = ("loss or parameters are NaN/inf" if nan else
                   f"the epoch's mean training loss passed --max-loss {self.max_loss:.3g}")
            raise Diverged(f"training diverged at epoch {self.state.epoch + 1} step {self.state.step}: {why}; "
                           f"lower --lr (now {self.cfg.lr}){where}")
        return stop > 0

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This epoch's batches (order fixed by seed and epoch), from the step reached. With
        N processes a global batch holds N x batch_size images and each rank takes its slice
        (the last, incomplete global batch is dropped)."""
        order = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + self.state.epoch)
        x, y = self.data.train
        b, rank, world = self.cfg.batch_size, self.dist.rank, self.dist.world
        for i, (xb, yb) in enumerate(batches(x, y, b * world, shuffle=True, generator=order, drop_last=world > 1)):
            if i >= self.state.step:
                yield xb[rank * b:(rank + 1) * b], yb[rank * b:(rank + 1) * b]

    def train_epoch(self) -> bool:
        """Train the epoch (or its rest); False if a stop signal ended it at a step before its last."""
        self.model.train()
        if self.state.step == 0:  # augmentation draws fixed by (seed, epoch, rank); mid-epoch: the saved state
            self.aug_gen.manual_seed((self.cfg.seed * 1_000_003 + self.state.epoch) * 1_009 + self.dist.rank)
        n = len(self.data.train[1])
        global_batch = self.cfg.batch_size * self.dist.world
        n_steps = n // global_batch if self.dist.world > 1 else math.ceil(n / global_batch)
        bar = tqdm(total=n_steps, initial=self.state.step, desc=f"epoch {self.state.epoch + 1}/{self.cfg.epochs}",
                   leave=False, disable=_hidden(self.progress))
        start = time.perf_counter()
        try:
            for xb, yb in self._batches():
                self._step(xb, yb)
                bar.update(1)
                # every SYNC_EVERY steps, or at once when signalled (one process; several agree at the next look)
                signalled = self.stop_signal and self.dist.world == 1
                if self.state.step % SYNC_EVERY and self.state.step != n_steps and not signalled:
                    continue
                loss_sum, correct, seen = self.state.running.tolist()
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
                if self.board is not None:
                    self.board.flush(self.state.epoch * n_steps + self.state.step, self.opt.param_groups[0]["lr"])
                if self._check():  # a stop signal: stop at this step boundary, resumable exactly
                    self.stopping = True
                    break
        finally:
            bar.close()
        self.state.seconds += time.perf_counter() - start
        return self.state.step >= n_steps

    def _stop(self) -> None:
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal to another process"
        where = (f"checkpoint saved: continue with ekdaa train --resume --out {self.out}" if self.out else
                 "nothing saved (no --out)")
        raise Stopped(f"stopped by {name} at epoch {self.state.epoch + 1} step {self.state.step}; {where}",
                      self.stop_signal or signal.SIGTERM)

    def _step(self, xb: Tensor, yb: Tensor) -> None:
        cfg = self.cfg
        inp = _inputs(self.data.normalizer, xb, cfg.channels_last)
        if cfg.augment:
            inp = augment(inp, self.aug_gen, flip=cfg.dataset == "cifar10")
        loss, correct = (self.graphed or self._train_step)(inp, yb)
        if self.board is not None:
            self.board.step(loss)
        self.state.running[0] += loss.double() * len(yb)  # in place: no host tensor per step
        self.state.running[1] += correct
        self.state.running[2] += len(yb)
        self.state.step += 1

    def _train_step(self, inp: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        """Forward, loss, the rule's backward and the optimizer step on one batch; its mean loss
        and number of correct predictions."""
        graphed = self.graphed is not None  # a graph keeps .grad and never caches autocast's casts
        with _autocast(self.device, self.cfg.amp, cache=not graphed):
            logits = self.net(inp)
            loss = F.cross_entropy(logits.float(), yb)
        self.opt.zero_grad(set_to_none=not graphed)
        loss.backward()
        self.opt.step()
        return loss.detach(), (logits.argmax(1) == yb).sum()

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs``. The first stop signal (``STOP_SIGNALS``: Ctrl-C, SIGTERM, SIGUSR1)
        stops at the next step boundary after writing the checkpoint (then :class:`Stopped`, a
        KeyboardInterrupt); a second one acts at once. train.log says how the run ended."""
        try:
            with self._catch_stop_signals():
                while self.state.epoch < self.cfg.epochs:
                    self._epoch()
                    signalled = self.stopping or self.dist.world == 1 and self.stop_signal
                    if signalled and self.state.epoch < self.cfg.epochs:
                        self._stop()  # signalled in the epoch's last step or its evaluation: after its checkpoint
            summary = self._summary()
            self.export()
            self._record(f"finished: {self.state.epoch} epochs, test accuracy {summary['test_accuracy']}")
            return summary
        except BaseException as err:
            self._record(f"ended: {' '.join(str(err).split()) or type(err).__name__}")
            raise
        finally:
            self.close()

    @contextlib.contextmanager
    def _catch_stop_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.stop_signal = signum
            signal.signal(signum, previous[signum])  # a second one acts at once

        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _epoch(self) -> None:
        """Train one epoch (or its rest), evaluate, log, checkpoint."""
        t0 = self.state.seconds
        if not self.train_epoch():  # a stop signal mid-epoch: save where it stopped
            self.checkpoint()
            self._stop()
        loss_sum, correct, seen = self.dist.all_sum(self.state.running).tolist()
        record = dict(epoch=self.state.epoch + 1, train_loss=loss_sum / seen, train_accuracy=correct / seen,
                      images_per_s=seen / max(self.state.seconds - t0, 1e-9), lr=self.opt.param_groups[0]["lr"])
        record.update(self._evaluate())
        if self.tracker is not None:
            record.update(self.tracker())
        if self.sched is not None:
            self.sched.step()
        self.state.epoch, self.state.step = self.state.epoch + 1, 0
        self.state.running.zero_()
        record["seconds"] = self.state.seconds
        self.history.append(record)
        self.checkpoint()  # first: metrics.jsonl never lists an epoch the checkpoint lacks
        if self._best_on_validation():
            self.checkpoint("checkpoint-best.pt")
        self._write_metrics()
        if self.board is not None:
            self.board.epoch(record)
        self.log(_epoch_line(record, self.cfg.epochs))

    def _evaluate(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for split, pair in (("val", self.data.val), ("test", self.data.test)):
            if pair is None:
                out[f"{split}_loss"] = out[f"{split}_accuracy"] = None
                continue
            loss, acc = evaluate(self.model, *pair, self.data.normalizer, self.cfg.eval_batch_size,
                                 self.cfg.amp, self.cfg.channels_last, self.dist, self.progress, split)
            out[f"{split}_loss"], out[f"{split}_accuracy"] = loss, acc
        return out

    def _write_metrics(self) -> None:
        if self.out is not None and self.dist.is_main:
            write_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def _summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        cfg = self.cfg
        summary = dict(rule=cfg.rule, dataset=cfg.dataset, model=cfg.model, activation=cfg.activation,
                       epochs=self.state.epoch, seed=cfg.seed,
                       train_accuracy=last.get("train_accuracy"), val_accuracy=last.get("val_accuracy"),
                       test_accuracy=last.get("test_accuracy"), train_loss=last.get("train_loss"),
                       test_loss=last.get("test_loss"), images_per_s=last.get("images_per_s"),
                       seconds=self.state.seconds, device=str(self.device), processes=self.dist.world,
                       rule_options={**cfg.rule_options(), **_converted_options(self.model, cfg)})
        if self.out is not None and self.dist.is_main:
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"epoch {r['epoch']}/{epochs}  train loss {fmt(r['train_loss'])} acc {fmt(r['train_accuracy'])}  "
            f"val loss {fmt(r['val_loss'])} acc {fmt(r['val_accuracy'])}  "
            f"test loss {fmt(r['test_loss'])} acc {fmt(r['test_accuracy'])}  "
            f"{r['images_per_s']:.0f} img/s")


@dataclass
class Result:
    """What :func:`train` returns: the run's summary (as in summary.json) and its trained model,
    converted to its rule (``ekdaa.unconvert(result.model)`` is plain PyTorch), which takes inputs
    normalised by ``normalizer``."""

    summary: dict[str, Any]
    model: nn.Module
    normalizer: Normalizer


def train(cfg: TrainConfig, resume: bool = False, **kwargs: Any) -> Result:
    """Train a run to ``cfg.epochs``; its summary and trained model (see :class:`Run`)."""
    run = Run(cfg, resume=resume, **kwargs)
    return Result(run.fit(), run.model, run.data.normalizer)


def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset: str | None = None, data_dir: str | None = None,
                        device: str = "auto", split: str = "test", recompute_bn: int = 0) -> dict[str, Any]:
    """Loss and accuracy of a checkpoint on a split of its (or another) dataset; with
    ``recompute_bn`` > 0, after :func:`recompute_batchnorm` over the first ``recompute_bn``
    training images (the checkpoint file is left as it is)."""
    trained = load_model(checkpoint, device)
    dev = next(trained.model.parameters()).device
    cfg = dataclasses.replace(trained.config, dataset=dataset or trained.config.dataset,
                              data_dir=data_dir or trained.config.data_dir, train_subset=0)
    data = prepare_data(cfg, dev)
    if (data.image_shape, data.num_classes) != (trained.image_shape, trained.num_classes):
        raise TrainError(f"{cfg.dataset} has {data.num_classes} classes of {data.image_shape} images, but the "
                         f"checkpoint's model takes {trained.num_classes} classes of {trained.image_shape}")
    pair = dict(train=data.train, val=data.val, test=data.test)[split]
    if pair is None:
        raise TrainError("split 'val' is empty: the run used val_split=0; use --split test")
    if recompute_bn and not recompute_batchnorm(trained.model, data.train[0][:recompute_bn], trained.normalizer,
                                                cfg.batch_size, cfg.channels_last):
        raise TrainError(f"--recompute-bn: the checkpoint's model ({cfg.model}) has no BatchNorm to recompute")
    loss, acc = evaluate(trained.model, *pair, trained.normalizer, cfg.eval_batch_size, cfg.amp, cfg.channels_last,
                         desc=f"eval {split}")
    return dict(checkpoint=str(checkpoint), dataset=cfg.dataset, split=split, rule=cfg.rule,
                model=cfg.model, accuracy=acc, loss=loss, images=len(pair[1]),
                recompute_bn_images=min(recompute_bn, len(data.train[1])))
