"""Datasets as uint8 tensors, stratified subsets and batched augmentation."""

from veil.data.augment import BatchAugment
from veil.data.base import ImageDataset, PoisonedDataset, quantize, stratified_subset, to_float, to_uint8
from veil.data.datasets import DATASETS, load_dataset, list_datasets

__all__ = [
    "BatchAugment",
    "DATASETS",
    "ImageDataset",
    "PoisonedDataset",
    "list_datasets",
    "load_dataset",
    "quantize",
    "stratified_subset",
    "to_float",
    "to_uint8",
]
