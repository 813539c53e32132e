"""The dataset registry: name -> loader, and load_dataset; ``folder:PATH`` names a folder of
your own images (:mod:`ekdaa.data.folder`)."""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from .dataset import DataError, ImageDataset
from .folder import folder_label, is_folder, load_folder
from .folder import missing as folder_missing
from .store import DataStore

Loader = Callable[..., ImageDataset]
#: The files a dataset reads, as groups of alternatives (one present path per group suffices).
Files = Callable[[DataStore], list[tuple[Path, ...]]]

DATASETS: dict[str, Loader] = {}
DATASET_FILES: dict[str, Files] = {}
#: Where a dataset's missing files download from (an URL of its host).
DATASET_SOURCES: dict[str, str] = {}


def register_dataset(name: str, files: Files | None = None, source: str | None = None) -> Callable[[Loader], Loader]:
    """Decorator adding a loader, called as loader(store: DataStore, **options), under a name;
    ``files(store)`` lists what it reads (none: it reads no file), so presence can be checked
    without loading; ``source`` is the URL it downloads from, if any."""

    def add(loader: Loader) -> Loader:
        if name in DATASETS:
            raise DataError(f"dataset {name!r} is already registered (by {DATASETS[name].__qualname__})")
        DATASETS[name] = loader
        DATASET_FILES[name] = files or (lambda store: [])
        if source:
            DATASET_SOURCES[name] = source
        return loader

    return add


class _Names:
    """The dataset names a run may take: every registered one, and ``folder:PATH``."""

    def __contains__(self, name: object) -> bool:
        return name in DATASETS or isinstance(name, str) and is_folder(name)

    def __iter__(self):
        return iter([*DATASETS, "folder:PATH"])


DATASET_NAMES = _Names()


def dataset_label(name: str) -> str:
    """A dataset's name as a file name (``folder:PATH`` has slashes): for results/<suite>/<label>/."""
    return folder_label(name) if is_folder(name) else name


def missing_files(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """Which of a dataset's files are absent (None: all there), looking only at the file system."""
    if is_folder(name):
        return folder_missing(name)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    absent = [group for group in DATASET_FILES[name](DataStore(data_dir)) if not any(p.exists() for p in group)]
    if not absent:
        return None
    return "; ".join(" or ".join(map(str, group)) for group in absent) + " not found"


def reachable(name: str, timeout: float = 3.0) -> bool:
    """Whether the host a dataset downloads from answers a connection (False without a source)."""
    url = urlsplit(DATASET_SOURCES.get(name, ""))
    if not url.hostname:
        return False
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


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
    ``folder:PATH`` reads your own images from PATH (option ``image_size``; no download).
    """
    if is_folder(name):
        unknown = sorted(set(options) - {"image_size"})
        if unknown:
            raise DataError(f"folder datasets take only the option image_size, not {unknown}")
        return load_folder(name, **options)  # type: ignore[arg-type]
    loader = DATASETS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    store = DataStore(data_dir, download)
    try:
        inspect.signature(loader).bind(store, **options)
    except TypeError as err:
        raise DataError(f"dataset {name!r} does not take options {sorted(options)}: {err}") from err
    return loader(store, **options)
