"""Working with in-memory uint8 images: validation split, batching, augmentation, normalization."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .dataset import DataError

Pair = tuple[torch.Tensor, torch.Tensor]

NORMALIZATIONS = ("half", "standard")
_STATS_CHUNK = 4096  # images per chunk when computing channel statistics


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> int:
    if len(x) != len(y):
        raise DataError(f"{len(x)} images but {len(y)} labels")
    return len(x)


def split_validation(
    train_x: torch.Tensor, train_y: torch.Tensor, n_val: int, seed: int
) -> tuple[Pair, Pair]:
    """Hold out n_val random training samples, fixed by seed: ((x_train, y_train), (x_val, y_val)).

    Both parts keep the original order of the samples.
    """
    n = _check_pair(train_x, train_y)
    if not 0 <= n_val < n:
        raise DataError(f"n_val={n_val} must lie in 0..{n - 1}: the training set holds {n} samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    val, keep = order[:n_val].sort().values, order[n_val:].sort().values
    return (train_x[keep], train_y[keep]), (train_x[val], train_y[val])


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[Pair]:
    """One epoch of (x_batch, y_batch), sliced from the in-memory tensors.

    With shuffle, the order is one permutation drawn from generator now (the global RNG if None).
    """
    n = _check_pair(x, y)
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    stop = n - n % batch_size if drop_last else n
    if not shuffle:
        return ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, stop, batch_size))
    device = generator.device if generator is not None else "cpu"
    order = torch.randperm(n, generator=generator, device=device).to(x.device)
    return ((x[idx], y[idx]) for idx in order[:stop].split(batch_size))


def _randint(high: int, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n integers in [0, high), drawn on the generator's device and moved to device."""
    return torch.randint(high, (n,), generator=generator, device=generator.device).to(device)


def augment(
    x: torch.Tensor, generator: torch.Generator, crop_padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, per sample, on x's device.

    x is a (B, C, H, W) batch of any dtype; the result has the same shape and dtype.
    """
    if x.dim() != 4 or crop_padding < 0:
        raise DataError(
            f"augment needs a (B, C, H, W) batch and crop_padding >= 0, "
            f"got shape {tuple(x.shape)} and crop_padding {crop_padding}"
        )
    b, c, h, w = x.shape
    pad = crop_padding
    rows = _randint(2 * pad + 1, b, generator, x.device)[:, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flip:
        mirrored = _randint(2, b, generator, x.device).bool()[:, None]
        cols = torch.where(mirrored, cols.flip(1), cols)
    cols = cols + _randint(2 * pad + 1, b, generator, x.device)[:, None]
    index = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]  # into each flattened padded image
    padded = F.pad(x, (pad, pad, pad, pad)).flatten(2)
    return padded.gather(2, index.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


def _channel_stats(train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of a uint8 (N, C, H, W) tensor, in pixel units."""
    if train_x.dtype != torch.uint8 or train_x.dim() != 4 or len(train_x) == 0:
        raise DataError(
            "standard normalization needs non-empty uint8 (N, C, H, W) images, "
            f"got {train_x.dtype} {tuple(train_x.shape)}"
        )
    total = torch.zeros(train_x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in train_x.split(_STATS_CHUNK):
        values = chunk.to(torch.float64)
        total += values.sum((0, 2, 3)).cpu()
        squares += values.square().sum((0, 2, 3)).cpu()
    count = train_x.numel() // train_x.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return mean.float(), std.float()


class Normalizer:
    """Turns uint8 images into floats as (x - mean) / std, with mean and std per channel in pixel units.

    "half" maps 0..255 to [-0.5, 0.5] (x/255 - 0.5); "standard" uses the channel mean and std of train_x.
    """

    def __init__(self, kind: str, train_x: torch.Tensor | None = None) -> None:
        if kind != "standard":
            mean, std = torch.tensor([127.5]), torch.tensor([255.0])
        elif train_x is None:
            raise DataError("standard normalization needs train_x to compute its channel statistics")
        else:
            mean, std = _channel_stats(train_x)
        self._set(kind, mean, std)

    def _set(self, kind: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        if kind not in NORMALIZATIONS:
            raise DataError(f"unknown normalization {kind!r}; choose one of: {', '.join(NORMALIZATIONS)}")
        if mean.dim() != 1 or mean.shape != std.shape or not bool((std > 0).all()):
            raise DataError(f"normalization {kind!r} needs 1-D mean and std of one length with std > 0")
        self.kind, self.mean, self.std = kind, mean, std

    def __call__(self, x_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalize a uint8 (..., C, H, W) tensor on any device, computing in at least float32."""
        if x_uint8.dtype != torch.uint8:
            raise DataError(f"Normalizer expects uint8 images, got {x_uint8.dtype}")
        work = torch.promote_types(dtype, torch.float32)
        mean = self.mean.to(x_uint8.device, work).view(-1, 1, 1)
        std = self.std.to(x_uint8.device, work).view(-1, 1, 1)
        return x_uint8.to(work).sub_(mean).div_(std).to(dtype)

    def to(self, device: torch.device | str) -> Normalizer:
        """Move mean and std to device (so calls there copy nothing); returns self."""
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (kind, mean, std) for checkpoints."""
        return {"kind": self.kind, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Normalizer:
        """Rebuild a Normalizer from state_dict() output."""
        try:
            kind, mean, std = state["kind"], torch.tensor(state["mean"]), torch.tensor(state["std"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"bad normalizer state {dict(state)!r}: {err}") from err
        normalizer = cls.__new__(cls)
        normalizer._set(kind, mean.float(), std.float())
        return normalizer

    def __repr__(self) -> str:
        return f"Normalizer({self.kind!r}, mean={self.mean.tolist()}, std={self.std.tolist()})"
