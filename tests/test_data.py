"""Datasets, long-tail subsampling, ImageFolder errors, views and batch order."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nocollapse.config import DataConfig, ViewsConfig
from nocollapse.data import (BatchedViews, DatasetNotFoundError, EpochBatchSampler, PerSampleViews,
                             build_view_spec, load_dataset, long_tail_counts, long_tail_indices)
from nocollapse.data import sources
from nocollapse.data.registry import decode_cache_dir
from nocollapse.data.sources import BadImageError, decode_files


def test_cifar10_lt_counts_match_the_published_profile():
    # CIFAR-10-LT with imbalance 100: floor(5000 * 100^(-c/9)).
    assert long_tail_counts([5000] * 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_long_tail_counts_ratio_one_keeps_everything_and_caps_by_availability():
    assert long_tail_counts([10, 20, 30], 1.0) == [10, 20, 30]
    # n_max = 30; class 2 would keep 30 / 4 = 7.5 -> 7
    assert long_tail_counts([30, 30, 30], 4.0) == [30, 15, 7]


def test_long_tail_indices_are_seeded_and_follow_the_profile():
    labels = torch.arange(4).repeat_interleave(100)
    a = long_tail_indices(labels, 4, 10.0, seed=1)
    b = long_tail_indices(labels, 4, 10.0, seed=1)
    c = long_tail_indices(labels, 4, 10.0, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(labels[a], minlength=4).tolist() == long_tail_counts([100] * 4, 10.0)


def test_digits_is_offline_rgb_uint8_with_a_stratified_split():
    splits = load_dataset(DataConfig(dataset="digits"))
    assert splits.train.images.shape[1:] == (3, 16, 16)
    assert splits.train.images.dtype == torch.uint8
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.num_classes == 10
    counts = splits.class_counts()
    assert min(counts) >= 130 and sum(counts) == len(splits.train)


def test_long_tail_option_subsamples_training_split_only():
    splits = load_dataset(DataConfig(dataset="digits", imbalance_ratio=10.0))
    counts = splits.class_counts()
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.15)
    assert len(splits.test) == 450


def test_missing_torchvision_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    msg = str(info.value)
    assert str(tmp_path) in msg and "data.download=true" in msg


def _write_folder(root, classes=("a", "b"), per_class=3, size=12, splits=("train", "test")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")


def test_imagefolder_decodes_into_memory(tmp_path):
    _write_folder(tmp_path)
    splits = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert splits.class_names == ["a", "b"]
    assert splits.train.images.shape == (6, 3, 12, 12)


def test_imagefolder_missing_split_is_reported(tmp_path):
    _write_folder(tmp_path, splits=("train",))
    with pytest.raises(DatasetNotFoundError, match="test"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_imagefolder_empty_class_folder_is_reported(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "test" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_corrupt_image_is_skipped_with_its_name_or_fails(tmp_path, caplog):
    _write_folder(tmp_path)
    bad = tmp_path / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    splits = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert len(splits.train) == 6
    assert splits.train.skipped == [str(bad)]
    assert "broken.jpg" in caplog.text
    with pytest.raises(Exception, match="broken.jpg"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), bad_images="fail"))


def _folder_split(root, split="train"):
    classes = sorted(p.name for p in (root / split).iterdir())
    paths = [str(f) for c in classes for f in sorted((root / split / c).iterdir())]
    labels = [i for i, c in enumerate(classes) for _ in (root / split / c).iterdir()]
    return paths, labels


def test_decoded_folder_is_read_back_from_the_cache_without_decoding(tmp_path, monkeypatch):
    _write_folder(tmp_path / "data")
    paths, labels = _folder_split(tmp_path / "data")
    cache = tmp_path / "cache"
    first = decode_files(paths, labels, None, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the split")

    monkeypatch.setattr(sources, "decode_image", no_decoding)
    again = decode_files(paths, labels, None, cache_dir=cache)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert torch.equal(again.images[0].permute(1, 2, 0), torch.from_numpy(np.array(Image.open(paths[0]))))


def test_a_changed_file_or_size_is_decoded_again(tmp_path):
    _write_folder(tmp_path / "data")
    paths, labels = _folder_split(tmp_path / "data")
    cache = tmp_path / "cache"
    before = decode_files(paths, labels, None, cache_dir=cache)
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # a modification time no earlier write can share
    after = decode_files(paths, labels, None, cache_dir=cache)
    assert after.images[0].sum() == 0 and before.images[0].sum() > 0
    assert torch.equal(after.images[1:], before.images[1:])
    assert decode_files(paths, labels, 8, cache_dir=cache).image_size == 8
    assert len(list(cache.glob("*.pt"))) == 3


def test_an_unreadable_or_unwritable_cache_costs_a_warning_not_the_data(tmp_path, caplog):
    _write_folder(tmp_path / "data")
    paths, labels = _folder_split(tmp_path / "data")
    cache = tmp_path / "cache"
    reference = decode_files(paths, labels, None)
    decode_files(paths, labels, None, cache_dir=cache)
    (entry,) = cache.glob("*.pt")
    entry.write_bytes(b"truncated")
    assert torch.equal(decode_files(paths, labels, None, cache_dir=cache).images, reference.images)
    assert "unreadable decoded-image cache" in caplog.text
    assert torch.equal(torch.load(entry, weights_only=True)["images"], reference.images)  # rewritten

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert torch.equal(decode_files(paths, labels, None, cache_dir=not_a_dir).images, reference.images)
    assert "could not write the decoded-image cache" in caplog.text


def test_the_cache_keeps_skipped_images_and_fails_on_them_when_asked(tmp_path, caplog):
    _write_folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"not an image")
    paths, labels = _folder_split(tmp_path / "data")
    cache = tmp_path / "cache"
    decode_files(paths, labels, None, cache_dir=cache)
    caplog.clear()
    again = decode_files(paths, labels, None, cache_dir=cache)
    assert again.skipped == [str(bad)] and len(again) == 6 and "broken.jpg" in caplog.text
    with pytest.raises(BadImageError, match="broken.jpg"):
        decode_files(paths, labels, None, bad_images="fail", cache_dir=cache)


def test_data_decode_cache_auto_uses_nocollapse_cache_and_off_writes_nothing(tmp_path, monkeypatch):
    _write_folder(tmp_path / "data")
    monkeypatch.setenv("NOCOLLAPSE_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "data"))
    assert decode_cache_dir(cfg) == tmp_path / "cache" / "decoded"
    assert decode_cache_dir(DataConfig(decode_cache="~/x")) == Path.home() / "x"
    load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "data"), decode_cache="off"))
    assert not (tmp_path / "cache").exists()
    load_dataset(cfg)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 2  # train and test


def test_batch_sampler_shards_concatenate_to_the_single_process_batches():
    single = EpochBatchSampler(100, 20, seed=3).batches(epoch=1)
    r0 = EpochBatchSampler(100, 10, seed=3, rank=0, world_size=2).batches(epoch=1)
    r1 = EpochBatchSampler(100, 10, seed=3, rank=1, world_size=2).batches(epoch=1)
    assert len(single) == len(r0) == len(r1) == 5
    for s, a, b in zip(single, r0, r1):
        assert torch.equal(s, torch.cat([a, b]))
    # resuming mid-epoch re-creates the remaining batches
    rest = EpochBatchSampler(100, 20, seed=3).batches(epoch=1, start=2)
    assert all(torch.equal(x, y) for x, y in zip(rest, single[2:]))
    # each epoch is a different permutation
    assert not torch.equal(EpochBatchSampler(100, 20, seed=3).batches(epoch=2)[0], single[0])


def test_global_batch_larger_than_dataset_is_rejected():
    with pytest.raises(ValueError, match="larger than the training set"):
        EpochBatchSampler(10, 8, seed=0, world_size=2)


@pytest.mark.parametrize("local_crops", [0, 4])
def test_views_shapes_for_two_view_and_multicrop(local_crops):
    spec = build_view_spec(ViewsConfig(local_crops=local_crops, blur=[1.0, 0.1]), 32,
                           (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    crops = BatchedViews(spec)(images)
    assert len(crops) == 2 + local_crops
    assert [c.shape[-1] for c in crops] == [32, 32] + [14] * local_crops
    assert all(c.dtype == torch.float32 and c.shape[:2] == (5, 3) for c in crops)
    pil = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    per_sample = PerSampleViews(spec)(pil)
    assert [c.shape for c in per_sample] == [c.shape[1:] for c in crops]


def test_local_crop_larger_than_global_is_rejected():
    with pytest.raises(ValueError, match="local_size"):
        build_view_spec(ViewsConfig(local_crops=2, local_size=40), 32, (0,) * 3, (1,) * 3)


def test_a_substituted_unreadable_image_carries_label_minus_one_and_its_own_index(tmp_path):
    """An unreadable file met during training is replaced by the next readable image; that image's
    crops must not carry the original sample's label (nor any label: it may be a hidden one)."""
    from nocollapse.data import ImageFiles, TrainBatches, build_view_spec

    _write_folder(tmp_path, per_class=4, size=8)
    paths = sorted(str(p) for p in (tmp_path / "train").rglob("*.png"))
    Path(paths[2]).write_bytes(b"not an image")
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    source = ImageFiles(paths, labels, image_size=8)
    spec = build_view_spec(ViewsConfig(), 8, (0.5,) * 3, (0.25,) * 3)
    batches = TrainBatches(source, spec, batch_size=8, seed=0, device=torch.device("cpu"),
                           backend="per_sample")
    (batch,) = list(batches.epoch(0))
    assert batches.substituted == 1
    substituted = batch.labels == -1
    assert int(substituted.sum()) == 1 and batch.indices[substituted].tolist() == [3]   # 2 -> 3
    kept = batch.labels != -1
    assert torch.equal(batch.labels[kept], labels[batch.indices[kept]])
    assert int((batch.indices == 2).sum()) == 0 and int((batch.indices == 3).sum()) == 2


def test_stl10_unlabelled_split_keeps_label_minus_one(monkeypatch, tmp_path):
    import numpy as np
    import torchvision.datasets

    class FakeSTL10:
        classes = [f"c{i}" for i in range(10)]

        def __init__(self, root, download, split):
            n = {"train+unlabeled": 6, "train": 3, "test": 2}[split]
            self.data = np.zeros((n, 3, 8, 8), dtype=np.uint8)
            self.labels = np.array([0, 1, 2, -1, -1, -1][:n] if split == "train+unlabeled" else [0, 1, 2][:n])

    monkeypatch.setattr(torchvision.datasets, "STL10", FakeSTL10)
    splits = load_dataset(DataConfig(dataset="stl10", root=str(tmp_path)))
    assert splits.ssl_train.labels.tolist() == [0, 1, 2, -1, -1, -1]
    assert splits.train.labels.tolist() == [0, 1, 2]


def test_an_image_folder_of_mixed_sizes_is_resized_to_a_common_size(tmp_path, caplog):
    _write_folder(tmp_path, per_class=3, size=12)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / "big.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "test" / "b" / "other.png")
    splits = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert splits.train.images.shape == (7, 3, 12, 12) and splits.test.images.shape == (7, 3, 12, 12)
    assert "differ in size" in caplog.text and "12 px" in caplog.text
    explicit = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8))
    assert explicit.train.images.shape[-1] == 8 and explicit.test.images.shape[-1] == 8
