"""``folder:PATH`` datasets: images of generated fixtures, decoded once and cached, validated."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

import ekdaa.data.folder as folder
from ekdaa.cli import main
from ekdaa.data import DataError, dataset_label, load_dataset, missing_files
from ekdaa.train import TrainConfig, TrainError


def write_classes(root: Path, classes: int = 3, per_class: int = 10, size: tuple[int, int] = (8, 8),
                  mode: str = "L", ext: str = ".png") -> Path:
    """Each image is filled with 100 * class + index: its pixels say which file and class it is."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            value = 100 * c + i
            Image.new(mode, size, value if mode == "L" else (value, value, value)).save(root / f"class{c}" / f"{i}{ext}")
    return root


def test_a_class_per_folder_dataset_splits_once_and_keeps_labels(tmp_path):
    root = write_classes(tmp_path / "imgs")
    ds = load_dataset(f"folder:{root}")
    assert ds.classes == ("class0", "class1", "class2") and ds.image_shape == (1, 8, 8)
    assert (len(ds.train_y), len(ds.test_y)) == (24, 6)
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert (x.flatten(1).float().mean(1) // 100).long().tolist() == y.tolist()  # each image under its class
    seen = sorted(int(v) for v in ds.train_x[:, 0, 0, 0].tolist() + ds.test_x[:, 0, 0, 0].tolist())
    assert seen == sorted(100 * c + i for c in range(3) for i in range(10))  # every file once
    again = load_dataset(f"folder:{root}")
    assert again.test_x.equal(ds.test_x)  # the same split every time


def test_decoded_once_then_read_from_the_cache_until_an_image_changes(tmp_path, monkeypatch):
    root = write_classes(tmp_path / "imgs")
    first = load_dataset(f"folder:{root}")
    assert len(list((root / ".ekdaa-cache").glob("*.npz"))) == 1
    monkeypatch.setattr(folder, "_decode", lambda *a: pytest.fail("decoded again"))
    assert load_dataset(f"folder:{root}").train_x.equal(first.train_x)
    monkeypatch.undo()
    Image.new("L", (8, 8), 255).save(root / "class0" / "0.png")
    os.utime(root / "class0" / "0.png", ns=(1, 1))  # a changed file: its size or time differs
    changed = load_dataset(f"folder:{root}")
    assert 255 in changed.train_x[:, 0, 0, 0].tolist() + changed.test_x[:, 0, 0, 0].tolist()
    for cache in (root / ".ekdaa-cache").glob("*.npz"):
        cache.write_bytes(b"not a zip")  # a broken cache is decoded again, never trusted
    assert load_dataset(f"folder:{root}").train_x.equal(changed.train_x)


def test_train_and_test_folders_are_the_split(tmp_path):
    write_classes(tmp_path / "d" / "train", per_class=4)
    write_classes(tmp_path / "d" / "test", classes=2, per_class=2)
    ds = load_dataset(f"folder:{tmp_path / 'd'}")
    assert (len(ds.train_y), len(ds.test_y), ds.num_classes) == (12, 4, 3)
    (tmp_path / "d" / "test" / "dog").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "d" / "test" / "dog" / "1.png")
    with pytest.raises(DataError, match=r"classes \['dog'\] have no training images"):
        load_dataset(f"folder:{tmp_path / 'd'}")


def test_colour_sizes_and_resizing(tmp_path):
    root = write_classes(tmp_path / "c", classes=2, per_class=3)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "class1" / "red.jpg")
    ds = load_dataset(f"folder:{root}")
    assert ds.image_shape == (3, 8, 8)  # one colour image: all RGB
    Image.new("RGB", (12, 10)).save(root / "class0" / "big.png")
    with pytest.raises(DataError, match=r"big.png is 12x10, most images 8x8: pass --image-size N"):
        load_dataset(f"folder:{root}")
    assert load_dataset(f"folder:{root}", image_size=6).image_shape == (3, 6, 6)


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="nope not found: folder:PATH needs a folder of class sub-folders"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    assert "not found" in missing_files(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders with images"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    one = write_classes(tmp_path / "one", classes=1, per_class=4)
    with pytest.raises(DataError, match="one class .class0.: a classifier needs at least two class sub-folders"):
        load_dataset(f"folder:{one}")
    write_classes(one / "train", classes=1, per_class=4)
    write_classes(one / "test", classes=1, per_class=2)
    with pytest.raises(DataError, match="train: one class .class0.: a classifier needs at least two"):
        load_dataset(f"folder:{one}")
    (write_classes(tmp_path / "hollow", classes=3, per_class=2) / "class9").mkdir()
    with pytest.raises(DataError, match="class9: a class folder without images .*: add its images or remove"):
        load_dataset(f"folder:{tmp_path / 'hollow'}")
    root = write_classes(tmp_path / "broken", classes=2, per_class=2)
    (root / "class1" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"class1/0.png: not a readable image .*: remove or replace it"):
        load_dataset(f"folder:{root}")
    with pytest.raises(DataError, match="take only the option image_size"):
        load_dataset(f"folder:{root}", extra=True)
    with pytest.raises(TrainError, match="image_size is for folder:PATH datasets"):
        TrainConfig(dataset="digits", image_size=8).validate()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_caches_in_the_user_cache(tmp_path, monkeypatch):
    root = write_classes(tmp_path / "ro", classes=2, per_class=3)
    monkeypatch.setenv("EKDAA_DATA", str(tmp_path / "cache"))
    root.chmod(0o555)
    try:
        load_dataset(f"folder:{root}")
    finally:
        root.chmod(0o755)
    assert not (root / ".ekdaa-cache").exists() and list((tmp_path / "cache" / "folders").glob("*/*.npz"))


def test_train_and_eval_a_folder_from_the_cli(tmp_path, capsys):
    root = write_classes(tmp_path / "my images", classes=2, per_class=30)
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--model", "mlp", "--epochs", "2", "--batch-size", "8",
                 "--optimizer", "sgd", "--lr", "0.1", "--out", str(out), "--device", "cpu"]) == 0
    assert f"run directory: {out}" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == f"folder:{root}" and summary["test_accuracy"] > 0.5  # chance: 0.5
    assert main(["eval", "--checkpoint", str(out), "--dataset", f"folder:{root}"]) == 0
    assert dataset_label(f"folder:{root}").startswith("folder-my-images-")  # a file name: results/<suite>/<label>
    capsys.readouterr()
