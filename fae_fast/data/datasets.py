"""Datasets on disk: the MVTec AD layout, plain folders of normal images, decoded sets resident on a device.

Training decodes every normal image once (:func:`load_images`, threads; or the DALI path of
:mod:`fae_fast.data.loader` on a GPU), keeps the ``uint8 (N, 3, H, W)`` set on the device, and draws augmented
batches from it with :class:`TrainSampler` without touching the host again.

MVTec AD layout of one category::

    <root>/train/good/*.png
    <root>/test/<defect>/*.png                 (<defect> == "good" for normal test images)
    <root>/ground_truth/<defect>/<stem>_mask.png

Example:
    >>> paths = normal_image_paths("mvtec/bottle")                  # doctest: +SKIP
    >>> images = load_images(paths, (256, 256)).cuda()               # doctest: +SKIP
    >>> sampler = TrainSampler(images, 32, torch.Generator("cuda").manual_seed(0))   # doctest: +SKIP
    >>> batch = sampler.next()                                       # (32, 3, 256, 256) uint8 on cuda
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import logging
import os
import pathlib
import warnings
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import torch

from .. import _atomic
from .io import (IMAGE_EXTS, check_image_size, list_images, read_image, read_mask, resize_image,
                 resize_regions)

__all__ = ["TestItem", "MVTecCategory", "is_mvtec", "normal_image_paths", "load_images", "TestSet",
           "load_test_set", "TrainSampler", "default_workers", "parallel_map"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

GOOD = "good"


# ----------------------------------------------------------------------------------------------------------------
# layout


@dataclasses.dataclass(frozen=True)
class TestItem:
    """One test image of an MVTec category.

    Attributes:
        path: the image file.
        defect_type: the name of its folder under ``test/`` (``"good"`` for normal images).
        label: 0 for normal, 1 for defective.
        mask_path: its ground-truth mask, None for normal images.
    """

    __test__ = False  # not a pytest test class despite the name

    path: pathlib.Path
    defect_type: str
    label: int
    mask_path: pathlib.Path | None


def is_mvtec(root: PathLike) -> bool:
    """True when ``root`` looks like one MVTec AD category (``train/good`` or ``test/<defect>`` folders)."""
    root = pathlib.Path(root)
    if (root / "train" / GOOD).is_dir():
        return True
    test = root / "test"
    return test.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in test.iterdir())


def _mask_for(root: pathlib.Path, defect: str, image: pathlib.Path) -> pathlib.Path:
    gt = root / "ground_truth" / defect
    expected = gt / f"{image.stem}_mask.png"
    if expected.is_file():
        return expected
    for ext in IMAGE_EXTS:  # tolerated: a mask saved in another image format
        alt = gt / f"{image.stem}_mask{ext}"
        if alt.is_file():
            return alt
    raise FileNotFoundError(f"defective test image {image} has no mask; expected it at {expected}")


class MVTecCategory:
    """One category in the MVTec AD layout, parsed and validated at construction.

    Args:
        root: the category folder (containing ``train/`` and/or ``test/``).
        on_error: ``"raise"`` or ``"skip"`` for non-image files in the image folders (skips are listed in
            ``.skipped``).

    Attributes:
        root: the category folder.
        train_paths: ``list[Path]`` of ``train/good`` (empty when the category has no train split).
        test_items: ``list[TestItem]``, by defect type then file name (empty without a test split).
        skipped: ``list[tuple[Path, str]]`` of files left out with ``on_error="skip"``.

    Raises:
        FileNotFoundError: the root is missing, or a defective test image has no mask (naming both the image
            and the expected mask path).
        ValueError: the root is not in the MVTec layout, or an image folder is empty.
    """

    def __init__(self, root: PathLike, on_error: str = "raise"):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"MVTec category folder not found: {self.root}")
        if not is_mvtec(self.root):
            raise ValueError(f"not an MVTec AD category (no train/good or test/<defect> folders): {self.root}")
        self.skipped: list[tuple[pathlib.Path, str]] = []
        train = self.root / "train" / GOOD
        self.train_paths: list[pathlib.Path] = []
        if train.is_dir():
            lst = list_images(train, on_error)
            self.train_paths = list(lst)
            self.skipped += lst.skipped
        self.test_items: list[TestItem] = []
        test = self.root / "test"
        if test.is_dir():
            for d in sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")):
                lst = list_images(d, on_error)
                self.skipped += lst.skipped
                for p in lst:
                    if d.name == GOOD:
                        self.test_items.append(TestItem(p, GOOD, 0, None))
                    else:
                        self.test_items.append(TestItem(p, d.name, 1, _mask_for(self.root, d.name, p)))

    @property
    def defect_types(self) -> list[str]:
        """The defect folders under ``test/``, sorted (``"good"`` included when present)."""
        return sorted({t.defect_type for t in self.test_items})

    def __repr__(self) -> str:
        return (f"MVTecCategory({str(self.root)!r}, train={len(self.train_paths)}, test={len(self.test_items)}, "
                f"defects={self.defect_types})")


def normal_image_paths(data, on_error: str = "raise") -> list[pathlib.Path]:
    """The normal (training) images of ``data``.

    Args:
        data: an MVTec category root (its ``train/good``), a plain folder of images, or a sequence of image
            paths (checked to exist).
        on_error: ``"raise"`` or ``"skip"`` for non-image files in a folder.

    Returns:
        ``list[pathlib.Path]``, sorted for folders, in the given order for sequences.
    """
    if isinstance(data, (str, os.PathLike)):
        root = pathlib.Path(data)
        if not root.exists():
            raise FileNotFoundError(f"training data not found: {root}")
        if root.is_dir() and is_mvtec(root):
            cat = MVTecCategory(root, on_error)
            if not cat.train_paths:
                raise ValueError(f"MVTec category {root} has no train/good images")
            return cat.train_paths
        return list_images(root, on_error)
    if isinstance(data, Iterable):
        paths = [pathlib.Path(p) for p in data]
        if not paths:
            raise ValueError("empty list of training images")
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"training image not found: {p}")
            if not p.is_file():
                raise ValueError(f"training image is not a regular file (a folder, pipe or device?): {p}")
        return paths
    raise TypeError(f"data must be a folder, an MVTec root or a list of paths, got {type(data).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# decoding many files


def default_workers() -> int:
    """Threads for decoding: one per core up to 32 (cv2 releases the GIL while decoding and resizing)."""
    return max(1, min(32, os.cpu_count() or 1))


def parallel_map(fn: Callable, items: Sequence, workers: int | None = None) -> list:
    """``[fn(x) for x in items]`` on a thread pool, all or nothing.

    The first exception raised by any call (in time, not in order) is re-raised after the pending calls are
    cancelled, so a corrupt file in a large set fails fast instead of after decoding everything.
    """
    items = list(items)
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    out = [None] * len(items)
    with cf.ThreadPoolExecutor(min(workers, len(items))) as ex:
        futs = {ex.submit(fn, x): i for i, x in enumerate(items)}
        done, pending = cf.wait(futs, return_when=cf.FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                for p in pending:
                    p.cancel()
                raise f.exception()
        for f in futs:
            out[futs[f]] = f.result()
    return out


_CACHE_VERSION = "fae_fast.images.v1"  # bump when the decoding or resizing rules of io.py change


def _cache_key(paths: Sequence[pathlib.Path], size, keep_aspect: bool) -> str:
    h = hashlib.sha256()
    h.update(f"{_CACHE_VERSION}|{size[0]}x{size[1]}|{int(bool(keep_aspect))}|{len(paths)}".encode())
    for p in paths:
        st = p.stat()  # a missing file fails here with FileNotFoundError naming it
        h.update(f"\n{p.resolve()}|{st.st_mtime_ns}|{st.st_size}".encode())
    return h.hexdigest()[:24]


def _save_atomic(path: pathlib.Path, arr: np.ndarray) -> None:
    """``np.save`` through :mod:`fae_fast._atomic`: another process never sees half a file, the file gets the
    umask's mode, the folder is fsynced and temporary files of killed writers are removed.

    Raises:
        fae_fast._atomic.WriteError: one line naming ``path`` (e.g. "no space left on device: PATH").
    """
    with _atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)  # a file object: np.save would append ".npy" to the temporary name


def load_images(paths: Sequence[PathLike], size: Sequence[int], keep_aspect: bool = False,
                workers: int | None = None, cache_dir: PathLike | None = None) -> torch.Tensor:
    """Decodes image files into one ``uint8 (N, 3, H, W)`` CPU tensor (threads, all or nothing).

    Args:
        paths: image files, in the order of the output.
        size: ``(H, W)`` of every image (see :func:`fae_fast.data.io.read_image` for stretch vs keep_aspect).
        keep_aspect: fit inside ``size`` keeping the ratio and reflect-pad.
        workers: decoding threads (default :func:`default_workers`).
        cache_dir: when given, the decoded set is stored there as ``.npy``, keyed by a hash of the resolved
            paths, their modification times and byte sizes, ``size`` and ``keep_aspect``; a later call with the
            same key loads it instead of decoding (a changed file changes the key). Written atomically; a cache
            that cannot be written (full disk) is a warning, the decoded images are still returned.

    Returns:
        ``torch.Tensor`` ``uint8`` of shape ``(N, 3, H, W)`` on the CPU (move it to the device once).

    Raises:
        ValueError: empty ``paths``, or the first file that fails to decode (named).
        FileNotFoundError: a missing file (named).
    """
    paths = [pathlib.Path(p) for p in paths]
    if not paths:
        raise ValueError("load_images: empty list of paths")
    H, W = check_image_size(size)
    cache_file = None
    if cache_dir is not None:
        cache_dir = pathlib.Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = _cache_key(paths, (H, W), keep_aspect)
        cache_file = cache_dir / f"images_{len(paths)}x{H}x{W}_{key}.npy"
        if cache_file.is_file():
            try:
                arr = np.load(cache_file, allow_pickle=False)
                if arr.shape == (len(paths), 3, H, W) and arr.dtype == np.uint8:
                    log.info("load_images: cache hit %s", cache_file)
                    return torch.from_numpy(arr)
                log.warning("load_images: ignoring cache %s of shape %s", cache_file, arr.shape)
            except (OSError, ValueError) as e:  # truncated or foreign file: rebuild it
                log.warning("load_images: ignoring unreadable cache %s (%s)", cache_file, e)
    out = np.empty((len(paths), 3, H, W), dtype=np.uint8)

    def _one(i: int) -> None:
        out[i] = read_image(paths[i], (H, W), keep_aspect).transpose(2, 0, 1)

    parallel_map(_one, range(len(paths)), workers)
    if cache_file is not None:
        try:
            _save_atomic(cache_file, out)
            log.info("load_images: cache written %s", cache_file)
        except _atomic.WriteError as e:  # the decoded set is good; only the next call decodes again
            warnings.warn(f"load_images: decode cache not written ({e}); the images are decoded, not cached",
                          UserWarning, stacklevel=2)
    return torch.from_numpy(out)


@dataclasses.dataclass
class TestSet:
    """The test split of an MVTec category, decoded.

    Attributes:
        images: ``uint8 (N, 3, H, W)``.
        regions: ``int32 (N, 1, H, W)``, each mask's defects as region ids (0 outside every defect, all 0 for
            normal images), found at the mask's native size (:func:`fae_fast.data.io.resize_regions`): AU-PRO's
            regions; the masks are ``regions > 0`` (:attr:`masks`).
        labels: ``int64 (N,)``, 0 normal, 1 defective.
        defect_types: ``list[str]`` of length N.
        paths: ``list[Path]`` of length N.
    """

    __test__ = False

    images: torch.Tensor
    regions: torch.Tensor
    labels: torch.Tensor
    defect_types: list[str]
    paths: list[pathlib.Path]

    @property
    def masks(self) -> torch.Tensor:
        """``bool (N, 1, H, W)``: the defect pixels, all False for normal images."""
        return self.regions > 0

    def __len__(self) -> int:
        return len(self.paths)


def load_test_set(root: PathLike, size: Sequence[int], keep_aspect: bool = False,
                  workers: int | None = None) -> TestSet:
    """Decodes the test split of an MVTec category with its masks.

    Masks are read at their native size and compared with their image's native size first (a mismatch is a
    labelling error that a resize would hide), then resized with the mask rule of :mod:`fae_fast.data.io`; their
    defects are labelled as regions before the resize (``TestSet.regions``).

    Args:
        root: the category folder.
        size: ``(H, W)`` of the outputs.
        keep_aspect: fit and reflect-pad instead of stretching (images and masks alike).
        workers: decoding threads.

    Raises:
        ValueError: no test images, or a mask whose size differs from its image's (naming both files).
        FileNotFoundError: a defective image without its mask.
    """
    cat = MVTecCategory(root)
    items = cat.test_items
    if not items:
        raise ValueError(f"MVTec category {cat.root} has no test images")
    H, W = check_image_size(size)
    n = len(items)
    images = np.empty((n, 3, H, W), dtype=np.uint8)
    regions = np.zeros((n, 1, H, W), dtype=np.int32)

    def _one(i: int) -> None:
        it = items[i]
        img = read_image(it.path)
        if it.mask_path is not None:
            m = read_mask(it.mask_path)
            if m.shape != img.shape[:2]:
                raise ValueError(f"mask {it.mask_path} is {m.shape[1]}x{m.shape[0]} (WxH) but its image "
                                 f"{it.path} is {img.shape[1]}x{img.shape[0]}")
            regions[i, 0] = resize_regions(m, (H, W), keep_aspect)
        images[i] = resize_image(img, (H, W), keep_aspect).transpose(2, 0, 1)

    parallel_map(_one, range(n), workers)
    return TestSet(images=torch.from_numpy(images), regions=torch.from_numpy(regions),
                   labels=torch.tensor([it.label for it in items], dtype=torch.int64),
                   defect_types=[it.defect_type for it in items], paths=[it.path for it in items])


# ----------------------------------------------------------------------------------------------------------------
# sampling on the device


class TrainSampler:
    """Random augmented batches from a decoded image set resident on a device.

    Each epoch is a fresh permutation from ``generator`` (every image once per epoch; a batch spanning two epochs
    takes the rest of one and the start of the next). Per image, independently: a horizontal flip and a vertical
    flip (``flip=True``, p=0.5 each) and a transpose (``rot90=True``, p=0.5, square images only); with both on,
    these draw uniformly from the 8 symmetries of the square; ``rot90`` alone draws uniformly from the 4
    rotations by multiples of 90 degrees (no mirroring). With ``shift=s`` each image is first translated by
    (dy, dx), each uniform in [-s, s], the uncovered band filled by reflection (``reflect``, no edge pixel
    repeated): parts that sit a few pixels apart from one frame to the next.
    The transforms are applied to the whole batch with ``torch.where``, no per-image Python loop, and nothing
    leaves the device.

    Args:
        images: ``uint8 (N, 3, H, W)`` tensor on any device.
        batch_size: images per batch (may exceed N).
        generator: a ``torch.Generator`` (CPU or on the images' device; random numbers are drawn on its device and
            moved), or an int seed for a new CPU generator.
        flip: random horizontal and vertical flips.
        rot90: random 90-degree rotations (needs H == W, or a square ``crop``).
        crop: (h, w): each image of a batch is a random h x w window of its source image (None: whole images).
        shift: the largest translation in pixels (0: none; less than the batch's height and width).
        rows: (start, stop): return only these rows of every batch (one process's share of a global batch of
            ``batch_size``); every random draw is still made for the whole batch, so the shares of all processes
            are exactly the rows of the batch one sampler with ``rows=None`` returns.

    Example:
        >>> s = TrainSampler(images, 32, torch.Generator().manual_seed(0), rot90=True)   # doctest: +SKIP
        >>> x = s.next()                                     # uint8 (32, 3, H, W) on images.device
    """

    def __init__(self, images: torch.Tensor, batch_size: int, generator, flip: bool = True,
                 rot90: bool = False, crop: Sequence[int] | None = None, rows: Sequence[int] | None = None,
                 shift: int = 0):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("images is empty (N == 0)")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if crop is not None:
            crop = check_image_size(crop, "crop")
            if crop[0] > images.shape[2] or crop[1] > images.shape[3]:
                raise ValueError(f"crop {crop[0]}x{crop[1]} is larger than the images "
                                 f"({images.shape[2]}x{images.shape[3]})")
        out_hw = tuple(images.shape[2:]) if crop is None else crop
        if rot90 and out_hw[0] != out_hw[1]:
            raise ValueError(f"rot90=True needs square batches, got H x W = {out_hw[0]} x {out_hw[1]}")
        if isinstance(shift, bool) or int(shift) != shift or not 0 <= int(shift) < min(out_hw):
            raise ValueError(f"shift must be an int in [0, {min(out_hw)}) for {out_hw[0]} x {out_hw[1]} batches "
                             f"(reflection fills at most a side less one), got {shift!r}")
        rows = (0, int(batch_size)) if rows is None else (int(rows[0]), int(rows[1]))
        if not 0 <= rows[0] < rows[1] <= int(batch_size):
            raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= batch_size {batch_size}, "
                             f"got {rows}")
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")
        self.images = images
        self.batch_size = int(batch_size)
        self.generator = generator
        self.flip = bool(flip)
        self.rot90 = bool(rot90)
        self.crop = crop
        self.shift = int(shift)
        self.rows = rows
        self.epoch = 0
        self._perm = None
        self._pos = 0

    def __len__(self) -> int:
        """Batches per epoch (rounded up)."""
        return -(-self.images.shape[0] // self.batch_size)

    def state_dict(self) -> dict:
        """The epoch position (``epoch``, the epoch's permutation ``perm`` on the CPU or None, cursor ``pos``).

        With the generator's own state (``generator.get_state()``, saved by the caller) this resumes bit-exactly.
        """
        perm = None if self._perm is None else self._perm.detach().cpu().clone()
        return {"epoch": int(self.epoch), "perm": perm, "pos": int(self._pos)}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`; the permutation must be one of this set's size."""
        perm = state["perm"]
        if perm is not None and (perm.dim() != 1 or perm.numel() != self.images.shape[0]):
            raise ValueError(f"sampler state is for {perm.numel()} images, this sampler has {self.images.shape[0]}")
        self.epoch = int(state["epoch"])
        self._perm = None if perm is None else perm.to(self.generator.device)
        self._pos = int(state["pos"])

    def _indices(self) -> torch.Tensor:
        n, need, parts = self.images.shape[0], self.batch_size, []
        gdev = self.generator.device
        while need > 0:
            if self._perm is None or self._pos >= n:
                if self._perm is not None:
                    self.epoch += 1
                self._perm = torch.randperm(n, generator=self.generator, device=gdev)
                self._pos = 0
            take = min(need, n - self._pos)
            parts.append(self._perm[self._pos:self._pos + take])
            self._pos += take
            need -= take
        idx = parts[0] if len(parts) == 1 else torch.cat(parts)
        # non_blocking only towards CUDA: a non-blocking device->host copy may be read before it lands
        dst = self.images.device
        return idx.to(dst, non_blocking=dst.type == "cuda")

    def next(self) -> torch.Tensor:
        """The next batch: ``uint8 (B, 3, H, W)`` on the images' device (B = stop - start with ``rows``)."""
        lo, hi = self.rows
        x = self.images.index_select(0, self._indices()[lo:hi])
        if self.crop is not None:
            x = self._random_crop(x)
        if self.shift:
            x = self._random_shift(x)
        if not (self.flip or self.rot90):
            return x
        b, gdev = x.shape[0], self.generator.device
        # one draw of 3 bits per image of the whole batch: transpose, vertical flip, horizontal flip
        bits = torch.randint(0, 2, (self.batch_size, 3), generator=self.generator, device=gdev, dtype=torch.uint8)
        bits = bits[lo:hi].to(x.device, non_blocking=True).bool()
        if self.rot90 and not self.flip:
            # rotations only: transpose, vflip and hflip are reflections, so an even count is a rotation
            bits[:, 2] = bits[:, 0] ^ bits[:, 1]
        bits = bits.view(b, 3, 1, 1, 1)
        if self.rot90:
            x = torch.where(bits[:, 0], x.transpose(-1, -2), x)
        x = torch.where(bits[:, 1], x.flip(-2), x)
        x = torch.where(bits[:, 2], x.flip(-1), x)
        return x.contiguous()

    def _random_crop(self, x: torch.Tensor) -> torch.Tensor:
        """One uniformly placed (h, w) window per image, gathered in one indexing op (no per-image loop)."""
        (H, W), (h, w) = x.shape[-2:], self.crop
        oy, ox = self._per_image(0, H - h + 1, x.device), self._per_image(0, W - w + 1, x.device)
        rows, cols = oy[:, None] + torch.arange(h, device=x.device), ox[:, None] + torch.arange(w, device=x.device)
        return _gather(x, rows, cols)

    def _random_shift(self, x: torch.Tensor) -> torch.Tensor:
        """Each image translated by its own (dy, dx) in [-shift, shift], reflected at the borders; one gather."""
        (H, W), s = x.shape[-2:], self.shift
        dy, dx = self._per_image(-s, s + 1, x.device), self._per_image(-s, s + 1, x.device)
        return _gather(x, _reflect(torch.arange(H, device=x.device) - dy[:, None], H),
                       _reflect(torch.arange(W, device=x.device) - dx[:, None], W))

    def _per_image(self, low: int, high: int, device) -> torch.Tensor:
        """One int in [low, high) per image of the whole batch from the generator, this sampler's rows, on device."""
        (lo, hi), gdev = self.rows, self.generator.device
        return torch.randint(low, high, (self.batch_size,), generator=self.generator, device=gdev)[lo:hi].to(device)

    __next__ = next

    def __iter__(self):
        return self


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]]``: per-image source rows (B, h) and columns (B, w)."""
    bi = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return x[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into [0, n) without repeating the edge (-1 -> 1, n -> n - 2); |overshoot| < n."""
    return (n - 1) - ((n - 1) - i.abs()).abs()
