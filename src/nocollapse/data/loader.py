"""Batches for training and evaluation.

Data order is a pure function of ``(seed, epoch)``: every epoch draws one permutation of the
training set, cuts it into *global* batches of ``batch_size x world_size`` (the last incomplete
one is dropped), and process ``rank`` takes its contiguous slice of each global batch. Hence

* the concatenation of the ranks' batches is exactly the batch a single process with the global
  batch size would see (distributed parity), and
* a run resumed mid-epoch re-creates the remaining batches by skipping the first ones.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .batch import Batch
from .sources import BadImageError, ImageFiles, ImageSource, InMemoryImages
from .views import BatchedViews, PerSampleViews, ViewSpec, eval_transform, normalize_uint8

log = logging.getLogger(__name__)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimisation steps in one epoch: whole global batches, ``N // (batch_size x world_size)``
    (at least 1). The one place this is computed: the training batches and the method's per-step
    schedules, in training and when a run is re-opened (``runs.load_run``), must agree."""
    return max(1, num_samples // (batch_size * world_size))


class EpochBatchSampler:
    """Seeded, sharded, drop-last batches of indices for one epoch."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size * world_size > num_samples:
            raise ValueError(
                f"the global batch ({batch_size} x {world_size} processes) is larger than the "
                f"training set ({num_samples} images); lower train.batch_size")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return steps_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def batches(self, epoch: int, start: int = 0) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=gen)
        g = self.batch_size * self.world_size
        lo = self.rank * self.batch_size
        return [perm[i * g + lo: i * g + lo + self.batch_size] for i in range(start, len(self))]


def _item_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class _PerSampleDataset(Dataset):
    """Views of one file-backed image; augmentation randomness is a function of
    ``(seed, epoch, index)`` so results do not depend on workers or on resuming."""

    def __init__(self, source: ImageSource, views: PerSampleViews, seed: int, bad_images: str) -> None:
        self.source, self.views, self.seed, self.bad_images = source, views, seed, bad_images
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, used = self._load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_item_seed(self.seed, self.epoch, index))
            crops = self.views(image)
        # A substituted image carries no label: it may be one whose label must stay hidden.
        label = int(self.source.labels[index]) if used == index else -1
        return crops, label, used

    def _load(self, index: int):
        try:
            return self.source.load(index), index
        except BadImageError:
            if self.bad_images == "fail":
                raise
            # Skip: substitute the next readable image; the caller counts the substitution.
            for step in range(1, len(self.source)):
                alt = (index + step) % len(self.source)
                try:
                    return self.source.load(alt), -1 - alt
                except BadImageError:
                    continue
            raise


def _collate(items):
    crops = [torch.stack([it[0][c] for it in items]) for c in range(len(items[0][0]))]
    labels = torch.tensor([it[1] for it in items])
    used = torch.tensor([it[2] for it in items])
    return crops, labels, used


class TrainBatches:
    """Iterates the :class:`~nocollapse.data.batch.Batch` es of one epoch, on ``device``.

    ``indices`` are the indices of the images the crops were made from; an unreadable image that
    was replaced by the next readable one has the replacement's index and the label -1."""

    def __init__(self, source: ImageSource, spec: ViewSpec, batch_size: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, backend: str = "auto",
                 num_workers: int = 0, bad_images: str = "skip") -> None:
        self.source, self.device = source, device
        self.sampler = EpochBatchSampler(len(source), batch_size, seed, rank, world_size)
        if backend == "auto":
            backend = "batched" if isinstance(source, InMemoryImages) else "per_sample"
        if backend == "batched" and not isinstance(source, InMemoryImages):
            raise ValueError("views.backend=batched needs the images in memory (data.in_memory)")
        self.backend = backend
        self.substituted = 0
        if backend == "batched":
            self.views = BatchedViews(spec).to(device)
        else:
            self.dataset = _PerSampleDataset(source, PerSampleViews(spec), seed, bad_images)
            self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        batches = self.sampler.batches(epoch, start)
        if self.backend == "batched":
            assert isinstance(self.source, InMemoryImages)
            for idx in batches:
                images = self.source.images[idx].to(self.device, non_blocking=True)
                yield Batch(self.views(images), self.source.labels[idx].to(self.device), idx.to(self.device))
            return
        self.dataset.epoch = epoch
        loader = DataLoader(self.dataset, batch_sampler=[b.tolist() for b in batches],
                            num_workers=self.num_workers, collate_fn=_collate,
                            pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        for crops, labels, used in loader:
            self.substituted += int((used < 0).sum())
            indices = torch.where(used < 0, -1 - used, used)
            yield Batch(crops, labels, indices).to(self.device)


def eval_batches(source: ImageSource, size: int, mean, std, batch_size: int, device: torch.device,
                 num_workers: int = 0, bad_images: str = "skip") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, un-augmented ``(images, labels)`` batches of a whole split, in order.

    Unreadable files of a file-backed split are left out of their batch (with a warning naming
    them) when ``bad_images="skip"``, so features and labels stay aligned."""
    if isinstance(source, InMemoryImages):
        for lo in range(0, len(source), batch_size):
            images = source.images[lo: lo + batch_size].to(device, non_blocking=True)
            yield normalize_uint8(images, size, mean, std), source.labels[lo: lo + batch_size]
        return
    assert isinstance(source, ImageFiles)
    transform = eval_transform(size, mean, std)

    class _Eval(Dataset):
        def __len__(self) -> int:
            return len(source)

        def __getitem__(self, i):
            try:
                return transform(source.load(i)), int(source.labels[i])
            except BadImageError as exc:
                if bad_images == "fail":
                    raise
                log.warning("leaving unreadable image out of evaluation: %s", exc)
                return None

    def collate(items):
        items = [it for it in items if it is not None]
        if not items:
            return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.long)
        return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items])

    loader = DataLoader(_Eval(), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    for images, labels in loader:
        if len(labels):
            yield images.to(device, non_blocking=True), labels
