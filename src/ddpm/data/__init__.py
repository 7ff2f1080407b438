"""Datasets for training: generated sets, MNIST and CIFAR-10 (local or checked downloads),
image folders and numpy arrays, all loaded whole into one float32 tensor.

Conventions: images float32 (N, C, H, W) in [-1, 1]; points float32 (N, D). Every problem with a
name, path or file raises :class:`DataError` (a ValueError) with a one-line message.
"""

from ddpm.data.arrays import load_array
from ddpm.data.cifar import RestrictedUnpickler, load_cifar10
from ddpm.data.download import (
    default_cache_dir, download_cifar10, download_file, download_mnist, md5_of, resolve_data_path, verify_md5,
)
from ddpm.data.errors import ChecksumError, DataError, DownloadError, NoSplitsError
from ddpm.data.folder import list_image_files, load_image_folder
from ddpm.data.mnist import ImagesAndLabels, load_mnist, read_idx
from ddpm.data.order import DataOrder
from ddpm.data.registry import DATASETS, Dataset, list_datasets, load_dataset
from ddpm.data.synthetic import (
    eight_gaussians_centres, make_8gaussians, make_checkerboard, make_gradients, make_moons, make_square,
    make_swissroll, nearest_gradient_distance,
)
from ddpm.data.transforms import convert_channels, host_to_device, random_hflip, resize_center_crop, uint8_to_float

__all__ = [
    "DATASETS", "Dataset", "list_datasets", "load_dataset",
    "DataError", "ChecksumError", "DownloadError", "NoSplitsError", "DataOrder",
    "make_square", "make_gradients", "nearest_gradient_distance", "make_moons", "make_swissroll",
    "make_8gaussians", "eight_gaussians_centres", "make_checkerboard",
    "ImagesAndLabels", "read_idx", "load_mnist", "load_cifar10", "RestrictedUnpickler",
    "default_cache_dir", "md5_of", "verify_md5", "download_file", "download_mnist", "download_cifar10",
    "resolve_data_path",
    "list_image_files", "load_image_folder", "load_array",
    "uint8_to_float", "convert_channels", "resize_center_crop", "random_hflip", "host_to_device",
]
