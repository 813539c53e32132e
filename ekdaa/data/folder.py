"""Your own images: ``folder:PATH``, one sub-folder of images per class.

Either ``PATH/train/<class>/`` and ``PATH/test/<class>/``, or ``PATH/<class>/`` alone, whose
images are then split once, by a fixed permutation, into 80 % train and 20 % test. PNG, JPEG,
BMP, GIF and WebP are read with Pillow; greyscale images stay one channel when all of them are,
else every image is RGB. Images must share one size unless ``image_size`` resizes them (square,
bilinear). Decoded once, the images are cached as uint8 arrays in ``PATH/.ekdaa-cache/`` (or,
where PATH is read-only, in the user cache), keyed by the file list, sizes and modification
times: a change to any image decodes them again.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from .dataset import DataError, ImageDataset
from .store import default_data_dir

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TEST_FRACTION = 0.2
#: Bumped when what the cache holds changes.
CACHE_VERSION = 1


def is_folder(name: str) -> bool:
    """Whether a dataset name is ``folder:PATH``."""
    return isinstance(name, str) and name.startswith(PREFIX) and len(name) > len(PREFIX)


def folder_path(name: str) -> Path:
    return Path(name[len(PREFIX):]).expanduser()


def folder_label(name: str) -> str:
    """A file-name-safe label for ``folder:PATH`` (results/<suite>/<label>/): the folder's name and a
    hash of its absolute path."""
    path = folder_path(name).resolve()
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.name) or "root"
    return f"folder-{safe}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def missing(name: str) -> str | None:
    """Why ``folder:PATH`` cannot be read, looking only at the file system (None: it can be tried)."""
    path = folder_path(name)
    return None if path.is_dir() else f"{path} not found (folder:PATH needs a folder of class sub-folders)"


def _classes(folder: Path) -> dict[str, list[Path]]:
    """Images per class sub-folder of ``folder``, sorted."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[sub.name] = sorted(p for p in sub.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not any(classes.values()):
        raise DataError(f"{folder}: no class sub-folders with images ({', '.join(EXTENSIONS)}): put each class's "
                        "images in a folder of its own, e.g. PATH/cat/1.png")
    empty = [name for name, images in classes.items() if not images]
    if empty:
        raise DataError(f"{folder / empty[0]}: a class folder without images ({', '.join(EXTENSIONS)}): add its "
                        "images or remove the folder")
    return classes


def _layout(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]] | None]:
    """Class names and (file, label) lists of train and test (None: split here)."""
    if not root.is_dir():
        raise DataError(f"{root} not found: folder:PATH needs a folder of class sub-folders (or train/ and test/)")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split else root
    train = _classes(train_root)
    names = list(train)
    if len(names) < 2:
        raise DataError(f"{train_root}: one class ({names[0]}): a classifier needs at least two class sub-folders "
                        "with images")
    labelled = [(p, names.index(c)) for c in names for p in train[c]]
    if not split:
        return names, labelled, None
    test = _classes(root / "test")
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise DataError(f"{root / 'test'}: classes {unknown} have no training images in {train_root}")
    return names, labelled, [(p, names.index(c)) for c in test for p in test[c]]


def _key(train: list[tuple[Path, int]], test: list[tuple[Path, int]], image_size: int) -> str:
    """The cache's name: a hash of the splits' files (paths, labels, sizes, modification times)."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, image_size, len(train)]).encode())
    for path, label in train + test:
        stat = path.stat()
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _decode(files: list[tuple[Path, int]], image_size: int) -> np.ndarray:
    """uint8 (N, C, H, W) images of ``files``, one channel if all are greyscale, else RGB."""
    from PIL import Image, UnidentifiedImageError
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as img:
                img.load()
                images.append(img.copy())
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"{path}: not a readable image ({err}): remove or replace it") from None
    grey = all(img.mode in ("1", "L", "LA", "I", "I;16", "F") for img in images)
    if not image_size:
        sizes = Counter(img.size for img in images)
        (w, h), _ = sizes.most_common(1)[0]
        odd = next(((path, img.size) for (path, _), img in zip(files, images) if img.size != (w, h)), None)
        if odd:
            raise DataError(f"{odd[0]} is {odd[1][0]}x{odd[1][1]}, most images {w}x{h}: pass --image-size N to "
                            "resize every image to N x N")
    arrays = []
    for img in images:
        img = img.convert("L" if grey else "RGB")
        if image_size:
            img = img.resize((image_size, image_size), Image.BILINEAR)
        a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[None] if grey else a.transpose(2, 0, 1))
    return np.stack(arrays)


def _cache_path(root: Path, key: str) -> Path:
    local = root / ".ekdaa-cache"
    if os.access(root, os.W_OK) and (not local.exists() or os.access(local, os.W_OK)):
        return local / f"{key}.npz"
    return default_data_dir() / "folders" / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}" \
        / f"{key}.npz"


def _read_cache(path: Path, n_train: int, n_test: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if the file is absent or does not hold what it should."""
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("train_x", "test_x")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    ok = (arrays["train_x"].dtype == np.uint8 and arrays["train_x"].ndim == 4 and len(arrays["train_x"]) == n_train
          and len(arrays["test_x"]) == n_test and arrays["test_x"].shape[1:] == arrays["train_x"].shape[1:])
    return arrays if ok else None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically; a cache that cannot be written is skipped (the images decode again next time)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def load_folder(name: str, image_size: int = 0) -> ImageDataset:
    """The ``folder:PATH`` dataset (see the module docstring)."""
    if image_size < 0:
        raise DataError(f"image_size must be >= 0, got {image_size}")
    root = folder_path(name)
    classes, train, test = _layout(root)
    if test is None:  # one fixed split: the same whatever the run's seed
        order = np.random.default_rng(0).permutation(len(train))
        n_test = max(1, round(TEST_FRACTION * len(train)))
        if len(train) - n_test < 1:
            raise DataError(f"{root}: {len(train)} image(s) cannot be split into train and test; add images")
        test, train = [train[i] for i in order[:n_test]], [train[i] for i in order[n_test:]]
    path = _cache_path(root, _key(train, test, image_size))
    arrays = _read_cache(path, len(train), len(test))
    if arrays is None:
        images = _decode(train + test, image_size)
        arrays = dict(train_x=images[:len(train)], test_x=images[len(train):])
        _write_cache(path, arrays)
    labels = lambda files: np.array([label for _, label in files], dtype=np.int64)  # noqa: E731
    return ImageDataset.from_arrays(name, classes, (arrays["train_x"], labels(train)),
                                    (arrays["test_x"], labels(test)))
