"""Datasets, long-tail subsampling, augmented views and batching."""

from .loader import EpochBatchSampler, TrainBatches, eval_batches, steps_per_epoch
from .long_tail import long_tail_counts, long_tail_indices
from .batch import Batch
from .registry import DatasetNotFoundError, DatasetSpec, DatasetSplits, load_dataset
from .sources import BadImageError, ImageFiles, InMemoryImages
from .views import BatchedViews, PerSampleViews, ViewSpec, build_view_spec

__all__ = [
    "BadImageError", "Batch", "DatasetSpec", "BatchedViews", "DatasetNotFoundError", "DatasetSplits",
    "EpochBatchSampler", "ImageFiles", "InMemoryImages", "PerSampleViews", "TrainBatches",
    "ViewSpec", "build_view_spec", "eval_batches", "load_dataset", "long_tail_counts",
    "long_tail_indices", "steps_per_epoch",
]
