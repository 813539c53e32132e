"""Finding dataset files on disk and downloading the missing ones."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from .dataset import DataError

T = TypeVar("T")

CACHE_ENV = "EKDAA_DATA"


@dataclass(frozen=True)
class RemoteFile:
    """A dataset file: its folder and name in a data directory, official URL and md5."""

    folder: str
    name: str
    url: str
    md5: str


def one_line(err: BaseException) -> str:
    """An exception's message with its whitespace (newlines included) collapsed."""
    return " ".join(str(err).split()) or type(err).__name__


@contextmanager
def fix_hint(url: str) -> Iterator[None]:
    """Append 'replace it from URL' to any DataError raised inside."""
    try:
        yield
    except DataError as err:
        raise DataError(f"{err}; replace it with the official file from {url}") from err


def _pooch(needed_for: str) -> ModuleType:
    """pooch, imported where a file is downloaded or the user cache is looked up, not before: a machine
    without it trains on data it already has."""
    try:
        import pooch
    except ImportError:
        raise DataError(f"{needed_for} needs the package pooch, which is not installed: pip install pooch, "
                        "or pass --data-dir pointing at a folder that holds the dataset's files") from None
    return pooch


def default_data_dir() -> Path:
    """The cache: $EKDAA_DATA if set, else the user cache dir (e.g. ~/.cache/ekdaa)."""
    return Path(os.environ.get(CACHE_ENV) or _pooch("finding the user cache folder").os_cache("ekdaa"))


class DataStore:
    """A data directory holding one folder per dataset; downloads missing files into it if allowed."""

    def __init__(self, root: str | os.PathLike | None = None, download: bool = True) -> None:
        self._root = Path(root) if root is not None else None
        self.download = download

    @property
    def root(self) -> Path:
        """The data directory (the cache, looked up when first needed, if none was given)."""
        if self._root is None:
            self._root = default_data_dir()
        return self._root

    def path(self, folder: str, name: str) -> Path:
        """Where a file of a dataset folder lives (it may not exist). A data directory that is the
        dataset's folder itself (``--data-dir .../fashion-mnist``) is taken as that folder."""
        if self.root.name == folder and not (self.root / folder).exists():
            return self.root / name
        return self.root / folder / name

    def fetch(self, remote: RemoteFile, alternative: Path | None = None) -> Path:
        """Path to the file, downloading it first if missing and downloads are allowed."""
        path = self.path(remote.folder, remote.name)
        if path.is_file():
            return path
        if not self.download:
            also = f" (nor the extracted folder {alternative})" if alternative else ""
            raise DataError(
                f"{path}: file not found{also}; download it from {remote.url} "
                f"and put it there, or allow downloads (--data-dir is the folder that holds {remote.folder}/)"
            )
        return self._download(remote, path)

    def load(self, remote: RemoteFile, parse: Callable[[Path], T]) -> T:
        """Fetch a file and parse it; a parse error also says where to get a good copy."""
        path = self.fetch(remote)
        with fix_hint(remote.url):
            return parse(path)

    @staticmethod
    def _download(remote: RemoteFile, path: Path) -> Path:
        pooch = _pooch(f"downloading {remote.url}")
        created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # innermost first
        try:
            pooch.retrieve(
                remote.url,
                known_hash=f"md5:{remote.md5}",
                fname=remote.name,
                path=path.parent,
                progressbar=True,
            )
        except (ValueError, OSError) as err:
            for folder in created:  # leave no empty folder behind, --data-dir included
                with suppress(OSError):
                    folder.rmdir()
            if isinstance(err, ValueError):  # pooch's checksum mismatch (the bad download is deleted)
                raise DataError(
                    f"{path}: the download from {remote.url} failed its checksum ({one_line(err)}); "
                    "retry, or put a verified copy there"
                ) from err
            raise DataError(  # network (requests' errors are OSErrors) or file system
                f"cannot download {remote.url}: {one_line(err)}; put the file at {path} "
                "or pass --data-dir pointing at a folder that holds it"
            ) from err
        return path
