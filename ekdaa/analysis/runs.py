"""Run directories as analysis sees them.

A converted model's backward is its rule's, not autograd's. True gradients (the backprop
reference of :func:`~ekdaa.analysis.alignment` and the input gradients of white-box attacks)
come from its plain twin, :func:`ekdaa.unconvert`: the same network, the same weights.
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import TrainedModel, load_model, read_metrics
from ..config import TrainConfig, TrainError, resolve_device
from ..data import Normalizer, load_dataset
from ..rules import unconvert



def rng_preserved(device: torch.device) -> AbstractContextManager[None]:
    """Restores torch's global RNG state (and ``device``'s, if CUDA) on exit."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def copy_weights(plain: nn.Module, converted: nn.Module) -> nn.Module:
    """Load ``converted``'s weights into ``plain``, its unconverted twin: feedback tensors are
    dropped, everything else must match exactly. Returns ``plain``."""
    try:
        plain.load_state_dict(unconvert(converted).state_dict())
    except RuntimeError as err:
        raise ValueError("the plain reference model does not match the converted model: "
                         f"{' '.join(str(err).split())[:300]}") from err
    return plain


class RunDir:
    """A run directory written by ``ekdaa train --out``; the checkpoint is loaded on first use."""

    def __init__(self, path: str | Path, device: str = "auto"):
        self.path = Path(path)
        if not (self.path / "checkpoint.pt").is_file():
            raise TrainError(f"{self.path} is not a run directory: it has no checkpoint.pt "
                             "(write one with ekdaa train --out DIR)")
        self.device = resolve_device(device)
        self.key = os.path.abspath(self.path)
        self.name = Path(self.key).name  # a symlink keeps its own name

    @property
    def cfg(self) -> TrainConfig:
        """The run's config, from its checkpoint (config.json is for people)."""
        return self._loaded.config

    @property
    def label(self) -> str:
        """'name (rule)', for titles and legends."""
        return f"{self.name} ({self.cfg.rule})"

    @cached_property
    def metrics(self) -> list[dict[str, Any]]:
        """One record per epoch from metrics.jsonl (empty if there is none)."""
        return read_metrics(self.path / "metrics.jsonl")

    @cached_property
    def _loaded(self) -> TrainedModel:
        return load_model(self.path / "checkpoint.pt", str(self.device))

    @property
    def model(self) -> nn.Module:
        """The trained model, converted to its rule, in eval mode."""
        return self._loaded.model

    @property
    def normalizer(self) -> Normalizer:
        return self._loaded.normalizer

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._loaded.image_shape

    def plain(self) -> nn.Module:
        """The model unconverted (autograd backward), same weights, eval mode."""
        return unconvert(self.model).eval()

    def test_images(self, samples: int = 0, data_dir: str | None = None) -> tuple[Tensor, Tensor, tuple[str, ...]]:
        """The first ``samples`` test images (0: all) as uint8 on the device, labels, class names."""
        ds = load_dataset(self.cfg.dataset, data_dir or self.cfg.data_dir, download=self.cfg.download,
                          **self.cfg.dataset_options())
        n = samples or len(ds.test_y)
        return ds.test_x[:n].to(self.device), ds.test_y[:n].to(self.device), ds.classes
