"""Reading image files and masks: one definition of decoding, channel handling and resizing.

Every loader of the package (the cv2 thread loader, the DALI pipelines, :func:`fae_fast.data.load_images`)
follows the rules written here, so that an image read for training, for a benchmark or inline looks the same:

* **Decoding**: ``cv2.imdecode`` of the file's bytes (read through ``os.open``, so non-ASCII paths work on
  every OS) with ``IMREAD_UNCHANGED``; EXIF orientation is therefore *ignored* (the DALI path sets
  ``adjust_orientation=False`` to agree). Output is always ``uint8 (H, W, 3)`` RGB.
* **Channels**: grey is replicated to 3 channels; grey+alpha keeps the grey; RGBA **drops the alpha channel**
  (what DALI's decoder and ``IMREAD_COLOR`` do, so both loaders agree; no compositing).
* **Depth**: 16-bit is scaled to 8-bit by ``round(v / 257)``; float images are taken as ``[0, 1]``, NaN -> 0,
  clipped, then scaled by 255 and rounded. Other integer depths raise ``ValueError``.
* **Safety**: only regular files are read (a FIFO or device named ``frame.png`` is refused, never waited on),
  and an image whose header declares more than :func:`max_image_pixels` pixels (default 100 MP, environment
  variable ``FAE_FAST_MAX_IMAGE_PIXELS``) is refused before it is decoded: a 400 KB PNG can declare 20000 x 20000
  pixels (1.2 GB decoded). PNG, JPEG, BMP, TIFF and WebP headers are parsed; other data is checked after decoding.
* **Resizing** to ``size=(H, W)`` is per axis: an axis that shrinks uses ``INTER_AREA`` (no aliasing), an axis
  that grows uses ``INTER_LINEAR`` (two passes when one axis shrinks and the other grows).
* **keep_aspect=True**: the image is resized to the largest size that fits inside ``(H, W)`` with its ratio
  kept (the limiting side is exact, the other is ``round(side * scale)``), centred (extra pixel of an odd
  margin goes bottom/right) and padded by reflection without repeating the edge pixel (``BORDER_REFLECT_101``,
  numpy's and torch's ``"reflect"``; periodic when the margin exceeds the image).
* **Masks**: a pixel is defect when its value is > 127 (any channel for colour masks); resizing averages the
  binary mask over each target pixel (``INTER_AREA`` / ``INTER_LINEAR`` like images) and keeps a target pixel as
  defect when at least half of it is defect: centred (no half-pixel shift like ``INTER_NEAREST``), and a
  one-pixel scratch survives a 2x shrink. With ``keep_aspect`` the mask is reflected like its image, so the
  mirrored defect that appears in the padded image is also in its mask.

Example:
    >>> img = read_image("part.png", size=(256, 256))            # doctest: +SKIP
    >>> img.shape, img.dtype
    ((256, 256, 3), dtype('uint8'))
"""
from __future__ import annotations

import logging
import os
import pathlib
import stat
import struct
from typing import Sequence, Union

import cv2
import numpy as np

from ..config import check_image_size

__all__ = [
    "map_to_original",
    "IMAGE_EXTS", "ImageList", "list_images", "read_image", "read_mask", "decode_image", "resize_image",
    "resize_mask", "resize_regions", "fit_inside", "reflect_indices", "check_image_file", "sniff_format",
    "header_size", "image_size_of", "max_image_pixels", "DEFAULT_MAX_IMAGE_PIXELS", "open_regular_file",
]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: File extensions treated as images (lower case, with the dot).
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_ON_ERROR = ("raise", "skip")

#: Decoded pixels (H * W) allowed per image unless ``FAE_FAST_MAX_IMAGE_PIXELS`` says otherwise.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
_MAX_PIXELS_ENV = "FAE_FAST_MAX_IMAGE_PIXELS"


class ImageList(list):
    """A sorted ``list[pathlib.Path]`` of images with the files that were skipped alongside.

    Attributes:
        folder: the folder that was listed.
        skipped: ``list[tuple[pathlib.Path, str]]``, each skipped file with the reason; empty unless
            ``on_error="skip"`` was asked and something was skipped.
    """

    def __init__(self, paths, folder: pathlib.Path, skipped=None):
        super().__init__(paths)
        self.folder = folder
        self.skipped: list[tuple[pathlib.Path, str]] = list(skipped or [])


def _check_on_error(on_error: str) -> None:
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")




def list_images(folder: PathLike, on_error: str = "raise") -> ImageList:
    """The image files directly inside ``folder``, sorted by name.

    Hidden files (``.DS_Store``, ``._x.png``) and sub-folders are ignored; any other file whose extension is not
    in :data:`IMAGE_EXTS`, and anything that is not a regular file (a FIFO named ``frame.png``), is an error,
    or with ``on_error="skip"`` is left out and reported in ``.skipped`` (and logged once per call), never
    silently.

    Args:
        folder: the folder to list.
        on_error: ``"raise"`` or ``"skip"`` for non-image files.

    Returns:
        An :class:`ImageList` (a ``list[pathlib.Path]`` with ``.skipped`` and ``.folder``).

    Raises:
        FileNotFoundError: the folder does not exist. NotADirectoryError: it is a file.
        ValueError: a non-image file (``on_error="raise"``), or no image at all in the folder.
    """
    _check_on_error(on_error)
    folder = pathlib.Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder of images: {folder}")
    paths, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if not p.is_file():  # a FIFO, socket, device or broken link: reading it could hang or fail
            if on_error == "raise":
                raise ValueError(f"not a regular file (a pipe, socket, device or broken link?): {p}; "
                                 f"pass on_error='skip' to leave it out")
            skipped.append((p, "not a regular file"))
        elif p.suffix.lower() in IMAGE_EXTS:
            paths.append(p)
        elif on_error == "raise":
            raise ValueError(f"not an image file (extension {p.suffix or '<none>'!r} is not one of "
                             f"{', '.join(IMAGE_EXTS)}): {p}; pass on_error='skip' to leave it out")
        else:
            skipped.append((p, f"not an image extension {p.suffix or '<none>'!r}"))
    if not paths:
        extra = f" ({len(skipped)} non-image files skipped)" if skipped else ""
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTS)}) in folder {folder}{extra}")
    if skipped:
        log.warning("skipped %d file(s) in %s, first: %s", len(skipped), folder, skipped[0][0].name)
    return ImageList(paths, folder, skipped)


# ----------------------------------------------------------------------------------------------------------------
# decoding


def decode_image(buf, name: PathLike = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes to ``uint8 (H, W, 3)`` RGB with the module's channel and depth rules.

    Args:
        buf: encoded bytes (``bytes``, ``bytearray`` or a 1-D ``uint8`` array).
        name: what to call the source in error messages (usually its path).

    Raises:
        ValueError: empty, corrupt, truncated or unsupported data, naming ``name``.
    """
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"empty image file (0 bytes): {name}")
    hw = header_size(arr)
    if hw is not None:
        _check_pixels(*hw, name)
    try:
        img = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # some codecs assert instead of returning None
        raise ValueError(f"cannot decode image (corrupt or truncated?): {name}: {e}") from None
    if img is None or img.size == 0:
        raise ValueError(f"cannot decode image (corrupt, truncated or unsupported format): {name}")
    _check_pixels(img.shape[0], img.shape[1], name)  # formats whose header was not parsed
    return _to_rgb8(img, name)


def max_image_pixels() -> int:
    """Pixels (H * W) an image may have: ``FAE_FAST_MAX_IMAGE_PIXELS`` if set, else 100 MP."""
    text = os.environ.get(_MAX_PIXELS_ENV)
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        n = int(float(text))
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{_MAX_PIXELS_ENV} must be a positive number of pixels, got {text!r}")
    return n


def _check_pixels(h: int, w: int, name) -> None:
    limit = max_image_pixels()
    if h * w > limit:
        raise ValueError(f"image too large: {name} is {w}x{h} (WxH) = {h * w / 1e6:.1f} MP, above the limit of "
                         f"{limit / 1e6:.1f} MP (set {_MAX_PIXELS_ENV} to raise it)")


def _to_rgb8(img: np.ndarray, name) -> np.ndarray:
    # depth first (fewer bytes to shuffle afterwards)
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64, np.float16):
        img = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        img = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {img.dtype} (expected 8/16-bit or float): {name}")
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.ndim != 3:
        raise ValueError(f"unsupported image layout {img.shape}: {name}")
    c = img.shape[2]
    if c in (1, 2):  # grey or grey+alpha: the alpha is dropped
        return np.ascontiguousarray(np.repeat(img[:, :, :1], 3, axis=2))
    if c == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if c == 4:  # BGRA: alpha dropped, not composited (agrees with DALI's decoder)
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise ValueError(f"unsupported number of channels {c}: {name}")


def open_regular_file(path: PathLike, what: str = "image file"):
    """Open ``path`` for binary reading if it is a regular file; anything else is refused without waiting.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO (which would
    block a plain open or read for ever) or a device is refused, and nothing can swap the file between the check
    and the read. Used for images, masks, model files and training states alike.

    Args:
        path: the file.
        what: what to call it in errors (``"image file"``, ``"model file"``...).

    Returns:
        A binary file object (the caller closes it; ``with open_regular_file(p) as f:``).

    Raises:
        FileNotFoundError: no such file. IsADirectoryError: a folder. ValueError: a FIFO, socket or device;
        each naming ``path``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:  # Windows; on POSIX a folder opens and fstat says so below
        raise IsADirectoryError(f"expected an {what}, got a folder: {path}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"expected an {what}, got a folder: {path}")
        raise ValueError(f"not a regular file (a pipe, socket or device?): {path}")
    return os.fdopen(fd, "rb")


def _read_bytes(path: pathlib.Path, what: str = "image file", limit: int | None = None) -> np.ndarray:
    """The bytes of a regular file (at most ``limit``) as ``uint8``, read through :func:`open_regular_file`."""
    with open_regular_file(path, what) as f:
        return np.frombuffer(f.read(-1 if limit is None else limit), dtype=np.uint8)


def read_image(path: PathLike, size: Sequence[int] | None = None, keep_aspect: bool = False) -> np.ndarray:
    """Reads one image file as ``uint8 (H, W, 3)`` RGB, optionally resized (see the module rules).

    Args:
        path: the image file.
        size: ``(H, W)`` of the output, or None for the native size.
        keep_aspect: fit inside ``size`` keeping the ratio and reflect-pad, instead of stretching.

    Returns:
        ``np.ndarray`` ``uint8`` of shape ``(H, W, 3)``, RGB, C-contiguous.

    Raises:
        FileNotFoundError: no such file. ValueError: a zero-byte, corrupt, truncated or unsupported file, one
            that is not a regular file, or one above :func:`max_image_pixels`, naming it.
    """
    path = pathlib.Path(path)
    img = decode_image(_read_bytes(path), path)
    if size is not None:
        img = resize_image(img, size, keep_aspect)
    return img


def read_mask(path: PathLike, size: Sequence[int] | None = None, keep_aspect: bool = False) -> np.ndarray:
    """Reads a ground-truth mask as ``bool (H, W)``: value > 127 is defect (see the module rules for resizing).

    Args:
        path: the mask file (MVTec: ``ground_truth/<defect>/<stem>_mask.png``).
        size: ``(H, W)`` of the output, or None for the native size.
        keep_aspect: resize like an image read with ``keep_aspect=True`` (fit, centre, reflect).

    Raises:
        FileNotFoundError: the mask does not exist (the message names the expected path).
        ValueError: an unreadable mask, naming it.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mask not found, expected at: {path}")
    arr = _read_bytes(path, "mask")
    if arr.size == 0:
        raise ValueError(f"empty mask file (0 bytes): {path}")
    hw = header_size(arr)
    if hw is not None:
        _check_pixels(*hw, path)
    try:
        m = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise ValueError(f"cannot decode mask: {path}: {e}") from None
    if m is None:
        raise ValueError(f"cannot decode mask (corrupt or unsupported format): {path}")
    if m.dtype == np.uint16:  # same scale as images, so "> 127" means the same thing
        m = (m.astype(np.uint32) + 128) // 257
    elif m.dtype.kind == "f":
        m = np.nan_to_num(m) * 255.0
    if m.ndim == 3:
        m = m[:, :, :3].max(axis=2) if m.shape[2] >= 3 else m[:, :, 0]
    mask = m > 127
    if size is not None:
        mask = resize_mask(mask, size, keep_aspect)
    return mask


# ----------------------------------------------------------------------------------------------------------------
# geometry


def fit_inside(h: int, w: int, size: Sequence[int]) -> tuple[int, int]:
    """``(h', w')`` of an ``h x w`` image scaled to fit inside ``size=(H, W)`` with its ratio kept.

    The limiting side is exact; the other is ``round(side * scale)`` (half away from zero), clamped to
    ``[1, limit]``. This is the rule of every loader of the package (the DALI path computes the same numbers).
    """
    H, W = check_image_size(size)
    sh, sw = H / h, W / w
    if sh <= sw:
        return H, max(1, min(W, int(np.floor(w * sh + 0.5))))
    return max(1, min(H, int(np.floor(h * sw + 0.5)))), W


def reflect_indices(n_out: int, offset: int, n_in: int) -> np.ndarray:
    """Source indices of a reflect-101 pad: output ``i`` reads input ``reflect(i - offset)`` of ``n_in``.

    Periodic when the margin exceeds the input (what ``cv2.BORDER_REFLECT_101`` does).
    """
    i = np.arange(n_out, dtype=np.int64) - offset
    if n_in == 1:
        return np.zeros(n_out, dtype=np.int64)
    period = 2 * (n_in - 1)
    i = np.abs(np.mod(i, period))
    return np.where(i >= n_in, period - i, i)


def _resize_axes(img: np.ndarray, h: int, w: int) -> np.ndarray:
    ih, iw = img.shape[:2]
    if (ih, iw) == (h, w):
        return img
    # an axis that shrinks is area-averaged, one that grows is interpolated: two passes when they disagree
    mh, mw = min(ih, h), min(iw, w)
    if (mh, mw) != (ih, iw):
        img = cv2.resize(img, (mw, mh), interpolation=cv2.INTER_AREA)
    if (mh, mw) != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return img


def _pad_reflect(img: np.ndarray, H: int, W: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (H, W):
        return img
    top, left = (H - h) // 2, (W - w) // 2
    rows = reflect_indices(H, top, h)
    cols = reflect_indices(W, left, w)
    return np.ascontiguousarray(img[rows[:, None], cols[None, :]])


def resize_image(img: np.ndarray, size: Sequence[int], keep_aspect: bool = False) -> np.ndarray:
    """Resizes a ``(h, w[, C])`` ``uint8`` array to ``size=(H, W)`` with the module rules (stretch or fit + pad)."""
    H, W = check_image_size(size)
    h, w = img.shape[:2]
    if keep_aspect:
        nh, nw = fit_inside(h, w, (H, W))
        return _pad_reflect(_resize_axes(img, nh, nw), H, W)
    return _resize_axes(img, H, W)


def _mask_share(mask: np.ndarray, size: Sequence[int], keep_aspect: bool) -> np.ndarray:
    """The fraction of each target pixel that ``mask`` covers (area/linear), padded like its image."""
    H, W = check_image_size(size)
    h, w = mask.shape[:2]
    nh, nw = fit_inside(h, w, (H, W)) if keep_aspect else (H, W)
    share = mask.astype(np.float32)
    if (nh, nw) != (h, w):
        share = _resize_axes(share, nh, nw)
    return _pad_reflect(share, H, W) if keep_aspect else np.ascontiguousarray(share)


def resize_mask(mask: np.ndarray, size: Sequence[int], keep_aspect: bool = False) -> np.ndarray:
    """Resizes a ``bool (h, w)`` mask: fraction of defect per target pixel (area/linear), kept when >= 0.5."""
    return _mask_share(mask, size, keep_aspect) >= 0.5 - 1e-6  # float rounding of an exact half must not flip it


def resize_regions(mask: np.ndarray, size: Sequence[int], keep_aspect: bool = False) -> np.ndarray:
    """The defects of a ``bool (h, w)`` mask as ``int32 (H, W)`` region ids, found where the mask was drawn.

    Regions are the mask's 8-connected components at its own size. The resized mask is :func:`resize_mask`'s
    (ids > 0 exactly there); each of its pixels takes the id of the region that covers most of it. A crack a few
    pixels wide, shrunk 2x, breaks into slivers: as components of the resized mask each would weigh as much as
    the whole crack in AU-PRO; here they stay one defect, as in MVTec AD's evaluation at the native size.
    """
    keep = resize_mask(mask, size, keep_aspect)
    n, lab = cv2.connectedComponents(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=8)
    out = keep.astype(np.int32)
    if n > 2:
        best = np.zeros(keep.shape, np.float32)
        for r in range(1, n):
            share = _mask_share(lab == r, size, keep_aspect)
            more = share > best
            out[more], best[more] = r, share[more]
        out[~keep] = 0
    return out


# ----------------------------------------------------------------------------------------------------------------
# cheap checks before a decoder that cannot name the file (DALI)

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff_format(head: bytes) -> str | None:
    """The format named by a file's first bytes (``"jpeg"``, ``"png"``, ``"bmp"``, ``"tiff"``, ``"webp"``)."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(buf) -> tuple[int, int] | None:
    """``(H, W)`` declared by an encoded image's header, without decoding it.

    Parses PNG (IHDR), JPEG (the first start-of-frame marker), BMP, TIFF (the first page) and WebP (VP8, VP8L,
    VP8X). Cheap: reads a few dozen bytes (JPEG walks its segment headers, TIFF its first directory).

    Args:
        buf: the file's bytes, or its first bytes (bytes-like or a ``uint8`` array).

    Returns:
        ``(H, W)``, or None for another format or a header that cannot be read from ``buf``.
    """
    buf = memoryview(np.ascontiguousarray(buf) if isinstance(buf, np.ndarray) else buf).cast("B")
    try:
        fmt = sniff_format(bytes(buf[:16]))
        if fmt == "png" and bytes(buf[12:16]) == b"IHDR":
            w, h = struct.unpack_from(">II", buf, 16)
            return h, w
        if fmt == "bmp":
            if struct.unpack_from("<I", buf, 14)[0] == 12:  # BITMAPCOREHEADER
                w, h = struct.unpack_from("<HH", buf, 18)
            else:
                w, h = struct.unpack_from("<ii", buf, 18)  # height < 0: a top-down bitmap
            return abs(h), abs(w)
        if fmt == "jpeg":
            return _jpeg_size(buf)
        if fmt == "tiff":
            return _tiff_size(buf)
        if fmt == "webp":
            chunk = bytes(buf[12:16])
            if chunk == b"VP8 " and bytes(buf[23:26]) == b"\x9d\x01\x2a":
                w, h = struct.unpack_from("<HH", buf, 26)
                return h & 0x3FFF, w & 0x3FFF
            if chunk == b"VP8L":
                bits = struct.unpack_from("<I", buf, 21)[0]
                return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
            if chunk == b"VP8X":
                w = int.from_bytes(bytes(buf[24:27]), "little") + 1
                h = int.from_bytes(bytes(buf[27:30]), "little") + 1
                return h, w
    except struct.error:  # shorter than its header claims: the decoder will say what is wrong
        return None
    return None


def _jpeg_size(buf) -> tuple[int, int] | None:
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        if marker in _JPEG_SOF:
            h, w = struct.unpack_from(">HH", buf, i + 5)
            return h, w
        i += 2 + struct.unpack_from(">H", buf, i + 2)[0]
    return None


def _tiff_size(buf) -> tuple[int, int] | None:
    e = "<" if bytes(buf[:2]) == b"II" else ">"
    ifd = struct.unpack_from(e + "I", buf, 4)[0]
    count = struct.unpack_from(e + "H", buf, ifd)[0]
    dims = {}
    for k in range(count):
        tag, typ = struct.unpack_from(e + "HH", buf, ifd + 2 + 12 * k)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            dims[tag] = struct.unpack_from(e + ("H" if typ == 3 else "I"), buf, ifd + 2 + 12 * k + 8)[0]
    return (dims[257], dims[256]) if len(dims) == 2 else None


def image_size_of(path: PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image file, from its header when it can be parsed (see :func:`header_size`), else by
    decoding it (within :func:`max_image_pixels`).

    Raises:
        FileNotFoundError: no such file. ValueError: not a regular file, or not a readable image, naming it.
    """
    path = pathlib.Path(path)
    hw = header_size(_read_bytes(path, limit=65536))
    if hw is None:  # a TIFF directory or JPEG frame header past the first 64 KiB, or another format
        data = _read_bytes(path)
        hw = header_size(data)
        if hw is None:
            hw = decode_image(data, path).shape[:2]
    if min(hw) < 1:
        raise ValueError(f"image header declares {hw[1]}x{hw[0]} (WxH) pixels: {path}")
    return int(hw[0]), int(hw[1])


def check_image_file(path: PathLike) -> tuple[str | None, str | None]:
    """Cheap structural check of an image file without decoding it.

    Reads the first and, for JPEG and PNG, the last 64 KiB: a JPEG must have its end-of-image marker after the
    last start-of-scan marker (entropy-coded data cannot contain ``FF D9``, so a truncated file fails even when
    an EXIF thumbnail has its own); a PNG must end with its ``IEND`` chunk; the size its header declares must be
    within :func:`max_image_pixels` (a decoder that cannot name the file must not be handed a pixel bomb).

    Returns:
        ``(format, None)`` when the file looks whole, ``(format_or_None, reason)`` when it does not.
    """
    path = pathlib.Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, "file not found"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    n = st.st_size
    if n == 0:
        return None, "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(65536)
        fmt = sniff_format(head[:16])
        if fmt is None:
            return None, "not an image (unknown header bytes)"
        if fmt in ("jpeg", "png"):
            f.seek(max(0, n - 65536))
            tail = f.read()
    if fmt == "jpeg":
        eoi, sos = tail.rfind(b"\xff\xd9"), tail.rfind(b"\xff\xda")
        if eoi < 0 or eoi < sos:
            return fmt, "truncated JPEG (no end-of-image marker after the last scan)"
    elif fmt == "png" and b"IEND" not in tail[-64:]:
        return fmt, "truncated PNG (no IEND chunk at the end)"
    hw = header_size(head)
    if hw is not None:
        try:
            _check_pixels(*hw, path)
        except ValueError as e:
            return fmt, str(e)
    return fmt, None


def map_to_original(amap: np.ndarray, original_hw: Sequence[int], keep_aspect: bool = False) -> np.ndarray:
    """Brings a float ``(H, W)`` map at the model's size back onto the original ``(h, w)`` image.

    The inverse of :func:`resize_image`'s geometry: with ``keep_aspect`` the padding is cropped first, then the
    map is interpolated bilinearly (a map is smooth; area-averaging would lower its peaks).
    """
    H, W = amap.shape[:2]
    h, w = int(original_hw[0]), int(original_hw[1])
    if keep_aspect:
        nh, nw = fit_inside(h, w, (H, W))
        top, left = (H - nh) // 2, (W - nw) // 2
        amap = amap[top:top + nh, left:left + nw]
    if amap.shape[:2] == (h, w):
        return np.ascontiguousarray(amap, dtype=np.float32)
    return cv2.resize(np.ascontiguousarray(amap, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
