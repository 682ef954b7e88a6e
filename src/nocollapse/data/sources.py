"""Image sources: where the pixels of one split come from.

Two kinds, behind one small interface (``len``, ``labels``, ``load(i)``):

* :class:`InMemoryImages` holds a whole split as one ``uint8`` tensor ``[N, 3, H, W]``. Small
  datasets (digits, CIFAR, SVHN, an ImageFolder of small images) are decoded once into it, so an
  epoch costs no decoding and a batch is one tensor index.
* :class:`ImageFiles` keeps paths and decodes on demand (large ImageFolder datasets).

Decoding goes through :func:`decode_image`, which turns a corrupt or truncated file into a
:class:`BadImageError` naming the file, so the caller can skip it with a counted warning or fail.
:func:`decode_files` can keep what it decoded in a cache directory, one file per split keyed by
the files' paths, labels, sizes and modification times, so that the next run over unchanged
files reads one tensor instead of decoding every image again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..utils.checkpoint import atomic_save, describe_unreadable

log = logging.getLogger(__name__)


class BadImageError(ValueError):
    """An image file that cannot be decoded."""


def _square(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic), then centre-crop to ``size x size``."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


# Pillow's integer grey modes: 16-bit (PNG, TIFF) and 32-bit ("I", how some readers return 16-bit
# data). convert("RGB") clips them at 255, which turns almost every pixel of a 16-bit image white.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(img: Image.Image, path: str | Path) -> Image.Image:
    """``img`` as 8-bit RGB. Integer grey modes are scaled from the 16-bit range to 8 bits
    (v * 255 / 65535, rounded; 32-bit values clipped to that range first); a floating-point
    image has no standard range, so it is refused rather than guessed."""
    if img.mode in _WIDE_INTEGER_MODES:
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        raise BadImageError(f"cannot decode image {path}: a 32-bit floating-point image (mode F) has no "
                            f"standard range of values; convert it to 8- or 16-bit")
    return img.convert("RGB")


def decode_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Decode ``path`` to RGB (resized so the shorter side is ``size`` and centre-cropped to a
    square when ``size`` is given); 16-bit and other integer grey images are scaled to 8 bits.
    Raises :class:`BadImageError` naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            img = _to_rgb(img, path)
    except BadImageError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"cannot decode image {path}: {exc}") from exc
    if size is not None and img.size != (size, size):
        img = _square(img, size)
    return img


@dataclass
class InMemoryImages:
    """A split decoded into memory: ``images`` uint8 ``[N, 3, H, W]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {tuple(self.images.shape)} "
                             f"{self.images.dtype}")
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index].permute(1, 2, 0).numpy())

    def subset(self, indices: torch.Tensor) -> "InMemoryImages":
        return InMemoryImages(self.images[indices], self.labels[indices], list(self.skipped))


@dataclass
class ImageFiles:
    """A split read from image files on demand."""

    paths: list[str]
    labels: torch.Tensor
    image_size: int | None = None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return decode_image(self.paths[index], self.image_size)

    def subset(self, indices: torch.Tensor) -> "ImageFiles":
        idx = indices.tolist()
        return ImageFiles([self.paths[i] for i in idx], self.labels[indices], self.image_size,
                          list(self.skipped))


ImageSource = InMemoryImages | ImageFiles


# Bumped whenever the layout of a cache file changes, so that old files are never misread.
DECODE_CACHE_FORMAT = 1


def decode_cache_key(paths: Sequence[str], labels: Sequence[int], size: int | None) -> str | None:
    """A digest of everything a decoded split depends on: each file's absolute path, label, byte
    size and modification time, the requested size and the cache format. None when a file cannot
    be stat'ed (then nothing is cached, and decoding reports the file)."""
    digest = hashlib.sha256(f"format {DECODE_CACHE_FORMAT} size {size}\n".encode())
    try:
        for path, label in zip(paths, labels):
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return digest.hexdigest()


def _load_decoded(file: Path, bad_images: str) -> InMemoryImages | None:
    """The split cached in ``file``, or None (with a warning) when it cannot be read."""
    # a truncated or foreign file costs a warning: the split is decoded again and overwrites it
    try:
        cached = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("ignoring unreadable decoded-image cache: %s %s; decoding again", file,
                    describe_unreadable(file, exc))
        return None
    try:
        split = InMemoryImages(cached["images"], cached["labels"], list(cached["skipped"]))
    except Exception as exc:
        log.warning("ignoring unreadable decoded-image cache: %s holds no decoded split (%s: %s); "
                    "decoding again", file, type(exc).__name__, exc)
        return None
    if split.skipped and bad_images == "fail":
        decode_image(split.skipped[0])  # raises the BadImageError that decoding would have raised
        return None  # the file reads now after all: decode the split again
    for path in split.skipped:
        log.warning("skipping unreadable image %s (recorded in the decoded-image cache)", path)
    return split


def decode_files(paths: Sequence[str], labels: Sequence[int], size: int | None,
                 bad_images: str = "skip", threads: int = 4,
                 cache_dir: str | Path | None = None) -> InMemoryImages:
    """Decode image files once into an :class:`InMemoryImages`.

    Without ``size``, images of mixed sizes are resized (shorter side) and centre-cropped to the
    most common square side, with a warning; pass ``size`` to choose it. Unreadable files
    are skipped (``bad_images="skip"``, each logged and counted in ``skipped``) or raise.
    With ``cache_dir``, the split is read from there when the same files (same paths, labels,
    sizes and modification times) were decoded at the same ``size`` before, and written there
    otherwise; a cache that cannot be read or written costs only a warning.
    """
    key = decode_cache_key(paths, labels, size) if cache_dir is not None else None
    file = Path(cache_dir) / f"{key}.pt" if key is not None else None
    if file is not None and file.is_file():
        split = _load_decoded(file, bad_images)
        if split is not None:
            log.info("read %d decoded images from %s", len(split), file)
            return split
    split = _decode(paths, labels, size, bad_images, threads)
    if file is not None:
        try:
            atomic_save({"images": split.images, "labels": split.labels, "skipped": split.skipped}, file)
        except OSError as exc:
            log.warning("could not write the decoded-image cache %s (%s); the next run decodes again",
                        file, exc)
    return split


def _decode(paths: Sequence[str], labels: Sequence[int], size: int | None, bad_images: str,
            threads: int) -> InMemoryImages:
    """Decode every file (``threads`` at a time) and stack the readable ones; see decode_files."""
    def work(path: str) -> np.ndarray | BadImageError:
        try:
            return np.asarray(decode_image(path, size))
        except BadImageError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        decoded = list(pool.map(work, paths, chunksize=256))
    arrays, kept_labels, skipped = [], [], []
    for path, label, item in zip(paths, labels, decoded):
        if isinstance(item, BadImageError):
            if bad_images == "fail":
                raise item
            log.warning("skipping unreadable image %s (%s)", path, item.__cause__)
            skipped.append(path)
            continue
        arrays.append(item)
        kept_labels.append(label)
    if not arrays:
        raise ValueError(f"no readable image among {len(paths)} files")
    shapes = Counter(a.shape[:2] for a in arrays)
    (h, w), _ = shapes.most_common(1)[0]
    if len(shapes) > 1 or h != w:
        # Mixed or non-square sizes: resize (shorter side) and centre-crop every image to the most
        # common size's shorter side, as decode_image does for an explicit size.
        side = min(h, w)
        log.warning("images differ in size (%d sizes, most common %dx%d); resizing all to %d px "
                    "(set data.image_size to choose)", len(shapes), w, h, side)
        arrays = [a if a.shape[:2] == (side, side) else np.asarray(_square(Image.fromarray(a), side))
                  for a in arrays]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return InMemoryImages(images, torch.tensor(kept_labels, dtype=torch.long), skipped)
