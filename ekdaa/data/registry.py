"""The dataset registry: name -> loader, and load_dataset."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

from .dataset import DataError, ImageDataset
from .store import DataStore

Loader = Callable[..., ImageDataset]

DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator adding a loader, called as loader(store: DataStore, **options), under a name."""

    def add(loader: Loader) -> Loader:
        if name in DATASETS:
            raise DataError(f"dataset {name!r} is already registered (by {DATASETS[name].__qualname__})")
        DATASETS[name] = loader
        return loader

    return add


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    **options: object,
) -> ImageDataset:
    """Load a registered dataset into memory.

    Files are looked for in data_dir/<dataset folder>/ when data_dir is given, else in the
    cache ($EKDAA_DATA, or the user cache dir). A missing file is downloaded into that same
    place when download is True. options go to the loader (e.g. extra=True for "svhn").
    """
    loader = DATASETS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    store = DataStore(data_dir, download)
    try:
        inspect.signature(loader).bind(store, **options)
    except TypeError as err:
        raise DataError(f"dataset {name!r} does not take options {sorted(options)}: {err}") from err
    return loader(store, **options)
