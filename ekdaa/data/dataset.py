"""The in-memory dataset type and the error every data failure raises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


class DataError(Exception):
    """A dataset could not be found, fetched, read or used; the message says how to fix it."""


@dataclass
class ImageDataset:
    """A labelled image dataset held in memory as uint8 (N, C, H, W) tensors."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        self.train_x, self.train_y = self._checked("train", self.train_x, self.train_y)
        self.test_x, self.test_y = self._checked("test", self.test_x, self.test_y)
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(
                f"dataset {self.name!r}: train images are {tuple(self.train_x.shape[1:])} "
                f"but test images are {tuple(self.test_x.shape[1:])}"
            )

    @classmethod
    def from_arrays(
        cls,
        name: str,
        classes: Sequence[str],
        train: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray],
    ) -> ImageDataset:
        """Build from numpy (images, labels) pairs; images uint8 (N, C, H, W), labels integer."""
        (train_x, train_y), (test_x, test_y) = train, test
        return cls(name, _images(train_x), _labels(train_y), _images(test_x), _labels(test_y), tuple(classes))

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image: (C, H, W)."""
        c, h, w = self.train_x.shape[1:]
        return c, h, w

    def _checked(self, split: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate one split and return it contiguous."""
        where = f"dataset {self.name!r}, {split} split"
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise DataError(f"{where}: images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise DataError(
                f"{where}: labels must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DataError(
                f"{where}: labels span {int(y.min())}..{int(y.max())}, outside 0..{self.num_classes - 1}"
            )
        return x.contiguous(), y.contiguous()


def _images(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(array, requirements=("C", "W")))


def _labels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(array.reshape(-1), np.int64, requirements=("C", "W")))
