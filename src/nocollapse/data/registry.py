"""Dataset registry: ``digits`` (offline default), torchvision datasets and ImageFolder trees.

Every entry returns a :class:`DatasetSplits`: the images used for self-supervised training,
the labelled train / test splits used for evaluation, class names and normalisation statistics.
torchvision datasets never download unless ``data.download`` is true; a missing dataset fails
with a message that says where it looked and how to get it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import LABEL_KEYS, DataConfig
from ..utils.registry import DATASETS
from .sources import ImageFiles, ImageSource, InMemoryImages, decode_files

log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that is not on disk, with a message saying where we looked and how to fix it."""


@dataclass
class DatasetSplits:
    name: str
    ssl_train: ImageSource      # images the self-supervised method trains on
    train: ImageSource          # labelled training split (k-NN memory bank, linear probe)
    test: ImageSource           # labelled test split
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # the labelled train split before long-tail subsampling (None when the data were not subsampled);
    # ``nocollapse eval --balanced-train`` fits k-NN and the probe on it
    full_train: ImageSource | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int | None:
        size = getattr(self.ssl_train, "image_size", None)
        return int(size) if size is not None else None

    def class_counts(self) -> list[int]:
        return torch.bincount(self.train.labels, minlength=self.num_classes).tolist()


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its loader and the ``data.*`` keys it reads.

    ``reads_keys`` are the dataset-specific keys (the keys every dataset honours -- ``dataset``,
    ``imbalance_ratio``, ``long_tail_seed``, ``num_workers``, ``bad_images`` and the label-subset
    keys -- are always read);
    setting another one draws a warning. ``required`` lists keys that must be set, each with
    what to set it to."""

    load: Callable[[DataConfig], "DatasetSplits"]
    reads_keys: frozenset[str] = frozenset()
    required: tuple[tuple[str, str], ...] = ()

    ALWAYS_READ = frozenset({"dataset", "imbalance_ratio", "long_tail_seed", "num_workers", "bad_images",
                             *(key.split(".", 1)[1] for key in LABEL_KEYS)})

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads_keys", frozenset(self.reads_keys) | self.ALWAYS_READ)

    def check(self, cfg: DataConfig) -> str | None:
        """A message naming the first required key that is missing, or None."""
        for key, what in self.required:
            if getattr(cfg, key) in (None, ""):
                return f"data.dataset={cfg.dataset} needs data.{key}: {what}"
        return None


def default_root() -> Path:
    return Path(os.environ.get("NOCOLLAPSE_DATA", "data"))


def _root(cfg: DataConfig) -> Path:
    return Path(cfg.root) if cfg.root else default_root()


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# --------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 handwritten digits, the offline default
# --------------------------------------------------------------------------------------------

def _digits(cfg: DataConfig) -> DatasetSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    size = cfg.image_size or 16
    # 0..16 grey levels -> 0..255, upsampled (bilinear) to size x size, replicated to RGB.
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.digits_test_fraction, stratify=bunch.target,
        random_state=0)
    train = InMemoryImages(images[torch.from_numpy(train_idx)], labels[torch.from_numpy(train_idx)])
    test = InMemoryImages(images[torch.from_numpy(test_idx)], labels[torch.from_numpy(test_idx)])
    mean, std = _channel_stats(train.images)
    return DatasetSplits("digits", train, train, test, [str(i) for i in range(10)], mean, std)


# --------------------------------------------------------------------------------------------
# torchvision datasets (no download unless asked)
# --------------------------------------------------------------------------------------------

_TV_HINTS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
    "svhn": "train_32x32.mat / test_32x32.mat",
}


def _torchvision(name: str, factory: Callable, cfg: DataConfig, split_kwargs: dict) -> object:
    root = _root(cfg)
    try:
        return factory(root=str(root), download=cfg.download, **split_kwargs)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower() and "corrupted" not in str(exc).lower():
            raise
        raise DatasetNotFoundError(
            f"{name} was not found in {root.resolve()} (looked for {_TV_HINTS[name]}). "
            f"Download it with --set data.download=true (needs internet), or point data.root at "
            f"the folder that holds it (or set NOCOLLAPSE_DATA). A copy as class folders can be used "
            f"with data.dataset=imagefolder data.root=<folder with train/ and test/>.") from None


def _from_hwc(data: np.ndarray, labels) -> InMemoryImages:
    images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()
    return InMemoryImages(images, torch.as_tensor(np.asarray(labels), dtype=torch.long))


def _from_chw(data: np.ndarray, labels) -> InMemoryImages:
    return InMemoryImages(torch.from_numpy(np.ascontiguousarray(data)),
                          torch.as_tensor(np.asarray(labels), dtype=torch.long))


def _resized(src: InMemoryImages, size: int | None) -> InMemoryImages:
    if size is None or size == src.image_size:
        return src
    x = torch.nn.functional.interpolate(src.images.float(), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return InMemoryImages(x.round().clamp(0, 255).to(torch.uint8), src.labels)


def _cifar(cfg: DataConfig, hundred: bool) -> DatasetSplits:
    from torchvision import datasets

    name = "cifar100" if hundred else "cifar10"
    factory = datasets.CIFAR100 if hundred else datasets.CIFAR10
    tr = _torchvision(name, factory, cfg, {"train": True})
    te = _torchvision(name, factory, cfg, {"train": False})
    train = _resized(_from_hwc(tr.data, tr.targets), cfg.image_size)
    test = _resized(_from_hwc(te.data, te.targets), cfg.image_size)
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if hundred else (CIFAR10_MEAN, CIFAR10_STD)
    return DatasetSplits(name, train, train, test, list(tr.classes), mean, std)


def _svhn(cfg: DataConfig) -> DatasetSplits:
    from torchvision import datasets

    tr = _torchvision("svhn", datasets.SVHN, cfg, {"split": "train"})
    te = _torchvision("svhn", datasets.SVHN, cfg, {"split": "test"})
    train = _resized(_from_chw(tr.data, tr.labels), cfg.image_size)
    test = _resized(_from_chw(te.data, te.labels), cfg.image_size)
    return DatasetSplits("svhn", train, train, test, [str(i) for i in range(10)],
                         (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))


def _stl10(cfg: DataConfig) -> DatasetSplits:
    from torchvision import datasets

    unl = _torchvision("stl10", datasets.STL10, cfg, {"split": "train+unlabeled"})
    tr = _torchvision("stl10", datasets.STL10, cfg, {"split": "train"})
    te = _torchvision("stl10", datasets.STL10, cfg, {"split": "test"})
    # the unlabelled split's samples keep the label -1 (torchvision's marker): never a class
    ssl = _resized(_from_chw(unl.data, unl.labels), cfg.image_size)
    train = _resized(_from_chw(tr.data, tr.labels), cfg.image_size)
    test = _resized(_from_chw(te.data, te.labels), cfg.image_size)
    return DatasetSplits("stl10", ssl, train, test, list(tr.classes), (0.4467, 0.4398, 0.4066),
                         (0.2603, 0.2566, 0.2713))


# --------------------------------------------------------------------------------------------
# ImageFolder: root/train/<class>/*.jpg and root/test/<class>/*.jpg
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_image_folder(split_dir: Path) -> tuple[list[str], list[str], list[int]]:
    """Class names, file paths and labels of one split folder, with clear errors for a missing
    split, a folder without class sub-folders and empty class folders."""
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"split folder {split_dir} does not exist; an ImageFolder root must hold train/ and "
            f"test/, each with one sub-folder per class")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetNotFoundError(f"{split_dir} holds no class sub-folders")
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (split_dir / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            empty.append(name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if empty:
        raise ValueError(f"{split_dir}: class folder(s) without images: {', '.join(empty)} "
                         f"(image extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return classes, paths, labels


#: files whose headers decide how large the decoded images of a split are (data.in_memory=auto)
IN_MEMORY_SAMPLE = 32


def _sampled_side(paths: list[str], bad_images: str) -> int | None:
    """The side images of ``paths`` take when decoded without ``data.image_size``: the longer side
    of the most common size among up to :data:`IN_MEMORY_SAMPLE` files spread over the split
    (only their headers are read). No single file decides, so one huge image sorted first does
    not size the split. An unreadable file is skipped as decoding would skip it (or raises under
    ``bad_images="fail"``); when none of the sample opens, the rest are tried in order, and None
    means that no file opens at all (decoding then reports it)."""
    from collections import Counter

    from PIL import Image

    from .sources import BadImageError

    def size_of(path: str) -> tuple[int, int] | None:
        try:
            with Image.open(path) as img:
                return img.size
        except (OSError, ValueError, SyntaxError) as exc:
            if bad_images == "fail":
                raise BadImageError(f"cannot decode image {path}: {exc}") from exc
            return None

    n = len(paths)
    picks = sorted({round(i * (n - 1) / max(1, IN_MEMORY_SAMPLE - 1)) for i in range(min(n, IN_MEMORY_SAMPLE))})
    sizes = [s for s in (size_of(paths[i]) for i in picks) if s is not None]
    chosen = set(picks)
    rest = (paths[i] for i in range(n) if i not in chosen)
    while not sizes:
        path = next(rest, None)
        if path is None:
            return None
        size = size_of(path)
        sizes = [size] if size is not None else []
    (w, h), _ = Counter(sizes).most_common(1)[0]
    return max(w, h)


def _in_memory(cfg: DataConfig, paths: list[str]) -> bool:
    """``data.in_memory``; for ``auto``, whether the decoded split fits in 4 GiB."""
    if cfg.in_memory != "auto":
        return cfg.in_memory == "true"
    side = cfg.image_size or _sampled_side(paths, cfg.bad_images)
    if side is None:
        return True  # nothing opens: decoding into memory says so, naming the count
    return len(paths) * side * side * 3 <= 4 * 2**30


def decode_cache_dir(cfg: DataConfig) -> Path | None:
    """The directory of decoded image folders named by ``data.decode_cache`` (None when off)."""
    if cfg.decode_cache == "off":
        return None
    if cfg.decode_cache == "auto":
        base = os.environ.get("NOCOLLAPSE_CACHE")
        return (Path(base) if base else Path.home() / ".cache" / "nocollapse") / "decoded"
    return Path(cfg.decode_cache).expanduser()


def _imagefolder(cfg: DataConfig) -> DatasetSplits:
    root = _root(cfg)
    if not root.is_dir():
        raise DatasetNotFoundError(f"ImageFolder root {root.resolve()} does not exist")
    classes, train_paths, train_labels = scan_image_folder(root / "train")
    test_classes, test_paths, test_labels = scan_image_folder(root / "test")
    if test_classes != classes:
        missing = sorted(set(classes) ^ set(test_classes))
        raise ValueError(f"{root}: train/ and test/ have different class folders ({', '.join(missing)})")
    if _in_memory(cfg, train_paths):
        cache = decode_cache_dir(cfg)
        train = decode_files(train_paths, train_labels, cfg.image_size, cfg.bad_images, cache_dir=cache)
        # the test split is decoded at the training split's size
        test = decode_files(test_paths, test_labels, cfg.image_size or train.image_size, cfg.bad_images,
                            cache_dir=cache)
        mean, std = _channel_stats(train.images[:: max(1, len(train) // 5000)])
    else:
        train = ImageFiles(train_paths, torch.tensor(train_labels, dtype=torch.long), cfg.image_size)
        test = ImageFiles(test_paths, torch.tensor(test_labels, dtype=torch.long), cfg.image_size)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return DatasetSplits("imagefolder", train, train, test, classes, mean, std)


_TORCHVISION_KEYS = frozenset({"root", "download", "image_size"})
DATASETS.register("digits", DatasetSpec(_digits, {"image_size", "digits_test_fraction"}), default=True)
DATASETS.register("cifar10", DatasetSpec(lambda cfg: _cifar(cfg, hundred=False), _TORCHVISION_KEYS))
DATASETS.register("cifar100", DatasetSpec(lambda cfg: _cifar(cfg, hundred=True), _TORCHVISION_KEYS))
DATASETS.register("svhn", DatasetSpec(_svhn, _TORCHVISION_KEYS))
DATASETS.register("stl10", DatasetSpec(_stl10, _TORCHVISION_KEYS))
DATASETS.register("imagefolder", DatasetSpec(
    _imagefolder, {"root", "image_size", "in_memory", "decode_cache"},
    required=(("root", "a folder with train/ and test/ class sub-folders "
                       "(e.g. --set data.root=/path/to/cifar10)"),)))


def image_size_of(cfg: Any, splits: DatasetSplits) -> int:
    """The side of the global crops: ``views.global_size``, or the images' own size."""
    native = splits.image_size
    size = cfg.views.global_size or native
    if size is None:
        raise ValueError("images are read from files without a fixed size: set views.global_size")
    if native is not None and size > native:
        raise ValueError(f"views.global_size ({size}) is larger than the images ({native} px); "
                         f"crops cannot be larger than the image (set data.image_size to upsample)")
    return size


def load_dataset(cfg: DataConfig) -> DatasetSplits:
    """Build the splits named by ``cfg.dataset`` and apply the long-tail option."""
    from .long_tail import long_tail_indices

    splits = DATASETS.get(cfg.dataset).load(cfg)
    if splits.num_classes < 2:
        log.warning("dataset %s has a single class (%s): k-NN, linear-probe and clustering scores are "
                    "meaningless (trivially 100 %%, whatever the representation); judge it by the collapse "
                    "measures, or add classes", cfg.root or cfg.dataset, ", ".join(splits.class_names))
    if cfg.imbalance_ratio > 1.0:
        idx = long_tail_indices(splits.train.labels, splits.num_classes, cfg.imbalance_ratio,
                                cfg.long_tail_seed)
        train = splits.train.subset(idx)
        ssl = train if splits.ssl_train is splits.train else splits.ssl_train
        splits = DatasetSplits(splits.name, ssl, train, splits.test, splits.class_names,
                               splits.mean, splits.std, full_train=splits.train)
    return splits
