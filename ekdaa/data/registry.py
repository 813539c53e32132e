"""The dataset registry: name -> loader, and load_dataset."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

from .dataset import DataError, ImageDataset
from .store import DataStore

Loader = Callable[..., ImageDataset]
#: The files a dataset reads, as groups of alternatives (one present path per group suffices).
Files = Callable[[DataStore], list[tuple[Path, ...]]]

DATASETS: dict[str, Loader] = {}
DATASET_FILES: dict[str, Files] = {}


def register_dataset(name: str, files: Files | None = None) -> Callable[[Loader], Loader]:
    """Decorator adding a loader, called as loader(store: DataStore, **options), under a name;
    ``files(store)`` lists what it reads (none: it reads no file), so presence can be checked
    without loading."""

    def add(loader: Loader) -> Loader:
        if name in DATASETS:
            raise DataError(f"dataset {name!r} is already registered (by {DATASETS[name].__qualname__})")
        DATASETS[name] = loader
        DATASET_FILES[name] = files or (lambda store: [])
        return loader

    return add


def missing_files(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """Which of a dataset's files are absent (None: all there), looking only at the file system."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    absent = [group for group in DATASET_FILES[name](DataStore(data_dir)) if not any(p.exists() for p in group)]
    if not absent:
        return None
    return "; ".join(" or ".join(map(str, group)) for group in absent) + " not found"


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
