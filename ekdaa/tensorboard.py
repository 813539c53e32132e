"""``--log tensorboard``: a run's curves as TensorBoard event files in ``OUT/tensorboard/``
(``pip install 'ekdaa[tensorboard]'``; view with ``tensorboard --logdir runs/``).

Per step: the training loss (``train/loss_step``) and learning rate (``train/lr``); per epoch:
every number of the epoch's metrics.jsonl record (``epoch/...``), the alignment angles of each
weight layer (``alignment/<layer>/...``) and Sign layers' flips. Steps' losses wait in a
device buffer and are written at the loop's periodic host sync: logging adds no sync of its
own. metrics.jsonl stays the run's record; these files are for looking.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import TrainError


def summary_writer() -> type:
    """TensorBoard's SummaryWriter, or a one-line error saying how to install it (a run asks before it
    writes anything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--log tensorboard needs the tensorboard package: pip install 'ekdaa[tensorboard]' "
                         "(or pip install tensorboard)") from None
    return SummaryWriter


class TensorBoard:
    """Writes a run's scalars; ``every`` is the most steps between two :meth:`flush` calls."""

    def __init__(self, folder: Path, device: torch.device, every: int):
        self.writer = summary_writer()(str(folder))
        self.losses = torch.zeros(every, device=device)
        self.pending = 0

    def step(self, loss: Tensor) -> None:
        """Keep one step's loss on the device until the next flush."""
        self.losses[self.pending] = loss.detach()
        self.pending += 1

    def flush(self, global_step: int, lr: float) -> None:
        """Write the steps kept since the last flush; ``global_step`` is the last of them."""
        first = global_step - self.pending + 1
        for i, loss in enumerate(self.losses[:self.pending].tolist()):
            self.writer.add_scalar("train/loss_step", loss, first + i)
            self.writer.add_scalar("train/lr", lr, first + i)
        self.pending = 0

    def epoch(self, record: dict[str, Any]) -> None:
        """One epoch's metrics.jsonl record."""
        epoch = record["epoch"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        for layer, angles in record.get("alignment", {}).items():
            for name in ("feedback_angle", "update_angle"):
                if angles.get(name) is not None:
                    self.writer.add_scalar(f"alignment/{layer}/{name}", angles[name], epoch)
        for layer, flips in record.get("sign_flips", {}).items():
            self.writer.add_scalar(f"sign_flips/{layer}", flips, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
