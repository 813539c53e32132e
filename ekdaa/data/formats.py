"""Parsers for the official file formats: IDX (gzip), CIFAR binary records, SVHN .mat."""

from __future__ import annotations

import gzip
import struct
import tarfile
import zlib
from collections.abc import Collection
from pathlib import Path

import numpy as np

from .dataset import DataError
from .store import one_line

IDX_MAGIC = {"images": 2051, "labels": 2049}  # unsigned bytes, 3 and 1 dimensions
CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE


def check_range(labels: np.ndarray, low: int, high: int, source: object) -> None:
    """Raise DataError unless every label lies in low..high."""
    outside = labels[(labels < low) | (labels > high)]
    if outside.size:
        raise DataError(f"{source}: label {outside[0]} is outside {low}..{high}")


def gunzip(path: Path) -> bytes:
    """The decompressed content of a gzip file."""
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated gzip file ({one_line(err)})") from err


def read_idx(path: Path, kind: str) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes ('images' or 'labels'), checked against its header."""
    raw = gunzip(path)
    magic = IDX_MAGIC[kind]
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise DataError(f"{path}: magic number {found} is not {magic}, so this is not an IDX {kind} file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated: {len(raw)} bytes once decompressed, less than its {header}-byte header"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "too long"
        raise DataError(
            f"{path}: {state}: its header (dims {dims}) needs {expected} bytes once decompressed, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def parse_cifar_records(blob: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records (label byte + R, G, B planes) as (N, 3, 32, 32) images and labels."""
    if not blob or len(blob) % CIFAR_RECORD:
        raise DataError(
            f"{source}: {len(blob)} bytes is not a whole number of {CIFAR_RECORD}-byte records, "
            "so the file is truncated or corrupt"
        )
    records = np.frombuffer(blob, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0]
    check_range(labels, 0, 9, source)
    return records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE), labels


def read_tar_members(path: Path, names: Collection[str]) -> dict[str, bytes]:
    """The contents of those of the named members that a .tar.gz archive holds."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            return {m.name: _member_bytes(path, tar, m) for m in tar if m.name in names}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated .tar.gz archive ({one_line(err)})") from err


def _member_bytes(path: Path, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = tar.extractfile(member)
    if stream is None:
        raise DataError(f"{path}: member {member.name} is not a regular file")
    with stream:
        return stream.read()


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN cropped-digits .mat file as (N, 3, 32, 32) images and labels 0..9 (10 -> 0)."""
    try:
        import scipy.io  # on first use: the command line starts without it
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as err:  # scipy's parser fails on damaged input with many error types
        raise DataError(f"{path}: not a readable MATLAB .mat file ({one_line(err)})") from err
    missing = sorted({"X", "y"} - mat.keys())
    if missing:
        raise DataError(f"{path}: variable(s) {missing} missing; expected X (32x32x3xN uint8) and y (Nx1)")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.shape[:3] != (32, 32, 3) or x.ndim != 4:
        raise DataError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 of shape (32, 32, 3, N)")
    if not np.issubdtype(y.dtype, np.integer) or y.shape not in ((x.shape[3], 1), (x.shape[3],)):
        raise DataError(f"{path}: y is {y.dtype} {y.shape}, expected integers of shape ({x.shape[3]}, 1)")
    labels = y.reshape(-1).astype(np.int64)
    check_range(labels, 1, 10, path)
    return x.transpose(3, 2, 0, 1), labels % 10
