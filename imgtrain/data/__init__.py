"""Data: sources -> splits -> datasets -> transforms -> loaders.

    splits = build_splits(recipe.data)                  # DataSplits: train/val/test, classes
    mean, std = resolve_normalization(recipe.augment, splits)
    train_tf = build_train_transform(recipe.augment, splits.channels, size, mean, std)
    splits.train = splits.train.with_transform(train_tf)
    loaders = build_loaders(recipe, splits, device)     # Loaders: train/val/test, train_generator
"""

from imgtrain.data.datasets import FileImageDataset, ImageDataset, TensorImageDataset
from imgtrain.data.errors import DataError
from imgtrain.data.images import BadImageError, load_image, scan_images
from imgtrain.data.loaders import Loaders, build_loaders, describe_data
from imgtrain.data.shapes import write_shapes_imagefolder
from imgtrain.data.sources import SOURCES, DataSplits, build_splits
from imgtrain.data.split import split_folder, stratified_split_indices
from imgtrain.data.transforms import build_eval_transform, build_train_transform, resolve_normalization

__all__ = [
    "SOURCES",
    "BadImageError",
    "DataError",
    "DataSplits",
    "FileImageDataset",
    "ImageDataset",
    "Loaders",
    "TensorImageDataset",
    "build_eval_transform",
    "build_loaders",
    "build_splits",
    "build_train_transform",
    "describe_data",
    "load_image",
    "resolve_normalization",
    "scan_images",
    "split_folder",
    "stratified_split_indices",
    "write_shapes_imagefolder",
]
