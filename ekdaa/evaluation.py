"""The loss, and how a model is evaluated: on a split in batches (:func:`evaluate`), from a checkpoint
(:func:`evaluate_checkpoint`), after recomputing its BatchNorm statistics (:func:`recompute_batchnorm`).
The sums a split's evaluation and an epoch's training add up are :class:`Running`."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import load_model
from .config import TrainError
from .data import Normalizer, batches
from .layers import tracks_statistics


def loss_of(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """The loss every run trains, evaluates and watches for divergence: cross-entropy, in float32."""
    return F.cross_entropy(logits.float(), y, reduction=reduction)


def chance_loss(num_classes: int) -> float:
    """The loss of a uniform guess over ``num_classes`` classes, ln(classes)."""
    return math.log(num_classes)


class Running:
    """The sums of an epoch's (or a split's) batches on the device: the loss (times the batch's size),
    the correct predictions, the images seen. One tensor, so that one all-reduce combines the processes'
    and a checkpoint keeps it as it is; the fields are views of it, added to in place (no host sync)."""

    def __init__(self, sums: Tensor | None = None, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device) if sums is None else sums
        self.loss, self.correct, self.seen = self.sums.unbind()

    def add(self, loss_sum: Tensor, correct: Tensor, n: int) -> None:
        """One batch: its summed loss, its number of correct predictions, its size."""
        self.loss += loss_sum
        self.correct += correct
        self.seen += n

    def totals(self, dist: distributed.Dist = distributed.Dist()) -> tuple[float, float, float]:
        """Mean loss, accuracy and images seen, over every process (a host sync)."""
        loss, correct, seen = dist.all_sum(self.sums).tolist()
        return loss / max(seen, 1), correct / max(seen, 1), seen


def _hidden(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` choice (None: tqdm decides, shown on a terminal)."""
    return None if progress is None else not progress


def inputs(normalizer: Normalizer, xb: Tensor, channels_last: bool) -> Tensor:
    """A uint8 batch as the model takes it."""
    inp = normalizer(xb)
    return inp.contiguous(memory_format=torch.channels_last) if channels_last else inp


def autocast(device: torch.device, amp: str, cache: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16", cache_enabled=cache)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, normalizer: Normalizer, batch_size: int = 1000,
             amp: str = "none", channels_last: bool = False,
             dist: distributed.Dist = distributed.Dist(), progress: bool | None = None,
             desc: str = "eval") -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on uint8 images ``x`` (each rank evaluates every
    ``dist.world``-th image; the sums are combined). ``progress``: a progress bar (None: when the
    output is a terminal)."""
    was_training = model.training
    model.eval()
    running = Running(device=x.device)
    x, y = x[dist.rank::dist.world], y[dist.rank::dist.world]
    bar = tqdm(batches(x, y, batch_size, shuffle=False, generator=None), total=math.ceil(len(y) / batch_size),
               desc=desc, leave=False, disable=_hidden(progress) if dist.is_main else True)
    for xb, yb in bar:
        with autocast(x.device, amp):
            logits = model(inputs(normalizer, xb, channels_last))
        running.add(loss_of(logits, yb, "sum"), (logits.argmax(1) == yb).sum(), len(yb))
    model.train(was_training)
    loss, accuracy, _ = running.totals(dist)
    return loss, accuracy


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
        model(inputs(normalizer, x[start:start + batch_size], channels_last))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(norms)


def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset: str | None = None, data_dir: str | None = None,
                        device: str = "auto", split: str = "test", recompute_bn: int = 0) -> dict[str, Any]:
    """Loss and accuracy of a checkpoint on a split of its (or another) dataset; with
    ``recompute_bn`` > 0, after :func:`recompute_batchnorm` over the first ``recompute_bn``
    training images (the checkpoint file is left as it is)."""
    from .train import prepare_data
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
