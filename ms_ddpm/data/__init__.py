"""Input pipelines: MNIST, Fashion-MNIST, CIFAR-10 and folders of images as batched `mindspore.dataset`s in [-1, 1],
with class labels on request."""
from .datasets import DATASETS, IMAGE_EXTENSIONS, ImageReadError, class_names, create_dataset, iterate, pipeline_error
from .fetch import download_dataset

__all__ = [
    "DATASETS", "IMAGE_EXTENSIONS", "ImageReadError", "class_names", "create_dataset", "download_dataset",
    "iterate", "pipeline_error",
]
