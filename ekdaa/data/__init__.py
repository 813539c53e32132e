"""Datasets as in-memory uint8 tensors: registry, loaders of the official files, batching helpers.

Add a dataset by writing one loader, loader(store: DataStore, **options) -> ImageDataset,
decorated with @register_dataset("name"); or train on a folder of your own images, ``folder:PATH``.
"""

from . import loaders as _loaders  # noqa: F401  (registers the built-in datasets)
from .dataset import DataError, ImageDataset
from .registry import (DATASET_NAMES, DATASETS, dataset_label, load_dataset, missing_files, reachable,
                       register_dataset)
from .store import DataStore, RemoteFile, default_data_dir
from .transforms import NORMALIZATIONS, Normalizer, augment, batches, split_validation

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "NORMALIZATIONS",
    "DataError",
    "DataStore",
    "ImageDataset",
    "Normalizer",
    "RemoteFile",
    "augment",
    "batches",
    "dataset_label",
    "default_data_dir",
    "load_dataset",
    "missing_files",
    "reachable",
    "register_dataset",
    "split_validation",
]
