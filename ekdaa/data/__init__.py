"""Datasets as in-memory uint8 tensors: registry, loaders of the official files, batching helpers.

Add a dataset by writing one loader, loader(store: DataStore, **options) -> ImageDataset,
decorated with @register_dataset("name").
"""

from . import loaders as _loaders  # noqa: F401  (registers the built-in datasets)
from .dataset import DataError, ImageDataset
from .registry import DATASETS, load_dataset, missing_files, register_dataset
from .store import DataStore, RemoteFile, default_data_dir
from .transforms import NORMALIZATIONS, Normalizer, augment, batches, split_validation

__all__ = [
    "DATASETS",
    "NORMALIZATIONS",
    "DataError",
    "DataStore",
    "ImageDataset",
    "Normalizer",
    "RemoteFile",
    "augment",
    "batches",
    "default_data_dir",
    "load_dataset",
    "missing_files",
    "register_dataset",
    "split_validation",
]
