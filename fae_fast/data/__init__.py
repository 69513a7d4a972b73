"""Data reading for fae_fast: image files and masks, the MVTec AD layout, device-resident training sets,
and the fast loaders (DALI on a GPU, DALI CPU-only or cv2 threads elsewhere).

Importing this package never imports DALI: :mod:`fae_fast.data.loader` loads it on first use, and falls back to
cv2 (with one log line saying so) where it is missing.

Example:
    >>> from fae_fast.data import normal_image_paths, load_images, TrainSampler, make_loader
    >>> imgs = load_images(normal_image_paths("mvtec/bottle"), (256, 256))          # doctest: +SKIP
    >>> for batch in make_loader("mvtec/bottle/test/broken_large", (256, 256), 64):  # doctest: +SKIP
    ...     batch.images, batch.names
"""
from .datasets import (MVTecCategory, TestItem, TestSet, TrainSampler, is_mvtec, load_images, load_test_set,
                       normal_image_paths)
from .io import (IMAGE_EXTS, ImageList, image_size_of, list_images, map_to_original, read_image, read_mask,
                 resize_image, resize_mask)

__all__ = [
    "IMAGE_EXTS", "ImageList", "image_size_of", "list_images", "map_to_original", "read_image", "read_mask",
    "resize_image", "resize_mask",
    "MVTecCategory", "TestItem", "TestSet", "is_mvtec", "normal_image_paths", "load_images", "load_test_set",
    "TrainSampler", "Batch", "Loader", "FrameSource", "make_loader", "load_images_on_device",
]


def __getattr__(name):  # the loaders are imported lazily: they may pull in DALI
    if name in ("Batch", "Loader", "FrameSource", "make_loader", "load_images_on_device"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'fae_fast.data' has no attribute {name!r}")
