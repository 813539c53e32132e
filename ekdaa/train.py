"""Training: ``train(TrainConfig(...))`` runs a whole experiment and returns its summary and model.

:class:`Run` reads top to bottom in calling order: ``fit`` trains epoch after epoch, an epoch trains its
steps then evaluates, logs and writes the run directory (:class:`ekdaa.rundir.RunDirectory`:
``config.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoint.pt``, ``train.log``, atomically,
at every epoch end and when a stop signal arrives; ``checkpoint-best.pt`` at the best validation
accuracy so far; ``model.pt``, the plain trained model, at the end). ``resume=True`` continues
bit-for-bit from the checkpoint; the directory is locked to the run while it lives.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__, distributed
from .analysis.alignment import Tracker
from .checkpoint import TrainState, load_checkpoint, load_model, train_state
from .config import AMP, MACHINE_FIELDS, OPTIMIZERS, SCHEDULES, Diverged, Stopped, TrainConfig, TrainError, resolve_device
from .data import Normalizer, augment, batches, load_dataset, split_validation
from .evaluation import (Running, _hidden, autocast, chance_loss, evaluate, evaluate_checkpoint, inputs, loss_of,
                         recompute_batchnorm)
from .graphs import GraphedStep, set_capturable
from .models import build_model
from .rules import compile as compile_model
from .rules import convert, param_groups
from .rundir import RunDirectory
from .tensorboard import TensorBoard, summary_writer

__all__ = ["AMP", "MACHINE_FIELDS", "OPTIMIZERS", "SCHEDULES", "Data", "Diverged", "Result", "Run", "Stopped",
           "TrainConfig", "TrainError", "build", "evaluate", "evaluate_checkpoint", "load_checkpoint", "load_model",
           "prepare_data", "recompute_batchnorm", "train"]

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


def stepped(model: nn.Module, dist: distributed.Dist, device: torch.device, compile: bool) -> nn.Module:
    """What a training step calls: the model, under DistributedDataParallel across processes, compiled
    if asked."""
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return compile_model(model) if compile else model


def join_processes(cfg: TrainConfig) -> tuple[torch.device, distributed.Dist]:
    """The run's device and, under torchrun, its process group (one GPU per process)."""
    device = resolve_device(cfg.device)
    dist = distributed.setup(device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        keep_freed_memory()
    if cfg.cuda_graph and (device.type != "cuda" or dist.world > 1 or cfg.compile):
        raise TrainError(f"--cuda-graph needs one CUDA device, no torchrun and no --compile (this run: "
                         f"{device.type}, {dist.world} process(es), compile {cfg.compile}): "
                         "drop --cuda-graph or train on one GPU")
    return device, dist


def environment() -> dict[str, Any]:
    return dict(ekdaa=__version__, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), threads=torch.get_num_threads())


#: Training steps between two looks at the host (progress, divergence, stop signals, TensorBoard)
SYNC_EVERY = 20
#: The last epoch's metrics a run's summary.json holds
SUMMARY_METRICS = ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "test_loss", "images_per_s")


class StopSignals:
    """Ctrl-C's SIGINT, SIGTERM (what schedulers send first) and SIGUSR1 (a requeue) stop a run as one:
    at the next step boundary, after its checkpoint; a second one acts at once. Under torchrun the
    processes agree at their next look (one all-reduce), so all stop at the same step."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self, world: int):
        self.world = world
        self.number = 0  # the signal this process got
        self.agreed = False  # every process knows one of them got one

    @property
    def signalled(self) -> bool:
        """Whether the run stops at this step boundary: one process got a signal, or several agreed."""
        return self.agreed or self.world == 1 and self.number > 0

    def name(self) -> str:
        return signal.Signals(self.number).name if self.number else "a signal to another process"

    @contextlib.contextmanager
    def caught(self) -> Iterator[None]:
        """Handlers installed (in the main thread only), the previous ones put back on exit."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.number = signum
            signal.signal(signum, previous[signum])  # a second one acts at once

        previous = {s: signal.signal(s, handler) for s in self.SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# -- the loop ------------------------------------------------------------------

class Run:
    """One training run; ``fit()`` trains to ``cfg.epochs`` and returns the summary."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool | None = None):
        cfg.validate()
        if cfg.log == "tensorboard":
            summary_writer()  # before anything is written to --out
        self.progress = progress
        self.device, self.dist = join_processes(cfg)
        self.dir = RunDirectory(cfg.out, self.dist.is_main, log)
        self.out, self.log = self.dir.out, self.dir.log
        self.cfg, saved = self.dir.start(cfg, resume, self.device, self.dist.world)
        self.data = prepare_data(self.cfg, self.device)
        self._build(saved)
        self.dir.write_config(self.cfg, environment())
        self.board = (TensorBoard(self.out / "tensorboard", self.device, SYNC_EVERY)
                      if self.cfg.log == "tensorboard" and self.dir.writes else None)
        #: what each epoch adds to its record after training: the evaluation, the look inside if asked
        self.epoch_metrics: list[Callable[[], dict[str, Any]]] = [self._evaluate]
        if self.cfg.track_alignment:
            x, y = self.data.train
            b = self.cfg.batch_size
            self.epoch_metrics.append(Tracker(self.model, (self.data.normalizer(x[:b]), y[:b])))
        self.max_loss = self.cfg.max_loss or 100 * chance_loss(self.data.num_classes)
        self.stops = StopSignals(self.dist.world)
        self.dir.record(f"{'resume' if resume else 'start'} at epoch {self.state.epoch + 1} step {self.state.step}: "
                        f"{self.cfg.rule} on {self.cfg.dataset} ({self.cfg.model}), {self.cfg.epochs} epochs, "
                        f"{self.device}, {self.dist.world} process(es), pid {os.getpid()}")

    def _build(self, saved: dict[str, Any] | None) -> None:
        """Model, optimizer, schedule and state, from the checkpoint ``saved`` when resuming."""
        cfg = self.cfg
        self.model, self.opt, self.sched = build(cfg, self.data, self.device)
        self.net = stepped(self.model, self.dist, self.device, cfg.compile)
        self.aug_gen = torch.Generator(device=self.device)  # reseeded every epoch: see train_epoch
        if len(self.data.train[1]) < cfg.batch_size * self.dist.world:
            raise TrainError(f"{len(self.data.train[1])} training images are fewer than one global batch "
                             f"({self.dist.world} processes x batch {cfg.batch_size}): lower --batch-size")
        self.state = TrainState(running=torch.zeros(3, dtype=torch.float64, device=self.device))
        self.history: list[dict[str, Any]] = []  # one record per epoch done
        if saved is not None:
            self.state = restore(saved, self.model, self.opt, self.sched, self.aug_gen, self.device)
            self.history = self.dir.history(saved, self.state.epoch)
        self.running = Running(self.state.running)  # the epoch's sums, named (views of the state's tensor)
        # on a GPU Adam/AdamW always run capturable (step count and bias corrections on the device), so that a
        # run computes the same with and without --cuda-graph, and one resumed across them continues it;
        # after the restore: a checkpoint's groups may say otherwise
        set_capturable(self.opt, self.device.type == "cuda")
        self.graphed = GraphedStep(self._train_step, self.opt) if cfg.cuda_graph else None

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs``. The first stop signal stops at the next step boundary after writing
        the checkpoint (then :class:`Stopped`, a KeyboardInterrupt); a second one acts at once.
        train.log says how the run ended."""
        try:
            with self.stops.caught():
                while self.state.epoch < self.cfg.epochs:
                    self._epoch()
                    if self.stops.signalled and self.state.epoch < self.cfg.epochs:
                        self._stop()  # signalled in the epoch's last step or its evaluation: after its checkpoint
            summary = self._summary()
            self.dir.export(self.model)
            self.dir.record(f"finished: {self.state.epoch} epochs, test accuracy {summary['test_accuracy']}")
            return summary
        except BaseException as err:
            self.dir.record(f"ended: {' '.join(str(err).split()) or type(err).__name__}")
            raise
        finally:
            self.close()

    def _epoch(self) -> None:
        """Train one epoch (or its rest), evaluate, log, checkpoint."""
        t0 = self.state.seconds
        if not self.train_epoch():  # a stop signal mid-epoch: save where it stopped
            self.checkpoint()
            self._stop()
        loss, accuracy, seen = self.running.totals(self.dist)
        record = dict(epoch=self.state.epoch + 1, train_loss=loss, train_accuracy=accuracy,
                      images_per_s=seen / max(self.state.seconds - t0, 1e-9), lr=self.opt.param_groups[0]["lr"])
        for metrics in self.epoch_metrics:
            record.update(metrics())
        if self.sched is not None:
            self.sched.step()
        self.state.epoch, self.state.step = self.state.epoch + 1, 0
        self.running.sums.zero_()
        record["seconds"] = self.state.seconds
        self.history.append(record)
        self.checkpoint()  # first: metrics.jsonl never lists an epoch the checkpoint lacks
        if self._best_on_validation():
            self.checkpoint("checkpoint-best.pt")
        self.dir.write_metrics(self.history)
        if self.board is not None:
            self.board.epoch(record)
        self.log(_epoch_line(record, self.cfg.epochs))

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
                # the host looks every SYNC_EVERY steps, or at once when signalled (one process; several agree
                # at the next look)
                if self.state.step % SYNC_EVERY and self.state.step != n_steps and not self.stops.signalled:
                    continue
                loss, accuracy, _ = self.running.totals()
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.4f}")
                if self.board is not None:
                    self.board.flush(self.state.epoch * n_steps + self.state.step, self.opt.param_groups[0]["lr"])
                if self._check():  # a stop signal: stop at this step boundary, resumable exactly
                    self.stops.agreed = True
                    break
        finally:
            bar.close()
        self.state.seconds += time.perf_counter() - start
        return self.state.step >= n_steps

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

    def _step(self, xb: Tensor, yb: Tensor) -> None:
        """One training step. No host sync here (a CUDA graph may replay the step): the running sums grow
        on the device, in place; the host reads them every SYNC_EVERY steps."""
        cfg = self.cfg
        inp = inputs(self.data.normalizer, xb, cfg.channels_last)
        if cfg.augment:
            inp = augment(inp, self.aug_gen, flip=cfg.dataset == "cifar10")
        loss, correct = (self.graphed or self._train_step)(inp, yb)
        if self.board is not None:
            self.board.step(loss)
        self.running.add(loss.double() * len(yb), correct, len(yb))
        self.state.step += 1

    def _train_step(self, inp: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        """Forward, loss, the rule's backward and the optimizer step on one batch; its mean loss
        and number of correct predictions."""
        graphed = self.graphed is not None  # a graph keeps .grad and never caches autocast's casts
        with autocast(self.device, self.cfg.amp, cache=not graphed):
            logits = self.net(inp)
            loss = loss_of(logits, yb)
        self.opt.zero_grad(set_to_none=not graphed)
        loss.backward()
        self.opt.step()
        return loss.detach(), (logits.argmax(1) == yb).sum()

    def _check(self) -> bool:
        """Raise :class:`Diverged` if the loss or a parameter is NaN/inf, or the epoch's mean loss has
        passed ``max_loss``, on any process; return whether any process got a stop signal. Every
        process gets the same answers (one all-reduce), so all stop at the same step."""
        loss_sum, seen = self.running.loss, self.running.seen
        nonfinite = torch.stack([~torch.isfinite(loss_sum)]
                                + [~torch.isfinite(p).all() for p in self.model.parameters()])
        flags = torch.stack([nonfinite.any(), loss_sum > self.max_loss * seen,
                             torch.tensor(self.stops.number > 0, device=self.device)]).to(torch.int32)
        nan, exploded, stop = self.dist.all_sum(flags).tolist()
        if nan or exploded:
            why = ("loss or parameters are NaN/inf" if nan else
                   f"the epoch's mean training loss passed --max-loss {self.max_loss:.3g}")
            where = ""
            if self.out and (self.out / "checkpoint.pt").exists():
                where = f" (last good checkpoint: {self.out / 'checkpoint.pt'})"
            elif self.out:
                where = f" in a new --out (no checkpoint was written: {self.out} holds only its config and log)"
            raise Diverged(f"training diverged at epoch {self.state.epoch + 1} step {self.state.step}: {why}; "
                           f"lower --lr (now {self.cfg.lr}){where}")
        return stop > 0

    def _stop(self) -> None:
        where = (f"checkpoint saved: continue with ekdaa train --resume --out {self.out}" if self.out else
                 "nothing saved (no --out)")
        raise Stopped(f"stopped by {self.stops.name()} at epoch {self.state.epoch + 1} step {self.state.step}; "
                      f"{where}", self.stops.number or signal.SIGTERM)

    # -- evaluation and what an epoch leaves ---------------------------------

    def _evaluate(self) -> dict[str, float | None]:
        """Loss and accuracy on the validation split (None without one) and the test set."""
        out: dict[str, float | None] = {}
        for split, pair in (("val", self.data.val), ("test", self.data.test)):
            loss, acc = (None, None) if pair is None else evaluate(
                self.model, *pair, self.data.normalizer, self.cfg.eval_batch_size, self.cfg.amp,
                self.cfg.channels_last, self.dist, self.progress, split)
            out[f"{split}_loss"], out[f"{split}_accuracy"] = loss, acc
        return out

    def _best_on_validation(self) -> bool:
        """Whether the last epoch has the best validation accuracy so far (False without a split)."""
        val = [r["val_accuracy"] for r in self.history]
        return val[-1] is not None and all(val[-1] > v for v in val[:-1] if v is not None)

    def checkpoint(self, name: str = "checkpoint.pt") -> None:
        """Write the run's state to ``name`` in the run directory (main process, with --out)."""
        state = dataclasses.replace(self.state, running=self.state.running.cpu(), world=self.dist.world,
                                    rng=_rng_state(self.aug_gen, self.device))
        self.dir.save(name, self.cfg, state, self.model, self)

    def _summary(self) -> dict[str, Any]:
        last, cfg = self.history[-1] if self.history else {}, self.cfg
        summary = dict(rule=cfg.rule, dataset=cfg.dataset, model=cfg.model, activation=cfg.activation,
                       epochs=self.state.epoch, seed=cfg.seed, **{k: last.get(k) for k in SUMMARY_METRICS},
                       seconds=self.state.seconds, device=str(self.device), processes=self.dist.world,
                       rule_options={k: v for k, v in self.model.ekdaa_rule.options().items()  # auto: as drawn
                                     if k in cfg.rule_options()})
        self.dir.write_summary(summary)
        return summary

    def close(self) -> None:
        """Let go of the run directory (its lock and logs); ``fit`` does this when it returns or fails."""
        if self.board is not None:
            self.board.close()
            self.board = None
        self.dir.close()


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"epoch {r['epoch']}/{epochs}  train loss {fmt(r['train_loss'])} acc {fmt(r['train_accuracy'])}  "
            f"val loss {fmt(r['val_loss'])} acc {fmt(r['val_accuracy'])}  "
            f"test loss {fmt(r['test_loss'])} acc {fmt(r['test_accuracy'])}  "
            f"{r['images_per_s']:.0f} img/s")


def _rng_state(gen: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(saved: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
            gen: torch.Generator, device: torch.device) -> TrainState:
    """Model, optimizer, schedule and random states as a checkpoint has them; its :class:`TrainState`."""
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    if sched is not None and saved["scheduler"] is not None:
        sched.load_state_dict(saved["scheduler"])
    state = train_state(saved)
    state.running = state.running.to(device)
    torch.set_rng_state(state.rng["torch"])
    gen.set_state(state.rng["generator"])
    if "cuda" in state.rng and device.type == "cuda":
        torch.cuda.set_rng_state(state.rng["cuda"], device)
    return state


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
