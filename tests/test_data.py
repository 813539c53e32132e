"""Tests of ekdaa.data on small fixture files written in each official format (no network)."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pooch
import pytest
import requests
import scipy.io
import torch

from ekdaa.data import (
    DATASETS,
    NORMALIZATIONS,
    DataError,
    ImageDataset,
    Normalizer,
    augment,
    batches,
    default_data_dir,
    load_dataset,
    register_dataset,
    split_validation,
)

N_TRAIN, N_TEST = 20, 10
FASHION = {
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
}
CIFAR_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that would download; tests that mean to, patch pooch.retrieve themselves."""

    def refuse(url: str, **_: object) -> str:
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(pooch, "retrieve", refuse)


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def assert_names(excinfo: pytest.ExceptionInfo[DataError], *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# --- fixture writers ------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def fashion_arrays() -> dict[str, np.ndarray]:
    gen = rng()
    return {
        "train-images-idx3-ubyte.gz": gen.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": gen.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": gen.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": gen.integers(0, 10, N_TEST, dtype=np.uint8),
    }


def write_fashion(root: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(array)))
    return folder


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    return (
        np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1).astype(np.uint8).tobytes()
    )


def cifar_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    gen = rng()
    train_x = gen.integers(0, 256, (N_TRAIN, 3, 32, 32), dtype=np.uint8)
    train_x[0, 0], train_x[0, 1], train_x[0, 2] = 10, 20, 30  # R, G, B planes of image 0
    return (
        train_x,
        gen.integers(0, 10, N_TRAIN, dtype=np.uint8),
        gen.integers(0, 256, (N_TEST, 3, 32, 32), dtype=np.uint8),
        gen.integers(0, 10, N_TEST, dtype=np.uint8),
    )


def cifar_files(with_meta: bool = True) -> dict[str, bytes]:
    train_x, train_y, test_x, test_y = cifar_arrays()
    per = N_TRAIN // len(CIFAR_TRAIN)
    files = {
        name: cifar_records(train_x[i * per : (i + 1) * per], train_y[i * per : (i + 1) * per])
        for i, name in enumerate(CIFAR_TRAIN)
    }
    files["test_batch.bin"] = cifar_records(test_x, test_y)
    if with_meta:
        files["batches.meta.txt"] = "\n".join(f"class{i}" for i in range(10)).encode() + b"\n\n"
    return files


def write_cifar_dir(root: Path, files: dict[str, bytes]) -> Path:
    folder = root / "cifar-10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def cifar_tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def write_cifar_tar(root: Path, files: dict[str, bytes]) -> Path:
    path = root / "cifar-10" / "cifar-10-binary.tar.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(cifar_tar_bytes(files))
    return path


def svhn_arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    labels = gen.integers(1, 11, (n, 1), dtype=np.uint8)
    labels[0] = 10  # the digit 0
    return {"X": gen.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": labels}


def write_svhn(root: Path, **overrides: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    mats = {"train": svhn_arrays(N_TRAIN, 1), "test": svhn_arrays(N_TEST, 2)} | overrides
    for split, mat in mats.items():
        scipy.io.savemat(folder / f"{split}_32x32.mat", mat)
    return mats


# --- Fashion-MNIST --------------------------------------------------------------------------------


def test_fashion_mnist_loads_pixels_and_labels(tmp_path: Path) -> None:
    arrays = fashion_arrays()
    write_fashion(tmp_path, arrays)
    ds = load_dataset("fashion-mnist", tmp_path, download=False)
    assert ds.name == "fashion-mnist" and ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot"
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.is_contiguous() and ds.test_x.is_contiguous()
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["train-labels-idx1-ubyte.gz"])
    np.testing.assert_array_equal(ds.test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])


def _truncated(blob: bytes) -> bytes:
    return gzip.compress(blob[:-100])


def _wrong_magic(blob: bytes) -> bytes:
    return gzip.compress(struct.pack(">I", 2049) + blob[4:])


def _not_gzip(blob: bytes) -> bytes:
    return b"this is not gzip data"


def _cut_gzip(blob: bytes) -> bytes:
    return gzip.compress(blob)[:200]


@pytest.mark.parametrize(
    ("corrupt", "needles"),
    [
        (_truncated, ("truncated", f"{16 + N_TRAIN * 784} bytes", f"got {16 + N_TRAIN * 784 - 100}")),
        (_wrong_magic, ("magic number 2049", "2051")),
        (_not_gzip, ("gzip",)),
        (_cut_gzip, ("gzip",)),
    ],
)
def test_fashion_mnist_broken_images_file(tmp_path: Path, corrupt, needles: tuple[str, ...]) -> None:
    arrays = fashion_arrays()
    folder = write_fashion(tmp_path, arrays)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(corrupt(idx_bytes(arrays["train-images-idx3-ubyte.gz"])))
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", tmp_path, download=False)
    assert_names(excinfo, str(path), "fashion-mnist.s3-website", *needles)


@pytest.mark.parametrize(
    ("name", "array", "needles"),
    [
        ("train-labels-idx1-ubyte.gz", np.full(N_TRAIN, 10, np.uint8), ("label 10", "0..9")),
        ("train-labels-idx1-ubyte.gz", np.zeros(N_TRAIN - 1, np.uint8), ("19 labels", "20 images")),
        ("t10k-images-idx3-ubyte.gz", np.zeros((N_TEST, 27, 28), np.uint8), ("(27, 28)", "28x28")),
    ],
)
def test_fashion_mnist_inconsistent_files(tmp_path: Path, name: str, array: np.ndarray, needles) -> None:
    folder = write_fashion(tmp_path, fashion_arrays() | {name: array})
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", tmp_path, download=False)
    assert_names(excinfo, str(folder / name), *needles)


def test_missing_file_without_download_names_path_and_url(tmp_path: Path) -> None:
    folder = write_fashion(tmp_path, fashion_arrays())
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", tmp_path, download=False)
    assert_names(
        excinfo,
        str(folder / "t10k-labels-idx1-ubyte.gz"),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz",
    )


# --- downloads ------------------------------------------------------------------------------------


def test_download_fetches_missing_files_with_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = fashion_arrays()
    calls = []

    def fake_retrieve(url: str, known_hash: str, fname: str, path: Path, progressbar: bool) -> str:
        calls.append((url, known_hash))
        target = Path(path) / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(gzip.compress(idx_bytes(arrays[fname])))
        return str(target)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    ds = load_dataset("fashion-mnist", tmp_path / "data", download=True)
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])
    assert {url.rsplit("/", 1)[1] for url, _ in calls} == FASHION
    assert "md5:bb300cfdad3c16e7a12a480ee83cd310" in {md5 for _, md5 in calls}
    assert (tmp_path / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()
    calls.clear()
    load_dataset("fashion-mnist", tmp_path / "data", download=True)
    assert not calls  # present files are not fetched again


@pytest.mark.parametrize(
    ("error", "needles"),
    [
        (requests.ConnectionError("Failed to resolve\n host"), ("cannot download", "Failed to resolve host")),
        (
            ValueError(
                "MD5 hash of downloaded file does not match the known hash: expected md5:aa but got bb."
            ),
            ("checksum", "expected md5:aa but got bb"),
        ),
    ],
)
def test_download_failures_become_data_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, needles: tuple[str, ...]
) -> None:
    def failing_retrieve(url: str, path: Path, **_: object) -> str:
        Path(path).mkdir(parents=True, exist_ok=True)  # as pooch does before fetching
        raise error

    monkeypatch.setattr(pooch, "retrieve", failing_retrieve)
    with pytest.raises(DataError) as excinfo:
        load_dataset("svhn", tmp_path, download=True)
    assert_names(excinfo, str(tmp_path / "svhn" / "train_32x32.mat"), "ufldl.stanford.edu", *needles)
    assert not (tmp_path / "svhn").exists()  # the folder the download made is gone again
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        load_dataset("svhn", tmp_path, download=True)
    assert (tmp_path / "svhn" / "notes.txt").read_text() == "mine"  # a folder that was there stays
    with pytest.raises(DataError):
        load_dataset("svhn", tmp_path / "new" / "data", download=True)
    assert not (tmp_path / "new").exists()  # a --data-dir the download made is gone too


def test_data_dir_may_be_the_datasets_own_folder(tmp_path: Path) -> None:
    arrays = fashion_arrays()
    folder = write_fashion(tmp_path, arrays)
    ds = load_dataset("fashion-mnist", folder, download=False)
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])
    with pytest.raises(DataError, match=r"--data-dir is the folder that holds fashion-mnist/"):
        load_dataset("fashion-mnist", tmp_path / "elsewhere", download=False)


def test_cache_dir_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EKDAA_DATA", raising=False)
    assert default_data_dir() == Path(pooch.os_cache("ekdaa"))
    monkeypatch.setenv("EKDAA_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    arrays = fashion_arrays()
    write_fashion(tmp_path, arrays)
    ds = load_dataset("fashion-mnist", download=False)
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["train-labels-idx1-ubyte.gz"])


# --- CIFAR-10 -------------------------------------------------------------------------------------


def assert_cifar_matches(ds: ImageDataset) -> None:
    train_x, train_y, test_x, test_y = cifar_arrays()
    np.testing.assert_array_equal(ds.train_x.numpy(), train_x)
    np.testing.assert_array_equal(ds.train_y.numpy(), train_y)
    np.testing.assert_array_equal(ds.test_x.numpy(), test_x)
    np.testing.assert_array_equal(ds.test_y.numpy(), test_y)
    assert ds.train_x[0, :, 5, 7].tolist() == [10, 20, 30]  # channel order R, G, B
    assert ds.image_shape == (3, 32, 32)


def test_cifar10_from_extracted_folder(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path, cifar_files())
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert_cifar_matches(ds)
    assert ds.classes == tuple(f"class{i}" for i in range(10))


def test_cifar10_from_archive_with_standard_class_names(tmp_path: Path) -> None:
    write_cifar_tar(tmp_path, cifar_files(with_meta=False))
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert_cifar_matches(ds)
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"


def _short_batch(files: dict[str, bytes]) -> dict[str, bytes]:
    return files | {"data_batch_3.bin": files["data_batch_3.bin"][:-1]}


def _label_12(files: dict[str, bytes]) -> dict[str, bytes]:
    return files | {"data_batch_3.bin": b"\x0c" + files["data_batch_3.bin"][1:]}


def _no_batch_3(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: blob for name, blob in files.items() if name != "data_batch_3.bin"}


def _bad_meta(files: dict[str, bytes]) -> dict[str, bytes]:
    return files | {"batches.meta.txt": b"cat\ndog\n"}


@pytest.mark.parametrize(
    ("corrupt", "needles"),
    [
        (_short_batch, ("data_batch_3.bin", "3073-byte records")),
        (_label_12, ("data_batch_3.bin", "label 12")),
        (_no_batch_3, ("missing data_batch_3.bin",)),
        (_bad_meta, ("batches.meta.txt", "2 class names")),
    ],
)
@pytest.mark.parametrize("packed", [False, True], ids=["folder", "archive"])
def test_cifar10_broken_files(tmp_path: Path, corrupt, needles: tuple[str, ...], packed: bool) -> None:
    files = corrupt(cifar_files())
    where = write_cifar_tar(tmp_path, files) if packed else write_cifar_dir(tmp_path, files)
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", tmp_path, download=False)
    assert_names(excinfo, str(where), "cifar-10-binary.tar.gz", *needles)


def test_cifar10_corrupt_archive(tmp_path: Path) -> None:
    path = write_cifar_tar(tmp_path, cifar_files())
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", tmp_path, download=False)
    assert_names(excinfo, str(path), ".tar.gz")


def test_cifar10_missing_names_folder_archive_and_url(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", tmp_path, download=False)
    folder = tmp_path / "cifar-10"
    assert_names(
        excinfo,
        str(folder / "cifar-10-binary.tar.gz"),
        str(folder / "cifar-10-batches-bin"),
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    )


# --- SVHN -----------------------------------------------------------------------------------------


def test_svhn_loads_and_maps_label_10_to_0(tmp_path: Path) -> None:
    mats = write_svhn(tmp_path)
    ds = load_dataset("svhn", tmp_path, download=False)
    train = mats["train"]
    assert ds.image_shape == (3, 32, 32) and len(ds.train_x) == N_TRAIN and len(ds.test_x) == N_TEST
    np.testing.assert_array_equal(ds.train_x[3].numpy(), train["X"][..., 3].transpose(2, 0, 1))
    np.testing.assert_array_equal(ds.train_y.numpy(), train["y"][:, 0] % 10)
    assert ds.train_y[0] == 0 and ds.classes == tuple("0123456789")


def test_svhn_extra_is_appended_on_request(tmp_path: Path) -> None:
    mats = write_svhn(tmp_path, extra=svhn_arrays(5, 3))
    assert len(load_dataset("svhn", tmp_path, download=False).train_x) == N_TRAIN
    ds = load_dataset("svhn", tmp_path, download=False, extra=True)
    assert len(ds.train_x) == N_TRAIN + 5
    np.testing.assert_array_equal(ds.train_y[N_TRAIN:].numpy(), mats["extra"]["y"][:, 0] % 10)


@pytest.mark.parametrize(
    ("mat", "needles"),
    [
        ({"X": svhn_arrays(N_TRAIN)["X"]}, ("['y'] missing",)),
        (
            {"X": np.zeros((28, 28, 3, N_TRAIN), np.uint8), "y": svhn_arrays(N_TRAIN)["y"]},
            ("(28, 28, 3, 20)",),
        ),
        ({"X": svhn_arrays(N_TRAIN)["X"], "y": np.full((N_TRAIN, 1), 11, np.uint8)}, ("label 11", "1..10")),
        ({"X": svhn_arrays(N_TRAIN)["X"], "y": np.ones((N_TRAIN - 1, 1), np.uint8)}, ("y is uint8 (19, 1)",)),
    ],
)
def test_svhn_broken_files(tmp_path: Path, mat: dict[str, np.ndarray], needles: tuple[str, ...]) -> None:
    write_svhn(tmp_path, train=mat)
    with pytest.raises(DataError) as excinfo:
        load_dataset("svhn", tmp_path, download=False)
    assert_names(excinfo, str(tmp_path / "svhn" / "train_32x32.mat"), "train_32x32.mat", *needles)


def test_svhn_not_a_mat_file(tmp_path: Path) -> None:
    write_svhn(tmp_path)
    path = tmp_path / "svhn" / "test_32x32.mat"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError) as excinfo:
        load_dataset("svhn", tmp_path, download=False)
    assert_names(excinfo, str(path), ".mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat")


# --- digits and the registry ----------------------------------------------------------------------


def test_digits_fixed_split_and_scaled_pixels() -> None:
    ds = load_dataset("digits", "/nonexistent", download=False)
    again = load_dataset("digits")
    assert ds.image_shape == (1, 8, 8) and len(ds.train_x) + len(ds.test_x) == 1797
    assert len(ds.test_x) == 359
    assert int(ds.train_x.max()) == 255 and int(ds.train_x.min()) == 0
    assert torch.equal(ds.test_x, again.test_x) and torch.equal(ds.train_y, again.train_y)
    assert set(torch.unique(ds.train_x).tolist()) <= {round(v * 255 / 16) for v in range(17)}


def test_unknown_dataset_and_option() -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    assert_names(excinfo, "'mnist'", "cifar10", "digits", "fashion-mnist", "svhn")
    with pytest.raises(DataError) as excinfo:
        load_dataset("digits", extra=True)
    assert_names(excinfo, "'digits'", "extra")


def test_register_dataset_adds_a_loader() -> None:
    @register_dataset("tiny")
    def load_tiny(store: object, *, n: int = 2) -> ImageDataset:
        x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
        return ImageDataset(
            "tiny", x, torch.zeros(n, dtype=torch.int64), x, torch.ones(n, dtype=torch.int64), ("a", "b")
        )

    try:
        assert len(load_dataset("tiny", n=3).train_x) == 3
        with pytest.raises(DataError, match="already registered"):
            register_dataset("tiny")(load_tiny)
    finally:
        del DATASETS["tiny"]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("train_x", torch.zeros(4, 1, 2, 2), "uint8"),
        ("train_y", torch.zeros(3, dtype=torch.int64), "shape (4,)"),
        ("test_y", torch.full((4,), 2), "outside 0..1"),
        ("test_x", torch.zeros(4, 1, 3, 3, dtype=torch.uint8), "test images"),
    ],
)
def test_image_dataset_validates(field: str, value: torch.Tensor, needle: str) -> None:
    parts = {
        "train_x": torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
        "train_y": torch.zeros(4, dtype=torch.int64),
        "test_x": torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
        "test_y": torch.ones(4, dtype=torch.int64),
    }
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ImageDataset(name="t", classes=("a", "b"), **(parts | {field: value}))


# --- split_validation and batches -----------------------------------------------------------------


def toy(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, torch.arange(n)


def test_split_validation_is_seeded_disjoint_and_sized() -> None:
    x, y = toy()
    (x_tr, y_tr), (x_val, y_val) = split_validation(x, y, 10, seed=3)
    assert len(x_tr) == 40 and len(x_val) == 10
    assert (
        set(y_tr.tolist()).isdisjoint(y_val.tolist()) and len(set(y_tr.tolist()) | set(y_val.tolist())) == 50
    )
    assert torch.equal(x_val[:, 0, 0, 0].long(), y_val)
    again = split_validation(x, y, 10, seed=3)[1][1]
    other = split_validation(x, y, 10, seed=4)[1][1]
    assert torch.equal(again, y_val) and not torch.equal(other, y_val)
    (x_all, _), (x_none, y_none) = split_validation(x, y, 0, seed=0)
    assert torch.equal(x_all, x) and x_none.shape == (0, 1, 2, 2) and len(y_none) == 0
    with pytest.raises(DataError, match="n_val=50"):
        split_validation(x, y, 50, seed=0)


def test_batches_cover_every_sample_once() -> None:
    x, y = toy(23)
    plain = list(batches(x, y, 5, shuffle=False, generator=None))
    assert [len(b) for b, _ in plain] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([b for _, b in plain]), y)
    gen = torch.Generator().manual_seed(0)
    shuffled = list(batches(x, y, 5, shuffle=True, generator=gen))
    order = torch.cat([b for _, b in shuffled])
    assert sorted(order.tolist()) == list(range(23)) and not torch.equal(order, y)
    assert all(torch.equal(bx[:, 0, 0, 0].long(), by) for bx, by in shuffled)
    dropped = list(batches(x, y, 5, shuffle=True, generator=gen, drop_last=True))
    assert [len(b) for b, _ in dropped] == [5, 5, 5, 5]


def test_batches_shuffle_is_fixed_by_generator() -> None:
    x, y = toy(30)

    def epoch(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([b for _, b in batches(x, y, 7, shuffle=True, generator=gen)]).tolist()

    assert epoch(1) == epoch(1) and epoch(1) != epoch(2)
    with pytest.raises(DataError, match="batch_size"):
        batches(x, y, 0, shuffle=False, generator=None)
    with pytest.raises(DataError, match="29 labels"):
        batches(x, y[:29], 4, shuffle=False, generator=None)


# --- Normalizer -----------------------------------------------------------------------------------


def test_half_normalization_range() -> None:
    norm = Normalizer("half")
    out = norm(torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([-0.5, 0.5, 0.2 - 0.5]))
    assert norm(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), dtype=torch.float64).dtype == torch.float64


def test_standard_normalization_whitens_each_channel() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.stack(
        [torch.randint(0, 50, (64, 8, 8), generator=gen), torch.randint(100, 256, (64, 8, 8), generator=gen)],
        1,
    ).to(torch.uint8)
    norm = Normalizer("standard", x)
    out = norm(x)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3), unbiased=False), torch.ones(2), atol=1e-5, rtol=0)


def test_normalizer_state_round_trip_and_move() -> None:
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    norm = Normalizer("standard", x)
    state = json.loads(json.dumps(norm.state_dict()))
    rebuilt = Normalizer.from_state_dict(state)
    assert rebuilt.kind == "standard"
    assert torch.equal(rebuilt(x), norm(x))
    moved = rebuilt.to("meta")
    assert moved is rebuilt and rebuilt.mean.device.type == "meta" and rebuilt.std.device.type == "meta"
    assert Normalizer.from_state_dict(Normalizer("half").state_dict())(x).max() <= 0.5


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: Normalizer("minmax"), "half, standard"),
        (lambda: Normalizer("standard"), "train_x"),
        (lambda: Normalizer("standard", torch.full((2, 1, 2, 2), 7, dtype=torch.uint8)), "std > 0"),
        (lambda: Normalizer("half")(torch.zeros(1, 1, 2, 2)), "uint8"),
        (lambda: Normalizer.from_state_dict({"kind": "half"}), "mean"),
    ],
)
def test_normalizer_errors(make, needle: str) -> None:
    assert NORMALIZATIONS == ("half", "standard")
    with pytest.raises(DataError, match=needle):
        make()


# --- augment --------------------------------------------------------------------------------------


def images(n: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 6, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_augment_keeps_shape_dtype_and_is_seeded() -> None:
    x = images()
    first = augment(x, torch.Generator().manual_seed(7))
    assert first.shape == x.shape and first.dtype == torch.uint8
    assert torch.equal(first, augment(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(x, torch.Generator().manual_seed(8)))
    floats = augment(x.float(), torch.Generator().manual_seed(7))
    assert floats.dtype == torch.float32 and torch.equal(floats, first.float())


def test_augment_without_padding_or_flip_is_identity() -> None:
    x = images()
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), crop_padding=0, flip=False), x)


def test_augment_flip_mirrors_some_samples() -> None:
    x = images()
    out = augment(x, torch.Generator().manual_seed(0), crop_padding=0, flip=True)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_augment_crops_are_windows_of_the_zero_padded_image() -> None:
    x, pad = images(16), 2
    out = augment(x, torch.Generator().manual_seed(0), crop_padding=pad, flip=True)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    h, w = x.shape[2:]
    for sample, original in zip(out, padded, strict=True):
        windows = [
            view
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for view in (original[:, dy : dy + h, dx : dx + w], original[:, dy : dy + h, dx : dx + w].flip(2))
        ]
        assert any(torch.equal(sample, window) for window in windows)
    assert not torch.equal(out, x)


def test_without_pooch_ekdaa_trains_on_data_it_has_and_says_what_a_download_needs(tmp_path):
    """A bare GPU image has no pooch: importing, the CLI and a run on bundled data must not need it."""
    code = ("import sys; sys.modules['pooch'] = None\n"
            "import ekdaa, ekdaa.cli, ekdaa.train\n"
            "from ekdaa.data import load_dataset, DataError\n"
            "assert len(load_dataset('digits').test_x) > 0\n"
            "try:\n"
            f"    load_dataset('fashion-mnist', data_dir={str(tmp_path)!r})\n"
            "except DataError as err:\n"
            "    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "EKDAA_DATA": ""})
    assert done.returncode == 0, done.stderr
    assert "needs the package pooch, which is not installed: pip install pooch" in done.stdout
