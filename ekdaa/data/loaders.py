"""Loaders of the registered datasets, each reading the official distribution format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .dataset import DataError, ImageDataset
from .formats import check_range, parse_cifar_records, read_idx, read_svhn_mat, read_tar_members
from .registry import register_dataset
from .store import DataStore, RemoteFile, fix_hint

Split = tuple[np.ndarray, np.ndarray]
DIGIT_NAMES = tuple(str(d) for d in range(10))

FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_TAR = RemoteFile("cifar-10", "cifar-10-binary.tar.gz", CIFAR_URL, "c32a1d4ab5d03f1284b67883e8d87530")
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_META = "batches.meta.txt"
CIFAR_FILES = (*CIFAR_TRAIN, CIFAR_TEST, CIFAR_META)
CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_MD5 = {
    "train": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test": "eb5a983be6a315427106f1b164d9cef3",
    "extra": "a93ce644f1a588dc4d68dda5feec44a7",
}

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _fashion_file(name: str) -> RemoteFile:
    return RemoteFile("fashion-mnist", name, FASHION_URL + name, FASHION_MD5[name])


def _fashion_images(path: Path) -> np.ndarray:
    images = read_idx(path, "images")
    if images.shape[1:] != (28, 28):
        raise DataError(f"{path}: images are {images.shape[1:]}, expected 28x28")
    return images[:, None]


def _fashion_labels(path: Path) -> np.ndarray:
    labels = read_idx(path, "labels")
    check_range(labels, 0, 9, path)
    return labels


def _fashion_split(store: DataStore, prefix: str) -> Split:
    images_file = _fashion_file(f"{prefix}-images-idx3-ubyte.gz")
    labels_file = _fashion_file(f"{prefix}-labels-idx1-ubyte.gz")
    images = store.load(images_file, _fashion_images)
    labels = store.load(labels_file, _fashion_labels)
    if len(images) != len(labels):
        raise DataError(
            f"{store.path(images_file.folder, images_file.name)} holds {len(images)} images but "
            f"{store.path(labels_file.folder, labels_file.name)} holds {len(labels)} labels"
        )
    return images, labels


def _fashion_files(store: DataStore) -> list[tuple[Path, ...]]:
    return [(store.path("fashion-mnist", name),) for name in FASHION_MD5]


@register_dataset("fashion-mnist", files=_fashion_files, source=FASHION_URL)
def load_fashion_mnist(store: DataStore) -> ImageDataset:
    """Fashion-MNIST: 60,000 + 10,000 grey 28x28 images, official IDX files."""
    train, test = _fashion_split(store, "train"), _fashion_split(store, "t10k")
    return ImageDataset.from_arrays("fashion-mnist", FASHION_CLASSES, train, test)


def _cifar_blobs(store: DataStore) -> tuple[str, dict[str, bytes]]:
    """Where the CIFAR-10 files were read from and their contents, from the folder or the archive."""
    folder = store.path(CIFAR_TAR.folder, CIFAR_DIR)
    if folder.is_dir():
        return str(folder), {n: (folder / n).read_bytes() for n in CIFAR_FILES if (folder / n).is_file()}
    archive = store.fetch(CIFAR_TAR, alternative=folder)
    members = read_tar_members(archive, {f"{CIFAR_DIR}/{n}" for n in CIFAR_FILES})
    return f"{archive}:{CIFAR_DIR}", {name.split("/")[-1]: blob for name, blob in members.items()}


def _cifar_classes(meta: bytes | None, source: str) -> tuple[str, ...]:
    if meta is None:
        return CIFAR_CLASSES
    names = tuple(line.strip() for line in meta.decode("utf-8", "replace").splitlines() if line.strip())
    if len(names) != len(CIFAR_CLASSES):
        raise DataError(f"{source}: {len(names)} class names, expected {len(CIFAR_CLASSES)}")
    return names


def _cifar_batches(blobs: dict[str, bytes], names: tuple[str, ...], source: str) -> Split:
    missing = [name for name in names if name not in blobs]
    if missing:
        raise DataError(f"{source}: missing {', '.join(missing)}")
    parts = [parse_cifar_records(blobs[name], f"{source}/{name}") for name in names]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _cifar_files(store: DataStore) -> list[tuple[Path, ...]]:
    return [(store.path(CIFAR_TAR.folder, CIFAR_DIR), store.path(CIFAR_TAR.folder, CIFAR_TAR.name))]


@register_dataset("cifar10", files=_cifar_files, source=CIFAR_URL)
def load_cifar10(store: DataStore) -> ImageDataset:
    """CIFAR-10: 50,000 + 10,000 colour 32x32 images, from cifar-10-batches-bin/ or the .tar.gz.

    Only the binary version is read: the python version is pickled, and unpickling runs code.
    """
    source, blobs = _cifar_blobs(store)
    with fix_hint(CIFAR_URL):
        classes = _cifar_classes(blobs.get(CIFAR_META), f"{source}/{CIFAR_META}")
        train = _cifar_batches(blobs, CIFAR_TRAIN, source)
        test = _cifar_batches(blobs, (CIFAR_TEST,), source)
    return ImageDataset.from_arrays("cifar10", classes, train, test)


def _svhn_split(store: DataStore, split: str) -> Split:
    name = f"{split}_32x32.mat"
    return store.load(RemoteFile("svhn", name, SVHN_URL + name, SVHN_MD5[split]), read_svhn_mat)


def _svhn_files(store: DataStore) -> list[tuple[Path, ...]]:
    return [(store.path("svhn", f"{split}_32x32.mat"),) for split in ("train", "test")]


@register_dataset("svhn", files=_svhn_files, source=SVHN_URL)
def load_svhn(store: DataStore, *, extra: bool = False) -> ImageDataset:
    """SVHN cropped digits: 73,257 + 26,032 colour 32x32 images, official .mat files.

    extra=True appends the 531,131 images of extra_32x32.mat to the training split.
    """
    train = _svhn_split(store, "train")
    if extra:
        more = _svhn_split(store, "extra")
        train = np.concatenate([train[0], more[0]]), np.concatenate([train[1], more[1]])
    return ImageDataset.from_arrays("svhn", DIGIT_NAMES, train, _svhn_split(store, "test"))


@register_dataset("digits")
def load_digits(_store: DataStore) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images; no files, no network).

    Pixels 0..16 are scaled to 0..255; the test split is a fixed 20% (permutation from seed 0).
    """
    from sklearn.datasets import load_digits  # on first use: the command line starts without it
    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED)).numpy()
    n_test = round(len(images) * DIGITS_TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return ImageDataset.from_arrays(
        "digits", DIGIT_NAMES, (images[train], bunch.target[train]), (images[test], bunch.target[test])
    )
